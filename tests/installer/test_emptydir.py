"""emptyDir mode end to end: real pip, real indexes on loopback, the installer as a subprocess."""

import json
import os
import threading
import time

import pytest

from conftest import PASSWORD, PLAIN_PASSWORD, PLAIN_USER, USER, with_creds
from helpers import (
    EXIT, BlackHole, StaticIndex, all_files_text, closed_port_url, config, import_from_site,
    make_wheel, process_cmdlines, run_installer, start_installer,
)

VERSION_OF = "import {0}; print({0}.VERSION)"


def site_dists(target):
    return sorted(e for e in os.listdir(target / "site") if e.endswith(".dist-info"))


# ---------------------------------------------------------------------------------- success

def test_installs_packages_importable_from_site(image_python, pypi, env, target, termlog):
    cfg = config(target, pypi.url, ["kasprdemo==2.0", "needsbase"], credentials=True,
                 someFutureKey={"ignored": True})
    run = run_installer(image_python, cfg, with_creds(env), termlog)

    assert run.returncode == 0, run
    assert import_from_site(image_python, target, VERSION_OF.format("kasprdemo")) == "2.0"
    assert import_from_site(image_python, target, VERSION_OF.format("needsbase")) == "1.0"
    assert (target / "site").is_symlink()
    assert not (target / ".work").exists(), "temporary files are removed"
    # The summary names the key and python tag; logs name mode, attempts and duration.
    assert termlog.read_text().startswith("kaspr-packages: OK 2 packages, key 0123456789abcdef, cpython-")
    assert run.lines("mode emptyDir") and run.lines("install key 0123456789abcdef")
    assert run.lines("attempt 1/1 succeeded in")


def test_runs_as_python_dash_c(image_python, pypi, env, target, termlog):
    cfg = config(target, pypi.url, ["kasprdemo==1.0"], credentials=True)
    run = run_installer(image_python, cfg, with_creds(env), termlog, use_dash_c=True)
    assert run.returncode == 0, run
    assert import_from_site(image_python, target, VERSION_OF.format("kasprdemo")) == "1.0"


def test_under_takeover_the_operators_status_marker_is_written_after_success(image_python, pypi, env, target,
                                                                           termlog):
    cfg = config(target, pypi.url, ["kasprdemo==1.0"], credentials=True)
    run = run_installer(image_python, cfg, dict(with_creds(env), PACKAGES_HASH="9f86d081884c7d65"), termlog)
    assert run.returncode == 0, run
    marker = json.loads((target / ".installed-9f86d081884c7d65").read_text())
    assert marker["packages"] == ["kasprdemo==1.0"] and marker["installKey"] == "0123456789abcdef"
    assert PASSWORD not in json.dumps(marker)
    # A failed install leaves no marker.
    failed = config(target, pypi.url, ["no-such-package==1.0"], credentials=True, installKey="00000000000000ff")
    run = run_installer(image_python, failed, dict(with_creds(env), PACKAGES_HASH="0000000000000001"), termlog)
    assert run.returncode != 0
    assert not (target / ".installed-0000000000000001").exists()


def test_restart_in_same_pod_reuses_the_build(image_python, pypi, env, target, termlog):
    cfg = config(target, pypi.url, ["kasprdemo==1.0"], credentials=True)
    first = run_installer(image_python, cfg, with_creds(env), termlog)
    assert first.returncode == 0, first
    second = run_installer(image_python, cfg, with_creds(env), termlog)
    assert second.returncode == 0, second
    assert second.lines("skipping pip") and not second.lines("pip: ")
    assert import_from_site(image_python, target, VERSION_OF.format("kasprdemo")) == "1.0"


def test_new_install_key_replaces_the_previous_build(image_python, pypi, env, target, termlog):
    first = run_installer(image_python, config(target, pypi.url, ["kasprdemo==1.0"], credentials=True),
                          with_creds(env), termlog)
    assert first.returncode == 0, first
    cfg = config(target, pypi.url, ["kasprdemo==2.0"], credentials=True, installKey="fedcba9876543210")
    second = run_installer(image_python, cfg, with_creds(env), termlog)
    assert second.returncode == 0, second
    assert import_from_site(image_python, target, VERSION_OF.format("kasprdemo")) == "2.0"
    assert len(os.listdir(target / ".builds")) == 1


def test_extras_and_markers(image_python, pypi, env, target, termlog):
    cfg = config(target, pypi.url, [
        'kasprextra[feat]==1.0; python_version >= "3.9"',
        'needsbase2==1.0; python_version < "3"',  # marker false: not installed at all
    ], credentials=True)
    run = run_installer(image_python, cfg, with_creds(env), termlog)
    assert run.returncode == 0, run
    assert site_dists(target) == ["kasprdemo-2.0.dist-info", "kasprextra-1.0.dist-info"]


# ---------------------------------------------------------------------------------- dependency safety

def test_dependency_satisfied_by_image_is_not_installed(image_python, pypi, env, target, termlog):
    cfg = config(target, pypi.url, ["needsbase==1.0"], credentials=True)
    run = run_installer(image_python, cfg, with_creds(env), termlog)
    assert run.returncode == 0, run
    assert site_dists(target) == ["needsbase-1.0.dist-info"]
    assert not run.lines("override:")
    assert import_from_site(image_python, target, VERSION_OF.format("basedep")) == "1.0"


def test_needed_other_version_is_logged_as_override(image_python, pypi, env, target, termlog):
    cfg = config(target, pypi.url, ["needsbase2==1.0"], credentials=True)
    run = run_installer(image_python, cfg, with_creds(env), termlog)
    assert run.returncode == 0, run
    assert run.lines("override: basedep 1.0 -> 2.0"), run
    assert "overrides: basedep 1.0 -> 2.0" in termlog.read_text()
    assert site_dists(target) == ["basedep-2.0.dist-info", "needsbase2-1.0.dist-info"]
    assert import_from_site(image_python, target, VERSION_OF.format("basedep")) == "2.0"


def test_everything_satisfied_installs_nothing(image_python, pypi, env, target, termlog):
    cfg = config(target, pypi.url, ["basedep>=1.0"], credentials=True)
    run = run_installer(image_python, cfg, with_creds(env), termlog)
    assert run.returncode == 0, run
    assert run.lines("already satisfied by the image")
    assert site_dists(target) == []


# ---------------------------------------------------------------------------------- failures

def assert_failed(run, termlog, category):
    assert run.returncode == EXIT[category], run
    summary = [line for line in run.stdout.splitlines() if line.startswith("kaspr-packages: FAILED")]
    assert len(summary) == 1 and summary[0].startswith("kaspr-packages: FAILED %s: " % category), run
    assert termlog.read_text().strip() == summary[0]


def test_package_not_found(image_python, pypi, env, target, termlog):
    cfg = config(target, pypi.url, ["nosuchpkg==1.0"], credentials=True)
    assert_failed(run_installer(image_python, cfg, with_creds(env), termlog), termlog, "package_not_found")


def test_hash_in_a_name_is_not_an_integrity_error(image_python, pypi, env, target, termlog):
    cfg = config(target, pypi.url, ["hash-mismatch-sha256==1.0"], credentials=True)
    assert_failed(run_installer(image_python, cfg, with_creds(env), termlog), termlog, "package_not_found")


def test_version_not_available_is_not_found(image_python, pypi, env, target, termlog):
    cfg = config(target, pypi.url, ["kasprdemo==9.9"], credentials=True)
    assert_failed(run_installer(image_python, cfg, with_creds(env), termlog), termlog, "package_not_found")


def test_hash_mismatch_is_integrity(image_python, wheels, env, target, termlog):
    _, built = wheels
    index = StaticIndex({"kasprdemo": built["kasprdemo"]}, bad_hash=["kasprdemo"])
    try:
        cfg = config(target, index.url, ["kasprdemo==1.0"])
        assert_failed(run_installer(image_python, cfg, env, termlog), termlog, "integrity")
    finally:
        index.stop()


def test_wrong_password_is_authentication(image_python, pypi, env, target, termlog):
    cfg = config(target, pypi.url, ["kasprdemo==1.0"], credentials=True)
    run = run_installer(image_python, cfg, with_creds(env, PLAIN_USER, "wrong"), termlog)
    assert_failed(run, termlog, "authentication")


def test_missing_credentials_is_authentication(image_python, pypi, env, target, termlog):
    cfg = config(target, pypi.url, ["kasprdemo==1.0"])
    assert_failed(run_installer(image_python, cfg, env, termlog), termlog, "authentication")


def test_unreachable_index_is_network(image_python, env, target, termlog):
    cfg = config(target, closed_port_url(), ["kasprdemo==1.0"])
    assert_failed(run_installer(image_python, cfg, env, termlog), termlog, "network")


def test_timeout_kills_pip_and_retries_with_backoff(image_python, env, target, termlog):
    hole = BlackHole()
    try:
        cfg = config(target, hole.url, ["kasprdemo==1.0"], retries=2, timeoutSeconds=2)
        run = run_installer(image_python, cfg, env, termlog, timeout=120)
    finally:
        hole.stop()
    assert_failed(run, termlog, "timeout")
    assert [l.split("kaspr-packages: ")[1][:12] for l in run.lines("failed after")] == [
        "attempt 1/3 ", "attempt 2/3 ", "attempt 3/3 "]
    assert len(run.lines("retrying in")) == 2
    # Each attempt is cut at its limit; pip's own read timeout (5s here) would be later.
    assert run.duration < 3 * 2 + 15, run.duration
    assert not [c for c in process_cmdlines() if str(target) in c], "pip's process group was killed"


def test_allow_exits_zero_and_says_app_starts_without_packages(image_python, pypi, env, target, termlog):
    cfg = config(target, pypi.url, ["nosuchpkg==1.0"], credentials=True, onFailure="allow", retries=1)
    run = run_installer(image_python, cfg, with_creds(env), termlog)
    assert run.returncode == 0, run
    assert "FAILED package_not_found" in termlog.read_text()
    assert "starts without packages" in termlog.read_text()
    assert len(run.lines("attempt ")) >= 2


@pytest.mark.parametrize("change, field", [
    ({"packages": []}, "packages"),
    ({"packages": ["--index-url=http://evil/simple"]}, "packages[0]"),
    ({"packages": ["ok", "x --hash=sha256:00"]}, "packages[1]"),
    ({"installKey": "XYZ"}, "installKey"),
    ({"mode": "hostPath"}, "mode"),
    ({"retries": True}, "retries"),
    ({"timeoutSeconds": 0}, "timeoutSeconds"),
    ({"indexUrl": "ftp://host/simple"}, "indexUrl"),
    ({"target": "relative/dir"}, "target"),
    ({"version": 2}, "version"),
    ({"mode": "pvc"}, "cacheDir"),
    ({"mode": "gcs"}, "gcs"),
])
def test_invalid_config_names_the_field(image_python, env, target, termlog, change, field):
    cfg = config(target, None, ["kasprdemo==1.0"])
    cfg.update(change)
    run = run_installer(image_python, cfg, env, termlog)
    assert_failed(run, termlog, "invalid_config")
    assert "invalid_config: %s: " % field in run.stdout, run
    assert "Traceback" not in run.stdout


@pytest.mark.parametrize("raw, message", [
    ("", "KASPR_PACKAGES_CONFIG is not set"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
])
def test_unreadable_config(image_python, env, target, termlog, raw, message):
    run = run_installer(image_python, raw, env, termlog)
    assert_failed(run, termlog, "invalid_config")
    assert message in run.stdout and "Traceback" not in run.stdout


def test_invalid_config_with_allow_exits_zero(image_python, env, target, termlog):
    cfg = config(target, None, ["kasprdemo==1.0"], installKey="nope", onFailure="allow")
    run = run_installer(image_python, cfg, env, termlog)
    assert run.returncode == 0 and "FAILED invalid_config" in termlog.read_text(), run


def test_unset_variable_is_invalid_config(image_python, pypi, env, target, termlog):
    cfg = config(target, pypi.url, ["kasprdemo @ http://127.0.0.1:1/${NOT_SET_ANYWHERE}/x.whl"],
                 expandEnv=["NOT_SET_ANYWHERE"])
    run = run_installer(image_python, cfg, env, termlog)
    assert_failed(run, termlog, "invalid_config")
    assert "packages[0]: environment variable NOT_SET_ANYWHERE is not set" in run.stdout


@pytest.mark.parametrize("declared", [[], ["KASPR_PYPI_PASSWORD"]])
def test_own_credentials_are_never_expanded(image_python, wheels, env, target, termlog, declared):
    """A requirement naming the password variable must not send it anywhere, even if the
    config (written by hand, or by an older renderer) lists it."""
    _, built = wheels
    other = StaticIndex({"kasprdemo": built["kasprdemo"]}, host="127.0.0.2")
    try:
        url = "http://127.0.0.2:%d/files/${KASPR_PYPI_PASSWORD}/kasprdemo-1.0-py3-none-any.whl" % other.port
        cfg = config(target, None, ["kasprdemo @ " + url], expandEnv=declared)
        run = run_installer(image_python, cfg, with_creds(env, USER, PASSWORD), termlog)
    finally:
        other.stop()
    assert_failed(run, termlog, "invalid_config")
    assert "packages[0]: ${KASPR_PYPI_PASSWORD} is not a variable declared for expansion" in run.stdout
    assert other.requests == []
    assert PASSWORD not in run.stdout


def test_unwritable_termination_log_is_ignored(image_python, pypi, env, target, tmp_path):
    cfg = config(target, pypi.url, ["kasprdemo==1.0"], credentials=True)
    run = run_installer(image_python, cfg, with_creds(env), tmp_path / "no" / "such" / "dir" / "log")
    assert run.returncode == 0, run


# ---------------------------------------------------------------------------------- secrets

def test_special_character_credentials_work(image_python, pypi, env, target, termlog):
    cfg = config(target, pypi.url, ["kasprdemo==1.0"], credentials=True)
    run = run_installer(image_python, cfg, with_creds(env, USER, PASSWORD), termlog)
    assert run.returncode == 0, run


def secret_forms(*secrets):
    from urllib.parse import quote, quote_plus
    forms = set()
    for s in secrets:
        forms |= {s, quote(s, safe=""), quote(s), quote_plus(s)}
    return forms


def test_credentials_never_in_argv_output_or_files(image_python, pypi, env, target, termlog):
    cfg = config(target, pypi.url, ["kasprdemo==1.0", "needsbase"], credentials=True)
    proc = start_installer(image_python, cfg, with_creds(env, USER, PASSWORD), termlog)
    seen = []
    chunks = []
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        seen += [c for c in process_cmdlines() if "pip" in c and str(target) in c]
        time.sleep(0.005)
    proc.wait(timeout=10)
    reader.join(timeout=10)
    output = b"".join(chunks).decode()
    assert proc.returncode == 0, output
    assert seen, "pip was observed running"
    # Distinctive parts of the secrets (whole strings could be too short to be meaningful).
    for form in secret_forms(USER, PASSWORD, "p@ss: /#?%&;$ word"):
        assert all(form not in c for c in seen), "secret in a pip argv"
        assert form not in output
        assert form not in termlog.read_text()
        assert form.encode() not in all_files_text(target)


def test_other_host_never_receives_credentials(image_python, pypi, wheels, tmp_path, env, target, termlog):
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    otherpkg = make_wheel(other_dir, "otherpkg", "1.0")
    other = StaticIndex({"otherpkg": [otherpkg]}, host="127.0.0.2")
    try:
        cfg = config(target, pypi.url, ["kasprdemo==1.0", "otherpkg==1.0"], credentials=True,
                     extraIndexUrls=[other.url])
        run = run_installer(image_python, cfg, with_creds(env), termlog)
    finally:
        other.stop()
    assert run.returncode == 0, run
    assert import_from_site(image_python, target, VERSION_OF.format("otherpkg")) == "1.0"
    assert any(r["path"].startswith("/files/otherpkg") for r in other.requests), other.requests
    assert [r for r in other.requests if r["authorization"]] == []


def test_variable_expansion_value_never_leaks(image_python, wheels, tmp_path, env, target, termlog):
    token = "tok-9f8e7d6c5b4a-secret"
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    wheel = make_wheel(tok_dir, "kasprtok", "1.0")
    index = StaticIndex({"kasprtok": [wheel]}, host="127.0.0.2", token=token)
    try:
        url = index.file_url(wheel, token="${KASPR_TEST_TOKEN}")
        cfg = config(target, index.url, ["kasprtok @ " + url], expandEnv=["KASPR_TEST_TOKEN"])
        env = dict(env, KASPR_TEST_TOKEN=token)
        run = run_installer(image_python, cfg, env, termlog)
    finally:
        index.stop()
    assert run.returncode == 0, run
    assert any(r["path"] == "/t/%s/%s" % (token, wheel.name) for r in index.requests)
    assert import_from_site(image_python, target, VERSION_OF.format("kasprtok")) == "1.0"
    assert run.lines("requirement: kasprtok @ http://127.0.0.2:%d/t/${KASPR_TEST_TOKEN}/" % index.port)
    assert token not in run.stdout
    assert token not in termlog.read_text()
    assert token.encode() not in all_files_text(target)
    direct = json.loads((target / "site" / "kasprtok-1.0.dist-info" / "direct_url.json").read_text())
    assert "***" in direct["url"]


def test_full_volume_is_disk_full(image_python, pypi, wheels, tmp_path, env, termlog):
    """A target volume too small for the package: pip hits ENOSPC."""
    import base64
    import subprocess
    root, _ = wheels
    # ~1.3 MB of incompressible module text: larger than the 512 KiB volume below.
    make_wheel(root, "kasprbig", "1.0", module_text="DATA = %r\n" % base64.b64encode(os.urandom(1 << 20)).decode())
    volume = tmp_path / "volume"
    volume.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(volume)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here: %s" % mounted.stderr.decode().strip())
    try:
        cfg = config(volume / "packages", pypi.url, ["kasprbig==1.0"], credentials=True)
        run = run_installer(image_python, cfg, with_creds(env), termlog)
    finally:
        subprocess.run(["umount", "-l", str(volume)], check=False)
    assert_failed(run, termlog, "disk_full")
