"""Package sets: build mode (resolve -> lock -> install from the lock -> publish) and restore
mode (the built set from the cache, or exactly the locked set with hash checking)."""

import hashlib
import os
import runpy
import threading
import time

import pytest

from conftest import PASSWORD, USER, with_creds
from gcs.servers import FakeGcs, TokenEndpoint, make_keypair, write_key_file
from helpers import (
    EXIT, INSTALLER, StaticIndex, closed_port_url, config, import_from_site, make_wheel,
    run_installer,
)

SET_A = "5e7a000000000001"
SET_B = "5e7a000000000002"
KEY = "0123456789abcdef"
EMAIL = "kaspr-cache@test-project.iam.gserviceaccount.com"


@pytest.fixture
def index(tmp_path):
    """A loopback index (127.0.0.2) whose wheel set a test can grow, recording every request."""
    root = tmp_path / "wheels"
    root.mkdir()
    served = StaticIndex({
        "kasprdemo": [make_wheel(root, "kasprdemo", "1.0"), make_wheel(root, "kasprdemo", "2.0")],
        "needsbase": [make_wheel(root, "needsbase", "1.0", requires=["basedep>=1.0"])],
        "needsnew": [make_wheel(root, "needsnew", "1.0", requires=["basedep>=2.0"])],
        "basedep": [make_wheel(root, "basedep", "1.0"), make_wheel(root, "basedep", "2.0")],
    })
    served.root = root
    yield served
    served.stop()


def build_cfg(tmp_path, pod, index_url, packages, set_id=SET_A, mode="emptyDir", **extra):
    cfg = config(tmp_path / pod, index_url, packages, mode=mode, installKey=KEY,
                 build={"set": set_id, "lockFile": str(tmp_path / ("%s.pylock.toml" % set_id))}, **extra)
    if mode == "pvc":
        cfg["cacheDir"] = str(tmp_path / "cache")
    return cfg


def restore_cfg(tmp_path, pod, index_url, packages, set_id=SET_A, mode="emptyDir", lock=None, **extra):
    lock = lock or str(tmp_path / ("%s.pylock.toml" % set_id))
    cfg = config(tmp_path / pod, index_url, packages, mode=mode, installKey=KEY,
                 restore={"set": set_id, "lockFile": lock}, **extra)
    if mode == "pvc":
        cfg["cacheDir"] = str(tmp_path / "cache")
    return cfg


def file_downloads(index):
    return [r["path"] for r in index.requests if r["path"].startswith("/files/")]


def installer_module():
    return runpy.run_path(str(INSTALLER), run_name="kaspr_installer")


def module_sha(target, module):
    return hashlib.sha256((target / "site" / module / "__init__.py").read_bytes()).hexdigest()


def test_build_fetches_each_distribution_once_and_locks_exact_files(image_python, index, env, tmp_path):
    cfg = build_cfg(tmp_path, "job", index.url, ["kasprdemo", "needsbase"])
    run = run_installer(image_python, cfg, env, tmp_path / "job.log")
    assert run.returncode == 0, run
    downloads = file_downloads(index)
    assert sorted(downloads) == sorted(set(downloads)), "a file was fetched twice: %s" % downloads
    # basedep 1.0 comes with the image: the set is what the image lacks.
    assert sorted(downloads) == ["/files/basedep-2.0-py3-none-any.whl", "/files/kasprdemo-2.0-py3-none-any.whl",
                                 "/files/needsbase-1.0-py3-none-any.whl"]
    lock_text = (tmp_path / ("%s.pylock.toml" % SET_A)).read_text()
    lock = installer_module()["parse_lock"](lock_text)
    assert lock["lock-version"] == "1.0"
    entries = {p["name"]: p for p in lock["packages"]}
    assert {n: p["version"] for n, p in entries.items()} == {"kasprdemo": "2.0", "needsbase": "1.0"}
    wheel = entries["kasprdemo"]["wheels"][0]
    served = index.root / "kasprdemo-2.0-py3-none-any.whl"
    assert wheel["hashes"]["sha256"] == hashlib.sha256(served.read_bytes()).hexdigest()
    assert wheel["url"] == index.file_url(served)
    assert entries["kasprdemo"]["index"] == index.url
    assert lock["tool"]["kaspr-packages"]["set"] == SET_A
    # The job's own install is the locked set, and the log carries the lock for the controller.
    assert import_from_site(image_python, tmp_path / "job", "import kasprdemo; print(kasprdemo.VERSION)") == "2.0"
    assert installer_module()["extract_printed_lock"](run.stdout) == lock_text
    assert "lock sha256 %s" % hashlib.sha256(lock_text.encode()).hexdigest() in run.termination


def test_every_pod_restores_the_same_set_after_a_newer_release(image_python, index, env, tmp_path):
    packages = ["kasprdemo<9"]
    index.wheels["kasprdemo"] = [index.wheels["kasprdemo"][0]]  # only 1.0 released so far
    built = run_installer(image_python, build_cfg(tmp_path, "job", index.url, packages), env, tmp_path / "b.log")
    assert built.returncode == 0, built
    first = run_installer(image_python, restore_cfg(tmp_path, "pod-0", index.url, packages), env, tmp_path / "0.log")
    assert first.returncode == 0, first
    # Days later: a newer release of the unpinned requirement appears on the index.
    index.wheels["kasprdemo"].append(make_wheel(index.root, "kasprdemo", "2.0"))
    later = run_installer(image_python, restore_cfg(tmp_path, "pod-1", index.url, packages), env, tmp_path / "1.log")
    assert later.returncode == 0, later
    for pod in ("pod-0", "pod-1"):
        assert import_from_site(image_python, tmp_path / pod, "import kasprdemo; print(kasprdemo.VERSION)") == "1.0"
    assert module_sha(tmp_path / "pod-0", "kasprdemo") == module_sha(tmp_path / "pod-1", "kasprdemo")
    assert later.lines("hash-checked, no resolution")
    # Without the lock, the same configuration now resolves to the newer release.
    fresh = run_installer(image_python, build_cfg(tmp_path, "job2", index.url, packages, set_id=SET_B),
                          env, tmp_path / "b2.log")
    assert fresh.returncode == 0, fresh
    assert import_from_site(image_python, tmp_path / "job2", "import kasprdemo; print(kasprdemo.VERSION)") == "2.0"


def test_pvc_pods_restore_the_built_set_with_the_index_down(image_python, pypi, env, tmp_path):
    packages = ["kasprdemo", "needsbase"]
    job_env = with_creds(env, USER, PASSWORD)
    built = run_installer(image_python, build_cfg(tmp_path, "job", pypi.url, packages, mode="pvc", credentials=True),
                          job_env, tmp_path / "b.log")
    assert built.returncode == 0, built
    down = closed_port_url()
    for pod in ("app-0", "app-1"):
        run = run_installer(image_python, restore_cfg(tmp_path, pod, down, packages, mode="pvc"),
                            dict(env, HOSTNAME=pod), tmp_path / (pod + ".log"))
        assert run.returncode == 0, run
        assert run.lines("restored from the cache") and not run.lines("pip:")
        site = os.readlink(tmp_path / pod / "site")
        assert site.startswith(str(tmp_path / "cache" / "sets" / SET_A)), site
        assert import_from_site(image_python, tmp_path / pod, "import kasprdemo; print(kasprdemo.VERSION)") == "2.0"


def test_a_build_prunes_published_sets_no_longer_kept_unless_a_pod_uses_them(image_python, index, env, tmp_path):
    set_c, set_d = "5e7a000000000003", "5e7a000000000004"
    sets = tmp_path / "cache" / "sets"
    packages = ["kasprdemo==1.0"]

    def build(set_id, keep, grace):
        cfg = build_cfg(tmp_path, "job-" + set_id, index.url, packages, set_id=set_id, mode="pvc")
        if keep is not None:
            cfg["build"]["keep"] = keep
        run_env = dict(env) if grace is None else dict(env, KASPR_PACKAGES_PRUNE_GRACE_SECONDS=grace)
        run = run_installer(image_python, cfg, run_env, tmp_path / ("b-%s.log" % set_id))
        assert run.returncode == 0, run
        return run

    def restore(pod, set_id):
        cfg = restore_cfg(tmp_path, pod, index.url, packages, set_id=set_id, mode="pvc")
        run = run_installer(image_python, cfg, dict(env, HOSTNAME=pod), tmp_path / ("%s-%s.log" % (pod, set_id)))
        assert run.returncode == 0 and run.lines("restored from the cache"), run

    build(SET_A, None, None)
    build(SET_B, None, None)  # a Job of a controller that passes no list prunes nothing
    assert sorted(os.listdir(sets)) == [SET_A, SET_B]
    restore("app-0", SET_B)
    # Within the grace period nothing goes: the list may predate a set published since.
    build(set_c, [], None)
    assert sorted(os.listdir(sets)) == [SET_A, SET_B, set_c]
    # Past it: A (no pod) goes; B stays, app-0's lease uses it.
    run = build(set_c, [], "0")
    assert sorted(os.listdir(sets)) == [SET_B, set_c], run
    assert run.lines("pruned set %s" % SET_A) and run.lines("keeping set %s: a pod's lease" % SET_B)
    # app-0 restarts on C: its lease moves, and B goes at the next build that does not keep it,
    # while a listed set stays whoever uses it.
    restore("app-0", set_c)
    build(set_d, [set_c], "0")
    assert sorted(os.listdir(sets)) == [set_c, set_d]
    assert not [e for e in os.listdir(tmp_path / "cache") if e.startswith(".trash-")]
    assert import_from_site(image_python, tmp_path / "app-0", "import kasprdemo; print(kasprdemo.VERSION)") == "1.0"


@pytest.fixture
def gcs_bucket(env, tmp_path):
    """fake-gcs-server with the bucket `kaspr-sets` and a verifying token endpoint: (server,
    the installer's `gcs` settings, the environment pointing at the server)."""
    server = FakeGcs(tmp_path / "fake-gcs.log")
    private, public = make_keypair(tmp_path)
    endpoint = TokenEndpoint(public, EMAIL)
    try:
        key_file = write_key_file(tmp_path, private, endpoint.token_uri, EMAIL)
        server.create_bucket("kaspr-sets")
        gcs = {"bucket": "kaspr-sets", "prefix": "kaspr-packages/", "keyFile": str(key_file)}
        yield server, gcs, dict(env, STORAGE_EMULATOR_HOST=server.url, KASPR_PACKAGES_GCS_TIMEOUT="3")
    finally:
        endpoint.stop()
        server.stop()


def test_gcs_pods_restore_the_built_set_with_the_index_down(image_python, pypi, gcs_bucket, tmp_path):
    _, gcs, gcs_env = gcs_bucket
    packages = ["kasprdemo==2.0"]
    built = run_installer(image_python, build_cfg(tmp_path, "job", pypi.url, packages, mode="gcs", gcs=gcs,
                                                  credentials=True),
                          with_creds(gcs_env), tmp_path / "b.log")
    assert built.returncode == 0, built
    assert built.lines("uploaded gs://kaspr-sets/kaspr-packages/default/my-app/sets/%s/" % SET_A)
    run = run_installer(image_python, restore_cfg(tmp_path, "app-0", closed_port_url(), packages, mode="gcs",
                                                  gcs=gcs),
                        gcs_env, tmp_path / "r.log")
    assert run.returncode == 0, run
    assert run.lines("restored from the bucket") and not run.lines("pip:")
    assert import_from_site(image_python, tmp_path / "app-0", "import kasprdemo; print(kasprdemo.VERSION)") == "2.0"


def test_a_gcs_build_prunes_archives_no_longer_kept(image_python, index, gcs_bucket, tmp_path):
    set_c = "5e7a000000000003"
    server, gcs, gcs_env = gcs_bucket
    ours = "kaspr-packages/default/my-app/sets/"
    # Neither another app's set nor a pod's own archive (no builds) is the build's to prune.
    others = ["kaspr-packages/default/other-app/sets/%s/x.tar.gz" % SET_A,
              "kaspr-packages/default/my-app/%s/x.tar.gz" % KEY]
    for name in others:
        server.put("kaspr-sets", name, b"not ours")

    def build(set_id, keep, grace):
        cfg = build_cfg(tmp_path, "job-" + set_id, index.url, ["kasprdemo==1.0"], set_id=set_id, mode="gcs", gcs=gcs)
        if keep is not None:
            cfg["build"]["keep"] = keep
        run_env = gcs_env if grace is None else dict(gcs_env, KASPR_PACKAGES_PRUNE_GRACE_SECONDS=grace)
        run = run_installer(image_python, cfg, run_env, tmp_path / ("b-%s.log" % set_id))
        assert run.returncode == 0, run
        return run

    def sets():
        return sorted(name[len(ours):].split("/")[0] for name in server.list("kaspr-sets") if name.startswith(ours))

    build(SET_A, None, None)
    build(SET_B, None, None)  # a Job of a controller that passes no list prunes nothing
    assert sets() == [SET_A, SET_B]
    # Within the grace period nothing goes: the list may predate a set published since.
    build(set_c, [SET_B], None)
    assert sets() == [SET_A, SET_B, set_c]
    # Past it, only what the list keeps (and this build's own set) stays.
    run = build(set_c, [SET_B], "0")
    assert sets() == [SET_B, set_c], run
    assert run.lines("pruned gs://kaspr-sets/%s%s/" % (ours, SET_A)), run
    assert sorted(n for n in server.list("kaspr-sets") if not n.startswith(ours)) == sorted(others)


def test_emptydir_restore_installs_the_locked_set_with_hash_checking(image_python, index, env, tmp_path):
    packages = ["kasprdemo"]
    assert run_installer(image_python, build_cfg(tmp_path, "job", index.url, packages), env,
                         tmp_path / "b.log").returncode == 0
    lock = tmp_path / ("%s.pylock.toml" % SET_A)
    served = index.root / "kasprdemo-2.0-py3-none-any.whl"
    good = hashlib.sha256(served.read_bytes()).hexdigest()
    tampered = tmp_path / "tampered.toml"
    tampered.write_text(lock.read_text().replace(good, "0" * 64))
    run = run_installer(image_python, restore_cfg(tmp_path, "pod", index.url, packages, lock=str(tampered)),
                        env, tmp_path / "r.log")
    assert run.returncode == EXIT["integrity"], run
    assert "FAILED integrity" in run.termination
    assert not (tmp_path / "pod" / "site").exists()


def test_typo_in_a_version_fails_the_build_with_its_category(image_python, index, env, tmp_path):
    run = run_installer(image_python, build_cfg(tmp_path, "job", index.url, ["kasprdemo==2.0.0.1"]), env,
                        tmp_path / "b.log")
    assert run.returncode == EXIT["package_not_found"], run
    assert run.termination.startswith("kaspr-packages: FAILED package_not_found: ")
    assert "kasprdemo==2.0.0.1" in run.termination
    assert not (tmp_path / ("%s.pylock.toml" % SET_A)).exists()
    assert "LOCK BEGIN" not in run.stdout


def test_lock_contains_no_credentials(image_python, pypi, index, env, tmp_path, wheels):
    _, built = wheels
    token = "tok-s3cret-value"
    index.token = token
    index.wheels["kasprextra"] = [make_wheel(index.root, "kasprextra", "1.0")]
    extra = index.root / "kasprextra-1.0-py3-none-any.whl"
    packages = ["kasprdemo==1.0", "kasprextra @ %s" % index.file_url(extra, "${TOKEN}")]
    cfg = build_cfg(tmp_path, "job", pypi.url, packages, credentials=True, expandEnv=["TOKEN"])
    run = run_installer(image_python, cfg, dict(with_creds(env, USER, PASSWORD), TOKEN=token), tmp_path / "b.log")
    assert run.returncode == 0, run
    lock = (tmp_path / ("%s.pylock.toml" % SET_A)).read_text()
    for secret in (USER, PASSWORD, token, "alice", "correct-horse"):
        assert secret not in lock
    assert "kasprextra" in lock and pypi.url in lock
    # The lock restores the direct reference through the pod's own (expanded) package string.
    restore = restore_cfg(tmp_path, "pod", pypi.url, packages, credentials=True, expandEnv=["TOKEN"])
    run = run_installer(image_python, restore, dict(with_creds(env, USER, PASSWORD), TOKEN=token), tmp_path / "r.log")
    assert run.returncode == 0, run
    assert token not in run.stdout


def test_restore_waits_for_the_set_and_gives_up_with_a_category(image_python, index, env, tmp_path):
    packages = ["kasprdemo==1.0"]
    missing = run_installer(image_python, restore_cfg(tmp_path, "pod-0", index.url, packages), env, tmp_path / "0.log")
    assert missing.returncode == EXIT["lock_timeout"], missing
    assert "set %s is not built yet" % SET_A in missing.termination
    # First deployment: the pod waits for the set its template names, then restores it.
    cfg = restore_cfg(tmp_path, "pod-1", index.url, packages)
    cfg["restore"]["awaitSeconds"] = 120
    result = {}
    waiter = threading.Thread(target=lambda: result.update(run=run_installer(image_python, cfg, env, tmp_path / "1.log")))
    waiter.start()
    time.sleep(1.0)
    built = run_installer(image_python, build_cfg(tmp_path, "job", index.url, packages), env, tmp_path / "b.log")
    assert built.returncode == 0, built
    waiter.join(timeout=180)
    assert result["run"].returncode == 0, result["run"]
    assert result["run"].lines("waiting up to 120s for set")


def test_vcs_requirements_cannot_be_built(image_python, index, env, tmp_path):
    run = run_installer(image_python, build_cfg(tmp_path, "job", index.url, ["pkg @ git+https://git.example/x.git@v1"]),
                        env, tmp_path / "b.log")
    assert run.returncode == EXIT["invalid_config"], run
    assert "VCS requirement" in run.termination


@pytest.mark.parametrize("bad, message", [
    ({"build": {"set": "XYZ"}}, 'build.set: "XYZ" is not 16 lowercase hex'),
    ({"restore": {"set": SET_A}}, "restore.lockFile: is required"),
    ({"restore": {"set": SET_A, "lockFile": "rel/lock"}}, 'restore.lockFile: "rel/lock" is not an absolute path'),
    ({"build": {"set": SET_A}, "restore": {"set": SET_A, "lockFile": "/x"}}, "restore: cannot be combined with build"),
    ({"build": {"set": SET_A, "keep": "all"}}, 'build.keep: expected a list, got "all"'),
    ({"build": {"set": SET_A, "keep": [SET_B, "old"]}}, 'build.keep[1]: "old" is not 16 lowercase hex'),
])
def test_bad_set_config_names_field_and_value(image_python, env, tmp_path, bad, message):
    cfg = config(tmp_path / "pod", None, ["kasprdemo"], **bad)
    run = run_installer(image_python, cfg, env, tmp_path / "t.log")
    assert run.returncode == EXIT["invalid_config"], run
    assert message in run.termination


def test_lock_subset_reader_agrees_with_tomllib():
    tomllib = pytest.importorskip("tomllib")
    mod = installer_module()
    dist = mod["LockedDist"]
    dists = [dist("Zeta_pkg", "1.0.post1", "wheel", "zeta_pkg-1.0.post1-py3-none-any.whl", "a" * 64,
                  "https://h/p/zeta_pkg-1.0.post1-py3-none-any.whl", "https://h/simple/"),
             dist("alpha", "2!3.0+local", "sdist", "alpha-3.0.tar.gz", "b" * 64),
             dist("direct", "0.1", "archive", "", "c" * 64, 'https://h/x"quoted"\u00e9\\.zip')]
    text = mod["render_lock"](dists, SET_A, KEY, "cpython-311-x")
    assert mod["_parse_lock_subset"](text) == tomllib.loads(text)
    names = [d.name for d in mod["lock_dists"](tomllib.loads(text))]
    assert names == ["alpha", "direct", "Zeta_pkg"]


def test_printed_lock_round_trips_and_rejects_a_changed_lock(capsys):
    mod = installer_module()
    mod["print_lock"]("lock-version = \"1.0\"\n" * 300)
    out = capsys.readouterr().out
    assert mod["extract_printed_lock"](out) == "lock-version = \"1.0\"\n" * 300
    lines = out.splitlines()
    lines[2] = lines[2][:-1] + ("A" if lines[2][-1] != "A" else "B")
    assert mod["extract_printed_lock"]("\n".join(lines)) is None
