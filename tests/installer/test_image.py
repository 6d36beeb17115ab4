"""Image mode: a build publishes its set to an OCI registry, one layer per distribution, with
the push credentials of a mounted docker config Secret (basic or bearer auth)."""

import hashlib
import io
import os
import random
import runpy
import subprocess
import tarfile

import pytest

from helpers import EXIT, INSTALLER, StaticIndex, config, make_wheel, run_installer
from oci_registry import AuthRegistry, image_line, layer_digests

KEY = "0123456789abcdef"
SETS = ["1a6e000000000001", "1a6e000000000002", "1a6e000000000003", "1a6e000000000004"]
USER = "pusher"
PASSWORD = "s3cr3t: p@ss/word"
BIG_BYTES = 3 << 20


def big_wheel(root, name="bigdist", version="1.0"):
    """A distribution whose layer dominates the set (incompressible, like compiled libraries)."""
    data = random.Random(7).randbytes(BIG_BYTES)
    return make_wheel(root, name, version, module_text="DATA = %r\n" % data)


@pytest.fixture
def index(tmp_path):
    root = tmp_path / "wheels"
    root.mkdir()
    served = StaticIndex({
        "kasprdemo": [make_wheel(root, "kasprdemo", "1.0"), make_wheel(root, "kasprdemo", "2.0")],
        "needsbase": [make_wheel(root, "needsbase", "1.0", requires=["basedep>=1.0"])],
        "basedep": [make_wheel(root, "basedep", "1.0"), make_wheel(root, "basedep", "2.0")],
        "bigdist": [big_wheel(root)],
    })
    yield served
    served.stop()


@pytest.fixture(params=["basic", "bearer"])
def registry(request, tmp_path):
    work = tmp_path / "registry"
    work.mkdir()
    served = AuthRegistry(work, {USER: PASSWORD}, auth=request.param)
    yield served
    served.stop()


@pytest.fixture
def push_secret(tmp_path, registry):
    folder = tmp_path / "push-secret"
    folder.mkdir()
    return registry.docker_config(folder / "config.json", USER, PASSWORD)


def image_build(tmp_path, name, index_url, packages, set_id, registry, secret, keep=None, app="my-app", **image):
    target = {"repository": "%s/kaspr/packages" % registry.host, "plainHttp": True, "dockerConfig": str(secret)}
    target.update(image)
    build = {"set": set_id, "image": target}
    if keep is not None:
        build["keep"] = keep
    return config(tmp_path / name, index_url, packages, installKey=KEY, app=app, build=build)


def listed_tags(registry, secret) -> list:
    listed = registry.crane(secret.parent, "ls", "%s/kaspr/packages" % registry.host)
    assert listed.returncode == 0, listed.stderr
    return sorted(listed.stdout.decode().split())


def has_manifest(registry, secret, digest) -> bool:
    return registry.crane(secret.parent, "manifest", "%s/kaspr/packages@%s" % (registry.host, digest)).returncode == 0


def test_a_build_deletes_its_apps_images_the_lock_no_longer_keeps(image_python, index, registry, push_secret, env,
                                                                  tmp_path):
    def build(name, packages, set_id, keep=None, app="my-app"):
        run = run_installer(image_python, image_build(tmp_path, name, index.url, packages, set_id, registry,
                                                      push_secret, keep=keep, app=app), env, tmp_path / (name + ".log"))
        assert run.returncode == 0, run
        return image_line(run.stdout), run

    dropped, _ = build("old", ["kasprdemo==1.0"], SETS[0])
    rollback, _ = build("kept", ["kasprdemo==2.0"], SETS[1])
    # Another app's set in the same repository, not in this app's list: never this app's to delete.
    other, _ = build("other", ["needsbase"], SETS[2], app="other-app")
    assert {dropped["tag"], rollback["tag"], other["tag"]} <= set(listed_tags(registry, push_secret))
    # The lock ConfigMap keeps SETS[1] (and this build's SETS[3]); SETS[0] left it.
    newest, run = build("new", ["kasprdemo==2.0", "needsbase"], SETS[3], keep=[SETS[1]])
    assert listed_tags(registry, push_secret) == sorted([rollback["tag"], other["tag"], newest["tag"]])
    assert not has_manifest(registry, push_secret, dropped["digest"])
    for kept in (rollback, other, newest):
        assert has_manifest(registry, push_secret, kept["digest"]), kept["tag"]
    assert "deleted image %s/kaspr/packages:%s (%s) of set %s" % (
        registry.host, dropped["tag"], dropped["digest"], SETS[0]) in run.stdout
    assert ("DELETE", "/v2/kaspr/packages/manifests/" + dropped["digest"]) in [
        (method, path) for method, path, _ in registry.requests]
    # A kept image still imports: its layers survived the deletion of the dropped image.
    assert registry.crane(push_secret.parent, "export", "%s/kaspr/packages@%s" % (registry.host, rollback["digest"]),
                          "-").returncode == 0
    assert PASSWORD not in run.stdout


def test_a_registry_that_refuses_deletes_is_logged_and_the_build_succeeds(image_python, index, env, tmp_path):
    work = tmp_path / "registry"
    work.mkdir()
    registry = AuthRegistry(work, {USER: PASSWORD}, refuse_deletes=True)
    try:
        folder = tmp_path / "push-secret"
        folder.mkdir()
        secret = registry.docker_config(folder / "config.json", USER, PASSWORD)
        first = run_installer(image_python, image_build(tmp_path, "old", index.url, ["kasprdemo==1.0"], SETS[0],
                                                        registry, secret), env, tmp_path / "old.log")
        assert first.returncode == 0, first
        dropped = image_line(first.stdout)
        run = run_installer(image_python, image_build(tmp_path, "new", index.url, ["kasprdemo==2.0"], SETS[1],
                                                      registry, secret, keep=[]), env, tmp_path / "new.log")
        assert run.returncode == 0, run
        assert "warning: registry %s does not delete images; set %s" % (registry.host, SETS[0]) in run.stdout
        assert "OK" in run.termination
        assert has_manifest(registry, secret, dropped["digest"])
        assert [m for m, _, _ in registry.requests].count("DELETE") == 1
    finally:
        registry.stop()


def test_build_pushes_a_set_image_that_a_registry_client_pulls(image_python, index, registry, push_secret, env,
                                                               tmp_path):
    run = run_installer(image_python, image_build(tmp_path, "job", index.url, ["kasprdemo==2.0", "needsbase"],
                                                  SETS[0], registry, push_secret), env, tmp_path / "t.log")
    assert run.returncode == 0, run
    image = image_line(run.stdout)
    assert image["tag"].startswith(SETS[0] + "-cpython-")
    assert image["repository"] == "%s/kaspr/packages" % registry.host
    assert sorted(layer_digests(image)) == ["kasprdemo-2.0", "needsbase-1.0", "set"]
    assert "image %s" % image["digest"] in run.termination
    # The registry's view: the manifest's digest is what the build reported, the layers are there.
    ref = "%s/kaspr/packages@%s" % (registry.host, image["digest"])
    manifest = registry.crane(push_secret.parent, "manifest", ref)
    assert manifest.returncode == 0, manifest.stderr
    assert "sha256:" + hashlib.sha256(manifest.stdout).hexdigest() == image["digest"]
    # The image's filesystem is the set: import from it as a pod would from the image volume.
    exported = registry.crane(push_secret.parent, "export", ref, "-")
    assert exported.returncode == 0, exported.stderr
    root = tmp_path / "mounted"
    with tarfile.open(fileobj=io.BytesIO(exported.stdout)) as tar:
        tar.extractall(root, filter="data")
    out = subprocess.run([image_python, "-c", "import kasprdemo, needsbase; print(kasprdemo.VERSION)"],
                         env={"PYTHONPATH": str(root), "PYTHONNOUSERSITE": "1"}, capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == "2.0", out.stderr
    # Bytecode in the image is hash-based: no write to the read-only mount is ever needed.
    pyc = next((root / "kasprdemo" / "__pycache__").glob("*.pyc")).read_bytes()
    assert int.from_bytes(pyc[4:8], "little") == 0b01, "flags: hash-based, unchecked"
    assert PASSWORD not in run.stdout and PASSWORD not in run.termination


def test_a_second_app_and_a_one_package_change_upload_only_new_layers(image_python, index, registry, push_secret,
                                                                     env, tmp_path):
    def build(name, packages, set_id):
        before = registry.uploaded
        run = run_installer(image_python, image_build(tmp_path, name, index.url, packages, set_id, registry,
                                                      push_secret), env, tmp_path / (name + ".log"))
        assert run.returncode == 0, run
        return image_line(run.stdout), registry.uploaded - before

    first, first_bytes = build("app-a", ["bigdist", "kasprdemo==1.0"], SETS[0])
    second, second_bytes = build("app-b", ["bigdist", "needsbase"], SETS[1])
    changed, changed_bytes = build("app-a2", ["bigdist", "kasprdemo==2.0"], SETS[2])
    big = layer_digests(first)["bigdist-1.0"]
    big_size = next(size for title, _, size in first["layers"] if title == "bigdist-1.0")
    assert big_size > BIG_BYTES * 0.9
    assert layer_digests(second)["bigdist-1.0"] == big == layer_digests(changed)["bigdist-1.0"]
    assert first_bytes > big_size
    # What the registry received: the later images only brought their small layers.
    assert second_bytes < big_size / 20, (second_bytes, big_size)
    assert changed_bytes < big_size / 20, (changed_bytes, big_size)
    assert second["uploadedBytes"] == second_bytes and changed["uploadedBytes"] == changed_bytes
    # The same set built again is the same image: nothing to upload, same digest.
    again, again_bytes = build("app-a-again", ["bigdist", "kasprdemo==1.0"], SETS[0])
    assert again["digest"] == first["digest"]
    assert again_bytes == 0 and again["uploadedLayers"] == 0


def test_wrong_push_credentials_fail_as_authentication_without_revealing_them(image_python, index, registry, env,
                                                                             tmp_path):
    folder = tmp_path / "wrong"
    folder.mkdir()
    secret = registry.docker_config(folder / "config.json", USER, "not-" + PASSWORD)
    run = run_installer(image_python, image_build(tmp_path, "job", index.url, ["kasprdemo==2.0"], SETS[0],
                                                  registry, secret), env, tmp_path / "t.log")
    assert run.returncode == EXIT["authentication"], run
    assert registry.host in run.termination and "kaspr/packages" in run.termination
    assert "authentication" in run.termination
    for text in (run.stdout, run.termination):
        assert "not-" + PASSWORD not in text
    assert not any(path.startswith("/v2/kaspr/packages/manifests") and auth for _, path, auth in registry.requests
                   if _ == "PUT")


def test_a_registry_that_asks_for_credentials_the_secret_lacks(image_python, index, registry, env, tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    secret = folder / "config.json"
    secret.write_text('{"auths": {"registry.invalid": {"auth": "dTpw"}}}')
    run = run_installer(image_python, image_build(tmp_path, "job", index.url, ["kasprdemo==2.0"], SETS[0],
                                                  registry, secret), env, tmp_path / "t.log")
    assert run.returncode == EXIT["authentication"], run


@pytest.mark.parametrize("image, field", [
    ({"repository": "Registry.example/UPPER"}, "build.image.repository"),
    ({"repository": "no-path"}, "build.image.repository"),
    ({"repository": "r.example/a", "dockerConfig": "relative/config.json"}, "build.image.dockerConfig"),
    ({"repository": "r.example/a", "plainHttp": "yes"}, "build.image.plainHttp"),
])
def test_an_invalid_image_target_names_the_field(image_python, env, tmp_path, image, field):
    cfg = config(tmp_path / "job", None, ["kasprdemo"], installKey=KEY, build={"set": SETS[0], "image": image})
    run = run_installer(image_python, cfg, env, tmp_path / "t.log")
    assert run.returncode == EXIT["invalid_config"], run
    assert field in run.termination


def test_layers_do_not_depend_on_file_times_or_install_order(tmp_path):
    installer = runpy.run_path(str(INSTALLER), run_name="kaspr_installer")
    digests = []
    for number, stamp in enumerate((1_000_000, 2_000_000)):
        root = tmp_path / ("set%d" % number)
        (root / "pkg").mkdir(parents=True)
        (root / "pkg" / "__init__.py").write_text("X = 1\n")
        (root / "pkg" / "tool.sh").write_text("#!/bin/sh\n")
        (root / "pkg" / "tool.sh").chmod(0o755 if number else 0o775)
        for path in (root / "pkg").iterdir():
            os.utime(path, (stamp, stamp))
        files = ["pkg/tool.sh", "pkg/__init__.py"] if number else ["pkg/__init__.py", "pkg/tool.sh"]
        layer = installer["pack_layer"](str(root), files, str(tmp_path / ("l%d.tar.gz" % number)))
        digests.append((layer["digest"], layer["diffId"]))
    assert digests[0] == digests[1]
    with tarfile.open(tmp_path / "l0.tar.gz") as tar:
        members = [(m.name, m.mtime, m.uid, oct(m.mode)) for m in tar.getmembers()]
    assert members == [("pkg", 1, 0, "0o755"), ("pkg/__init__.py", 1, 0, "0o644"), ("pkg/tool.sh", 1, 0, "0o755")]
