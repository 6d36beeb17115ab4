"""Unit tests of the installer's pure functions (the program imported as a module)."""

import importlib.util
import json
import os
import re
import urllib.parse

import pytest

from helpers import INSTALLER

spec = importlib.util.spec_from_file_location("kaspr_installer", INSTALLER)
installer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(installer)


@pytest.mark.parametrize("output, category", [
    (["ERROR: THESE PACKAGES DO NOT MATCH THE HASHES FROM THE REQUIREMENTS FILE."], "integrity"),
    (["ERROR: No matching distribution found for hashlib-compat-sha256"], "package_not_found"),
    (["Collecting hash-utils", "ERROR: Could not find a version that satisfies the requirement x"], "package_not_found"),
    (["WARNING: Retrying (Retry(total=4)) after connection broken by 'NewConnectionError('<...>: Failed to establish a new connection: [Errno 111] Connection refused')'",
      "ERROR: No matching distribution found for x"], "network"),
    (["ERROR: HTTP error 401 while getting https://h/x.whl"], "authentication"),
    (["ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device"], "disk_full"),
    (["ERROR: Cannot install a==1 and b==2 because these package versions have conflicting dependencies."], "package_not_found"),
    (["something else entirely"], "unknown"),
])
def test_classify(output, category):
    assert installer.classify(output) == category


def test_redactor_removes_raw_and_encoded_forms():
    r = installer.Redactor()
    r.add("p@ss word/x")
    text = "a p@ss word/x b %s c %s" % (urllib.parse.quote("p@ss word/x", safe=""), urllib.parse.quote_plus("p@ss word/x"))
    assert r(text) == "a *** b *** c ***"


def test_netrc_entry_parses_back_every_printable_character(tmp_path):
    import netrc
    printable = "".join(chr(c) for c in range(32, 127))
    text = installer.netrc_entry("idx.example", printable, printable)
    if text is None:
        pytest.skip("this Python's netrc cannot hold such values; the installer refuses them")
    (tmp_path / "netrc").write_text(text)
    login, _account, password = netrc.netrc(str(tmp_path / "netrc")).authenticators("idx.example")
    assert (login, password) == (printable, printable)


@pytest.mark.parametrize("a, b, same", [
    ("https://h.example/simple", "https://h.example:8443/other", True),
    ("https://h.example/simple", "https://H.EXAMPLE/simple", True),
    ("https://h.example/simple", "https://other.example/simple", False),
    ("https://h.example.evil/simple", "https://h.example/simple", False),
])
def test_same_host(a, b, same):
    assert installer.same_host(a, b) is same


def test_backoff_doubles_from_base_and_caps_at_30s():
    assert [installer.backoff_delay(n, {}) for n in range(1, 7)] == [2, 4, 8, 16, 30, 30]
    assert installer.backoff_delay(3, {"KASPR_PACKAGES_BACKOFF_BASE": "0.5"}) == 2.0


def test_python_tag_names_interpreter_and_platform():
    import sys
    tag = installer.python_tag()
    assert tag.startswith("%s-%d%d" % (sys.implementation.name, *sys.version_info[:2]))
    assert "linux" in tag


@pytest.mark.parametrize("requirement, identity", [
    ("x @ git+https://tok@host/org/x.git@v1", "https://host/org/x.git"),
    ("git+ssh://git@host/org/x.git@v1#egg=x", "ssh://host/org/x.git"),
    ("tok @ https://h/path/x-1.0-py3-none-any.whl#sha256=00", "https://h/path/x-1.0-py3-none-any.whl"),
])
def test_url_identity_ignores_userinfo_revision_and_fragment(requirement, identity):
    assert installer.url_identity(installer.requirement_url(requirement)) == identity


@pytest.mark.parametrize("requirement, url", [
    ("requests==2.31.0", None),
    ('mylib[extra]>=1.2; python_version >= "3.9"', None),
    ("x[a,b] @ https://h/x.whl ; python_version > '3'", "https://h/x.whl"),
    ("git@github.com:org/x.git", "git@github.com:org/x.git"),
    ("x @ git@github.com:org/x.git", "git@github.com:org/x.git"),
])
def test_requirement_url(requirement, url):
    assert installer.requirement_url(requirement) == url


def test_plan_pins_index_packages_and_keeps_direct_requirements():
    report = {"install": [
        {"metadata": {"name": "basedep", "version": "2.0"}, "is_direct": False, "download_info": {"url": "https://i/basedep-2.0.whl"}},
        {"metadata": {"name": "x", "version": "1.0"}, "is_direct": True, "requested": True,
         "download_info": {"url": "https://host/org/x.git", "vcs_info": {"vcs": "git", "commit_id": "abc"}}},
    ]}
    expanded = ["x @ git+https://secret@host/org/x.git@v1"]
    plan = installer.plan_from_report(json.dumps(report), expanded, {"basedep": "1.0"})
    assert plan.lines == ["basedep==2.0", "x @ git+https://secret@host/org/x.git@v1"]
    assert plan.overrides == ["basedep 1.0 -> 2.0"]


def test_config_defaults_and_unknown_keys():
    cfg = installer.load_config({"KASPR_PACKAGES_CONFIG": json.dumps({
        "version": 1, "mode": "emptyDir", "app": "a", "namespace": "ns", "installKey": "0" * 16,
        "packages": ["x"], "target": "/t", "brandNew": 1})})
    assert (cfg.retries, cfg.timeout, cfg.on_failure, cfg.index_url) == (3, 600.0, "block", None)
    # An unknown key (a newer webhook's setting) is ignored: accepted, and not kept anywhere.
    assert "brandNew" not in vars(cfg) and "brand_new" not in vars(cfg)
    assert cfg.packages == ["x"] and cfg.expand_env == []


def test_source_is_python_3_9_syntax():
    import ast
    ast.parse(INSTALLER.read_text(), feature_version=(3, 9))


def test_program_uses_only_the_standard_library():
    import ast
    import sys
    tree = ast.parse(INSTALLER.read_text())
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert modules <= set(sys.stdlib_module_names), modules - set(sys.stdlib_module_names)


@pytest.mark.parametrize("written, handed_to_pip", [
    ("git@github.com:org/repo.git", "git+ssh://git@github.com/org/repo.git"),
    ("mylib @ git@github.com:org/repo.git@v1 ; python_version >= '3.8'",
     "mylib @ git+ssh://git@github.com/org/repo.git@v1 ; python_version >= '3.8'"),
    ("ssh://git@example.com/org/repo.git", "git+ssh://git@example.com/org/repo.git"),
    ("git+ssh://git@example.com/org/repo.git", "git+ssh://git@example.com/org/repo.git"),
    ("requests==2.31.0", "requests==2.31.0"),
])
def test_git_over_ssh_reaches_pip_in_the_form_pip_knows(written, handed_to_pip):
    assert installer.pip_requirement(written) == handed_to_pip


def test_a_backslash_never_reaches_the_requirements_file():
    with pytest.raises(installer.InstallError) as failure:
        installer._check_package("foo===1\\", "packages[0]")
    assert failure.value.category == "invalid_config"


# ---------------------------------------------------------------------------------- archives

def _tar(path, entries):
    """A tar.gz of (name, kind, payload) entries, in order: kind is file, dir, sym, hard or fifo."""
    import io
    import tarfile
    with tarfile.open(path, "w:gz") as tar:
        for name, kind, payload in entries:
            info = tarfile.TarInfo(name)
            data = None
            if kind == "file":
                data = payload.encode() if isinstance(payload, str) else payload
                info.size = len(data)
                info.mode = 0o644
            elif kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, payload
            elif kind == "hard":
                info.type, info.linkname = tarfile.LNKTYPE, payload
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


@pytest.fixture
def no_data_filter(monkeypatch):
    """Python 3.9.0-3.9.16, 3.10.0-3.10.11 and 3.11.0-3.11.3 have no tarfile data filter."""
    monkeypatch.delattr(installer.tarfile, "data_filter", raising=False)


def test_a_symlink_chain_cannot_carry_a_write_outside_the_build(tmp_path, no_data_filter):
    # Checked by name alone every member stays inside; extracted in order, the second link
    # leads four levels up from three levels deep, and the file is written through it.
    dest = tmp_path / "a" / "build"
    dest.mkdir(parents=True)
    archive = _tar(tmp_path / "x.tar.gz", [
        ("p/q/r", "dir", None),
        ("p/q/r/here", "sym", "."),
        ("p/q/r/out", "sym", "here/../../../../escaped.txt"),
        ("p/q/r/out", "file", "written outside"),
    ])
    with pytest.raises(installer.GcsError):
        installer.safe_extract(str(archive), str(dest), 1 << 20)
    assert not (tmp_path / "a" / "escaped.txt").exists()
    assert not any(p.name == "escaped.txt" for p in tmp_path.rglob("*"))


@pytest.mark.parametrize("entries, why", [
    ([("/etc/passwd", "file", "x")], "absolute"),
    ([("../up.txt", "file", "x")], "'..'"),
    ([("a/../../up.txt", "file", "x")], "'..'"),
    ([("l", "sym", "/etc")], "outside"),
    ([("l", "sym", "../x")], "outside"),
    ([("l", "sym", "."), ("l/f", "file", "x")], "through a link"),
    ([("f", "file", "x"), ("h", "hard", "f")], "not a file"),
    ([("pipe", "fifo", None)], "not a file"),
    ([("f", "file", "x"), ("f", "file", "y")], "twice"),
])
def test_unsafe_members_are_refused(tmp_path, no_data_filter, entries, why):
    dest = tmp_path / "build"
    dest.mkdir()
    archive = _tar(tmp_path / "x.tar.gz", entries)
    with pytest.raises(installer.GcsError) as failure:
        installer.safe_extract(str(archive), str(dest), 1 << 20)
    assert why in str(failure.value)


def test_extracted_content_is_capped(tmp_path, no_data_filter):
    dest = tmp_path / "build"
    dest.mkdir()
    archive = _tar(tmp_path / "x.tar.gz", [("a", "file", b"0" * 600), ("b", "file", b"0" * 600)])
    with pytest.raises(installer.GcsError) as failure:
        installer.safe_extract(str(archive), str(dest), 1000)
    assert "over 1000 bytes" in str(failure.value)


def test_a_build_made_by_the_installer_round_trips(tmp_path, no_data_filter):
    build = tmp_path / "build"
    (build / "site" / "pkg").mkdir(parents=True)
    (build / "site" / "pkg" / "__init__.py").write_text("VERSION = '1.0'\n")
    (build / "bin").mkdir()
    (build / "bin" / "tool").write_text("#!/bin/sh\n")
    (build / "bin" / "tool").chmod(0o755)
    (build / "current").symlink_to("site")
    archive = tmp_path / "b.tar.gz"
    installer.make_archive(str(build), str(archive))
    out = tmp_path / "out"
    out.mkdir()
    installer.safe_extract(str(archive), str(out), 1 << 20)
    assert (out / "site" / "pkg" / "__init__.py").read_text() == "VERSION = '1.0'\n"
    assert os.readlink(out / "current") == "site"
    assert os.access(out / "bin" / "tool", os.X_OK)


def test_a_download_over_the_limit_is_refused():
    import io
    sink = io.BytesIO()
    capped = installer._CappedSink(sink, 10)
    capped.write(b"0123456789")
    with pytest.raises(installer.GcsError) as failure:
        capped.write(b"!")
    assert "maxArchiveSize" in str(failure.value)
    assert sink.getvalue() == b"0123456789"


def test_the_build_fingerprint_follows_the_image_and_expanded_values_without_showing_them():
    image = {"pip": "24.0", "requests": "2.31.0"}
    packages = ["x @ https://${TOKEN}@h/x-1.0-py3-none-any.whl", "a==1"]
    one = installer.build_fingerprint(image, packages, ["x @ https://s3cr3t@h/x-1.0-py3-none-any.whl", "a==1"])
    assert one == installer.build_fingerprint(dict(image), packages,
                                              ["x @ https://s3cr3t@h/x-1.0-py3-none-any.whl", "a==1"])
    assert re.fullmatch(r"[0-9a-f]{8}", one)
    other_value = installer.build_fingerprint(image, packages, ["x @ https://other@h/x-1.0-py3-none-any.whl", "a==1"])
    other_image = installer.build_fingerprint(dict(image, requests="2.32.0"), packages,
                                              ["x @ https://s3cr3t@h/x-1.0-py3-none-any.whl", "a==1"])
    assert len({one, other_value, other_image}) == 3
    # Without variables, only the image counts.
    plain = ["a==1"]
    assert installer.build_fingerprint(image, plain, plain) == installer.build_fingerprint(image, ["b==2"], ["b==2"])


def test_the_build_identity_carries_the_fingerprint(monkeypatch):
    cfg = installer.load_config({"KASPR_PACKAGES_CONFIG": json.dumps({
        "version": 1, "mode": "emptyDir", "app": "a", "namespace": "n", "installKey": "0123456789abcdef",
        "packages": ["a==1"], "target": "/tmp/kaspr-unused-target"})})
    first = installer.Context(cfg, {}).tag
    monkeypatch.setattr(installer, "installed_distributions", lambda: {"only-in-this-image": "1.0"})
    second = installer.Context(cfg, {}).tag
    assert first.startswith(installer.python_tag() + "-") and second.startswith(installer.python_tag() + "-")
    assert first != second



@pytest.mark.parametrize("password", ["with space", 'quote"d', "back\\slash", "hash#tag", ""])
def test_credentials_netrc_cannot_hold_are_refused_before_python_3_11(monkeypatch, password):
    class OldSys:
        version_info = (3, 10, 14)
    monkeypatch.setattr(installer, "sys", OldSys)
    cfg = installer.load_config({"KASPR_PACKAGES_CONFIG": json.dumps({
        "version": 1, "mode": "emptyDir", "app": "a", "namespace": "n", "installKey": "0123456789abcdef",
        "packages": ["a==1"], "target": "/tmp/kaspr-unused-target", "credentials": True,
        "indexUrl": "https://idx.example/simple/", "extraIndexUrls": ["https://idx.example/other/"]})})
    environ = {"KASPR_PYPI_USERNAME": "user", "KASPR_PYPI_PASSWORD": password}
    with pytest.raises(installer.InstallError) as failure:
        installer.index_settings(cfg, environ, installer.Redactor())
    assert failure.value.category == "invalid_config"
    assert "Python 3.10 cannot pass this username or password to pip safely" in failure.value.message
    assert not password or password not in failure.value.message
    # What netrc can hold still works, and no URL ever carries the credentials.
    settings = installer.index_settings(cfg, dict(environ, KASPR_PYPI_PASSWORD="plain-token"),
                                        installer.Redactor())
    assert settings.netrc == "machine idx.example login user password plain-token\n"
    assert settings.env["PIP_INDEX_URL"] == "https://idx.example/simple/"
    assert "plain-token" not in settings.env["PIP_EXTRA_INDEX_URL"]


def test_the_operator_marker_is_written_only_with_a_plain_packages_hash(tmp_path):
    cfg = installer.Config(target=str(tmp_path), install_key="0123456789abcdef", packages=["a==1", "b @ ${TOKEN}"])
    path = installer.write_operator_marker({"PACKAGES_HASH": "9f86d081884c7d65"}, cfg, 2.04)
    assert path == str(tmp_path / ".installed-9f86d081884c7d65")
    marker = json.loads((tmp_path / ".installed-9f86d081884c7d65").read_text())
    assert marker["hash"] == "9f86d081884c7d65" and marker["installKey"] == "0123456789abcdef"
    assert marker["packages"] == ["a==1", "b @ ${TOKEN}"], "as written, never expanded"
    assert marker["installDuration"] == "2.0s"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", marker["lastInstallTime"])
    # No hash (not taken over), or one that could leave the directory: nothing written.
    for environ in ({}, {"PACKAGES_HASH": ""}, {"PACKAGES_HASH": "../x"}, {"PACKAGES_HASH": ".."},
                    {"PACKAGES_HASH": "a/b"}):
        assert installer.write_operator_marker(environ, cfg, 1.0) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [".installed-9f86d081884c7d65"]


def test_a_lease_replaced_within_the_same_second_still_expires_the_older_one(tmp_path, monkeypatch):
    """Two leases of one pod name written 0.4 s apart: the older one is the replaced pod's and
    expires once past the grace period; the newer one stays."""
    leases = tmp_path / "leases"
    leases.mkdir()
    clock = [1_000_000.2]
    monkeypatch.setattr(installer.time, "time", lambda: clock[0])
    for uid, build, written in (("a", "A/t", 1_000_000.2), ("b", "B/t", 1_000_000.6)):
        clock[0] = written
        environ = {"HOSTNAME": "shared", "KASPR_PACKAGES_POD_UID": uid}
        ctx = type("Ctx", (), {})()
        ctx.environ = environ
        ctx.cache_group = None
        ctx.tag = "t"
        ctx.cfg = type("Cfg", (), {"cache_dir": str(tmp_path), "install_key": build.split("/")[0]})()
        (tmp_path / ctx.cfg.install_key).mkdir(exist_ok=True)
        installer.write_lease(ctx, build)
    clock[0] = 1_000_001.0
    assert installer.live_lease_builds(str(leases), 0.1) == {"B/t"}
    assert sorted(os.listdir(leases)) == ["shared.b.json"]


@pytest.mark.parametrize("text,expected", [
    ("2026-12-03T10:00:00Z", 1796292000.0),
    ("2026-12-03T10:00:00.123Z", 1796292000.0),
    ("2026-12-03T12:30:00+02:30", 1796292000.0),
    ("2026-12-03T07:00:00-03:00", 1796292000.0),
    ("2026-12-03 10:00:00Z", None),
    ("2026-13-03T10:00:00Z", None),
    ("", None),
    (None, None),
    (1796292000, None),
])
def test_rfc3339_timestamps_from_the_bucket(text, expected):
    assert installer.rfc3339_seconds(text) == expected
