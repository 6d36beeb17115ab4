"""Tests of scripts/oci-pack.py: the layout an OCI archive must have for `ctr images import` and
the CRI, and byte-for-byte determinism (the image recipes cache archives by input hash).

Run with scripts/test-images (part of scripts/test); a few seconds, no network, no root.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

PACKER = Path(__file__).resolve().parents[2] / "scripts" / "oci-pack.py"


def load_packer():
    spec = importlib.util.spec_from_file_location("oci_pack", PACKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_rootfs(root: Path) -> Path:
    (root / "usr/local/bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "home/app").mkdir(parents=True)
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    tool = root / "usr/local/bin/tool"
    tool.write_text("#!/bin/true\n")
    os.chmod(tool, 0o755)
    (root / "etc/passwd").write_text("app:x:1000:1000::/home/app:/usr/sbin/nologin\n")
    os.link(root / "etc/passwd", root / "etc/passwd-")
    os.symlink("../usr/local/bin/tool", root / "etc/tool-link")
    (root / "home/app/.profile").write_text("# empty\n")
    # Created out of order on purpose: the archive must not depend on directory order.
    (root / "b").write_text("b")
    (root / "a").write_text("a")
    return root


def pack(rootfs: Path, output: Path, *extra: str) -> str:
    cmd = [
        sys.executable, str(PACKER), "--rootfs", str(rootfs), "--output", str(output),
        "--ref", "kaspr-e2e/app:1", "--arch", "amd64",
        "--entrypoint", '["/usr/local/bin/tool"]', "--cmd", '["serve", "--help"]',
        "--user", "1000:1000", "--workdir", "/home/app", "--env", "PATH=/usr/bin:/bin",
        "--owner", "0:0", "--owner", "/home/app=1000:1000", *extra,
    ]
    result = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return result.stdout.strip()


def read_archive(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def blob(files: dict[str, bytes], digest: str) -> bytes:
    algorithm, hexdigest = digest.split(":", 1)
    assert algorithm == "sha256"
    data = files[f"blobs/sha256/{hexdigest}"]
    assert hashlib.sha256(data).hexdigest() == hexdigest, f"blob {digest} does not match its content"
    return data


@pytest.fixture
def archive(tmp_path: Path):
    rootfs = make_rootfs(tmp_path / "rootfs")
    out = tmp_path / "out" / "image.tar"
    digest = pack(rootfs, out)
    return out, digest, read_archive(out)


def test_layout_and_digests(archive):
    out, printed_digest, files = archive
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads(files["index.json"])
    assert index["schemaVersion"] == 2
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    [desc] = index["manifests"]
    assert desc["annotations"] == {
        "io.containerd.image.name": "docker.io/kaspr-e2e/app:1",
        "org.opencontainers.image.ref.name": "docker.io/kaspr-e2e/app:1",
    }
    assert desc["platform"] == {"architecture": "amd64", "os": "linux"}
    assert desc["digest"] == printed_digest
    manifest_bytes = blob(files, desc["digest"])
    assert len(manifest_bytes) == desc["size"]
    manifest = json.loads(manifest_bytes)
    assert manifest["mediaType"] == desc["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    config_bytes = blob(files, manifest["config"]["digest"])
    assert len(config_bytes) == manifest["config"]["size"]
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    [layer] = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar"
    layer_bytes = blob(files, layer["digest"])
    assert len(layer_bytes) == layer["size"]
    # Nothing but the three blobs and the two index files.
    assert len(files) == 5
    # Uncompressed layer: its diff_id is its digest.
    config = json.loads(config_bytes)
    assert config["rootfs"] == {"type": "layers", "diff_ids": [layer["digest"]]}
    assert config["architecture"] == "amd64" and config["os"] == "linux"
    assert config["config"] == {
        "Entrypoint": ["/usr/local/bin/tool"],
        "Cmd": ["serve", "--help"],
        "User": "1000:1000",
        "WorkingDir": "/home/app",
        "Env": ["PATH=/usr/bin:/bin"],
    }
    assert len(config["history"]) == 1 and config["history"][0]["created"] == config["created"]
    # No temporary files left beside the archive.
    assert os.listdir(out.parent) == ["image.tar"]


def test_layer_entries(archive):
    _, _, files = archive
    manifest = json.loads(blob(files, json.loads(files["index.json"])["manifests"][0]["digest"]))
    layer = blob(files, manifest["layers"][0]["digest"])
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == [
        "a", "b", "etc", "etc/passwd", "etc/passwd-", "etc/tool-link", "home", "home/app",
        "home/app/.profile", "tmp", "usr", "usr/local", "usr/local/bin", "usr/local/bin/tool",
    ]
    by_name = {m.name: m for m in members}
    for m in members:
        assert m.mtime == 0, m.name
        assert m.uname == "" and m.gname == "", m.name
        expected_owner = (1000, 1000) if m.name.startswith("home/app") else (0, 0)
        assert (m.uid, m.gid) == expected_owner, m.name
    assert stat.S_IMODE(by_name["tmp"].mode) == 0o1777 and by_name["tmp"].isdir()
    assert stat.S_IMODE(by_name["usr/local/bin/tool"].mode) == 0o755
    assert by_name["etc/tool-link"].issym() and by_name["etc/tool-link"].linkname == "../usr/local/bin/tool"
    assert by_name["etc/passwd-"].islnk() and by_name["etc/passwd-"].linkname == "etc/passwd"


def test_deterministic_and_input_sensitive(tmp_path: Path):
    rootfs = make_rootfs(tmp_path / "rootfs")
    first, second = tmp_path / "1.tar", tmp_path / "2.tar"
    d1 = pack(rootfs, first)
    os.utime(rootfs / "a", (1_000_000, 1_000_000))  # mtimes must not matter
    d2 = pack(rootfs, second)
    assert d1 == d2
    assert first.read_bytes() == second.read_bytes()
    (rootfs / "a").write_text("changed")
    assert pack(rootfs, tmp_path / "3.tar") != d1


@pytest.mark.parametrize(
    "ref, expected",
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("kaspr-e2e/app:abc123", "docker.io/kaspr-e2e/app:abc123"),
        ("registry.k8s.io/pause:3.10", "registry.k8s.io/pause:3.10"),
        ("ghcr.io/kaspr-io/kaspr-packages-webhook:0.1.0", "ghcr.io/kaspr-io/kaspr-packages-webhook:0.1.0"),
        ("localhost:5000/app", "localhost:5000/app:latest"),
        ("localhost/app:1", "localhost/app:1"),
    ],
)
def test_reference_normalisation(ref, expected):
    assert load_packer().normalize_reference(ref) == expected


def test_invalid_reference_is_refused(tmp_path: Path):
    rootfs = make_rootfs(tmp_path / "rootfs")
    result = subprocess.run(
        [sys.executable, str(PACKER), "--rootfs", str(rootfs), "--output", str(tmp_path / "x.tar"), "--ref", "Not A Ref"],
        capture_output=True, text=True,
    )
    assert result.returncode != 0 and "not a valid image reference" in result.stderr
    assert not (tmp_path / "x.tar").exists()
