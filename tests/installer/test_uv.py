"""installTool: the installs from a lock with uv (from the image, or a uv wheel from the
configured index), pip as the fallback of `auto`, and a clear failure for `uv` without uv.

The uv wheel is the pinned one scripts/uv-wheel keeps in the cache outside the repository; the
tests serve it from their loopback indexes like every other wheel."""

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from conftest import PASSWORD, USER, with_creds
from helpers import (
    EXIT, REPO, StaticIndex, all_files_text, base_env, closed_port_url, config, import_from_site, make_wheel,
    process_cmdlines, run_installer, start_installer,
)
from test_emptydir import secret_forms

SET_ID = "5e7a0000000000aa"
KEY = "0123456789abcdef"


@pytest.fixture(scope="session")
def uv_wheel():
    out = subprocess.run([str(REPO / "scripts" / "uv-wheel")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return Path(out.stdout.strip())


@pytest.fixture
def index(tmp_path, uv_wheel):
    """A loopback index serving the test wheels and the uv wheel, recording every request."""
    root = tmp_path / "wheels"
    root.mkdir()
    served = StaticIndex({
        "kasprdemo": [make_wheel(root, "kasprdemo", "1.0"), make_wheel(root, "kasprdemo", "2.0")],
        "needsbase": [make_wheel(root, "needsbase", "1.0", requires=["basedep>=1.0"])],
        "basedep": [make_wheel(root, "basedep", "1.0"), make_wheel(root, "basedep", "2.0")],
        "uv": [uv_wheel],
    })
    served.root = root
    yield served
    served.stop()


@pytest.fixture(scope="session")
def uv_image_python(tmp_path_factory, uv_wheel):
    """An image that has uv: a venv with the uv wheel installed (its `uv` beside its python)."""
    venv = tmp_path_factory.mktemp("uv-image") / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", str(uv_wheel)],
                   check=True, env=base_env(venv.parent), timeout=300)
    return python


def lock_path(tmp_path):
    return tmp_path / ("%s.pylock.toml" % SET_ID)


def build_cfg(tmp_path, index_url, packages, tool, **extra):
    return config(tmp_path / "job", index_url, packages, installKey=KEY, installTool=tool,
                  build={"set": SET_ID, "lockFile": str(lock_path(tmp_path))}, **extra)


def restore_cfg(tmp_path, pod, index_url, packages, tool, lock=None, **extra):
    return config(tmp_path / pod, index_url, packages, installKey=KEY, installTool=tool,
                  restore={"set": SET_ID, "lockFile": str(lock or lock_path(tmp_path))}, **extra)


def module_sha(target, module):
    return hashlib.sha256((target / "site" / module / "__init__.py").read_bytes()).hexdigest()


def test_auto_builds_and_restores_with_uv_from_the_index(image_python, index, env, tmp_path):
    packages = ["kasprdemo", "needsbase"]
    built = run_installer(image_python, build_cfg(tmp_path, index.url, packages, "auto"), env, tmp_path / "b.log")
    assert built.returncode == 0, built
    assert built.lines("installing with uv 0.13.8 from the index"), built
    assert built.lines("uv install from the lock took") and not built.lines("pip install from the lock")
    # The image's basedep 1.0 satisfies needsbase: it is neither locked nor installed again.
    assert "basedep" not in lock_path(tmp_path).read_text()
    assert not [e for e in os.listdir(tmp_path / "job" / "site") if e.startswith("basedep")]
    assert import_from_site(image_python, tmp_path / "job", "import kasprdemo; print(kasprdemo.VERSION)") == "2.0"

    pod = run_installer(image_python, restore_cfg(tmp_path, "pod", index.url, packages, "auto"), env,
                        tmp_path / "r.log")
    assert pod.returncode == 0, pod
    assert pod.lines("hash-checked, no resolution") and pod.lines("uv install from the lock took"), pod
    assert module_sha(tmp_path / "pod", "kasprdemo") == module_sha(tmp_path / "job", "kasprdemo")

    # uv checks the hashes too: a lock whose hash does not match the served file fails.
    served = index.root / "kasprdemo-2.0-py3-none-any.whl"
    good = hashlib.sha256(served.read_bytes()).hexdigest()
    tampered = tmp_path / "tampered.toml"
    tampered.write_text(lock_path(tmp_path).read_text().replace(good, "0" * 64))
    bad = run_installer(image_python, restore_cfg(tmp_path, "bad", index.url, packages, "uv", lock=tampered), env,
                        tmp_path / "bad.log")
    assert bad.returncode == EXIT["integrity"], bad
    assert bad.termination.startswith("kaspr-packages: FAILED integrity: uv install from the lock exited"), bad
    assert not (tmp_path / "bad" / "site").exists()


def test_uv_from_the_image_needs_no_uv_download(uv_image_python, index, env, tmp_path):
    packages = ["kasprdemo==1.0"]
    built = run_installer(uv_image_python, build_cfg(tmp_path, index.url, packages, "uv"), env, tmp_path / "b.log")
    assert built.returncode == 0, built
    assert built.lines("installing with uv 0.13.8 from the image"), built
    assert not [r for r in index.requests if "/uv" in r["path"]], index.requests
    assert import_from_site(uv_image_python, tmp_path / "job", "import kasprdemo; print(kasprdemo.VERSION)") == "1.0"


def test_without_uv_anywhere_uv_fails_with_its_category_and_auto_uses_pip(image_python, index, env, tmp_path):
    packages = ["kasprdemo==1.0"]
    assert run_installer(image_python, build_cfg(tmp_path, index.url, packages, "pip"), env,
                         tmp_path / "b.log").returncode == 0
    del index.wheels["uv"]
    strict = run_installer(image_python, restore_cfg(tmp_path, "strict", index.url, packages, "uv"), env,
                           tmp_path / "s.log")
    assert strict.returncode == EXIT["package_not_found"], strict
    assert strict.termination.startswith(
        "kaspr-packages: FAILED package_not_found: installTool is uv, but the image has no uv >= 0.5 and the "
        "index serves none: "), strict
    assert not (tmp_path / "strict" / "site").exists()
    auto = run_installer(image_python, restore_cfg(tmp_path, "auto", index.url, packages, "auto"), env,
                         tmp_path / "a.log")
    assert auto.returncode == 0, auto
    assert auto.lines("installing with pip") and auto.lines("pip install from the lock took"), auto
    assert import_from_site(image_python, tmp_path / "auto", "import kasprdemo; print(kasprdemo.VERSION)") == "1.0"


def test_uv_gets_the_credentials_through_netrc_only(image_python, pypi, wheels, uv_wheel, env, tmp_path):
    root, _ = wheels
    if not (root / uv_wheel.name).exists():
        shutil.copy(uv_wheel, root / uv_wheel.name)
    packages = ["kasprdemo==1.0", "needsbase"]
    creds = with_creds(env, USER, PASSWORD)
    built = run_installer(image_python, build_cfg(tmp_path, pypi.url, packages, "pip", credentials=True), creds,
                          tmp_path / "b.log")
    assert built.returncode == 0, built
    # The pod fetches uv and then every locked file from the index with basic auth.
    target = tmp_path / "pod"
    termlog = tmp_path / "r.log"
    proc = start_installer(image_python, restore_cfg(tmp_path, "pod", pypi.url, packages, "uv", credentials=True),
                           creds, termlog)
    seen, chunks = [], []
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        seen += [c for c in process_cmdlines() if str(target) in c]
        time.sleep(0.005)
    proc.wait(timeout=10)
    reader.join(timeout=10)
    output = b"".join(chunks).decode()
    assert proc.returncode == 0, output
    assert "installing with uv 0.13.8 from the index" in output and "uv install from the lock took" in output
    assert [c for c in seen if "uv pip install" in c], "uv was observed running"
    for form in secret_forms(USER, PASSWORD, "p@ss: /#?%&;$ word"):
        assert all(form not in c for c in seen), "secret in an argv"
        assert form not in output
        assert form not in termlog.read_text()
        assert form.encode() not in all_files_text(target)
    assert import_from_site(image_python, target, "import kasprdemo; print(kasprdemo.VERSION)") == "1.0"


@pytest.mark.parametrize("value", ["UV", "poetry", 1])
def test_bad_install_tool_names_field_and_value(image_python, env, tmp_path, value):
    run = run_installer(image_python, config(tmp_path / "pod", None, ["kasprdemo"], installTool=value), env,
                        tmp_path / "t.log")
    assert run.returncode == EXIT["invalid_config"], run
    assert "installTool: " in run.termination


def test_a_uv_program_that_does_not_match_its_wheels_record_is_refused(image_python, index, env, tmp_path):
    def record_hash(data):
        return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()

    packages = ["kasprdemo==1.0"]
    assert run_installer(image_python, build_cfg(tmp_path, index.url, packages, "pip"), env,
                         tmp_path / "b.log").returncode == 0
    info = "uv-0.99.0.dist-info"
    files = {
        "uv-0.99.0.data/scripts/uv": b"#!/bin/sh\necho uv 0.99.0\n",
        info + "/METADATA": b"Metadata-Version: 2.1\nName: uv\nVersion: 0.99.0\n",
        info + "/WHEEL": b"Wheel-Version: 1.0\nGenerator: kaspr-tests\nRoot-Is-Purelib: false\nTag: py3-none-any\n",
    }
    # The RECORD names the hash of another program than the one the wheel holds.
    record = "".join("%s,%s,%d\n" % (name, record_hash(b"the real uv" if name.endswith("/uv") else data), len(data))
                     for name, data in files.items())
    files[info + "/RECORD"] = (record + info + "/RECORD,,\n").encode()
    wheel = tmp_path / "uv-0.99.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    index.wheels["uv"] = [wheel]
    run = run_installer(image_python, restore_cfg(tmp_path, "pod", index.url, packages, "uv"), env, tmp_path / "r.log")
    assert run.returncode == EXIT["integrity"], run
    assert "does not match the wheel's RECORD" in run.termination, run
    assert not (tmp_path / "pod" / "site").exists()


def test_uv_failures_get_pips_categories(uv_image_python, index, env, tmp_path):
    packages = ["kasprdemo==1.0"]
    assert run_installer(uv_image_python, build_cfg(tmp_path, index.url, packages, "pip"), env,
                         tmp_path / "b.log").returncode == 0
    down = run_installer(uv_image_python, restore_cfg(tmp_path, "down", closed_port_url(), packages, "uv"), env,
                         tmp_path / "d.log")
    assert down.returncode == EXIT["network"], down
    assert down.termination.startswith("kaspr-packages: FAILED network: uv install from the lock exited"), down
    # The locked release was withdrawn from the index.
    index.wheels["kasprdemo"] = [w for w in index.wheels["kasprdemo"] if "1.0" not in w.name]
    gone = run_installer(uv_image_python, restore_cfg(tmp_path, "gone", index.url, packages, "uv"), env,
                         tmp_path / "g.log")
    assert gone.returncode == EXIT["package_not_found"], gone
    assert gone.lines("uv: ") and "kasprdemo" in gone.termination, gone
