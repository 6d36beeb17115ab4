"""PVC mode: shared immutable builds, one builder at a time, leases and pruning."""

import fcntl
import json
import os
import signal
import subprocess
import time

from conftest import with_creds
from helpers import (
    EXIT, INSTALLER, BlackHole, config, import_from_site, process_cmdlines, run_installer,
    start_installer,
)

KEY_A, KEY_B, KEY_C, KEY_D = "aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb", "cccccccccccccccc", "dddddddddddddddd"


def tag_of(python):
    # The build identity the installer uses for packages without ${VAR} in this image.
    code = ("import runpy; i = runpy.run_path(%r, run_name='probe'); "
            "print(i['build_tag'](i['installed_distributions'](), [], []))") % str(INSTALLER)
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def pvc_config(tmp_path, pod, index_url, packages, key=KEY_A, **extra):
    return config(tmp_path / pod, index_url, packages, mode="pvc", cacheDir=str(tmp_path / "cache"),
                  installKey=key, credentials=True, **extra)


def pod_env(env, pod):
    return dict(with_creds(env), HOSTNAME=pod)


def install(image_python, tmp_path, env, pypi, pod, packages, key=KEY_A, extra_env=None):
    cfg = pvc_config(tmp_path, pod, pypi.url, packages, key=key)
    run_env = dict(pod_env(env, pod), **(extra_env or {}))
    return run_installer(image_python, cfg, run_env, tmp_path / (pod + ".termlog"))


def test_eight_pods_at_once_build_once(image_python, pypi, env, tmp_path):
    procs = []
    for i in range(8):
        pod = "app-%d" % i
        cfg = pvc_config(tmp_path, pod, pypi.url, ["kasprdemo==2.0", "needsbase"])
        procs.append(start_installer(image_python, cfg, pod_env(env, pod), tmp_path / (pod + ".log")))
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=180)
        outputs.append(out.decode())
        assert proc.returncode == 0, out.decode()
    assert sum("resolving against" in out for out in outputs) == 1, "exactly one pod ran pip"
    assert sum("published build" in out for out in outputs) == 1
    build = tmp_path / "cache" / KEY_A / tag_of(image_python)
    for i in range(8):
        site = tmp_path / ("app-%d" % i) / "site"
        assert os.readlink(site) == str(build)
        assert import_from_site(image_python, tmp_path / ("app-%d" % i), "import kasprdemo; print(kasprdemo.VERSION)") == "2.0"
    assert sorted(os.listdir(tmp_path / "cache" / "leases")) == sorted("app-%d.json" % i for i in range(8))


def test_warm_restart_uses_build_without_the_lock(image_python, pypi, env, tmp_path):
    first = install(image_python, tmp_path, env, pypi, "app-0", ["kasprdemo==1.0"])
    assert first.returncode == 0, first
    lock_path = tmp_path / "cache" / KEY_A / (".%s.lock" % tag_of(image_python))
    with open(lock_path, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a builder holds the lock: the fast path must not wait
        second = install(image_python, tmp_path, env, pypi, "app-1", ["kasprdemo==1.0"],
                         extra_env={"KASPR_PACKAGES_LOCK_TIMEOUT": "30"})
    assert second.returncode == 0, second
    assert second.lines("found in the cache; skipping pip") and not second.lines("pip: ")
    assert second.duration < 10
    assert lock_path.exists(), "lock files are never deleted"


def test_killed_builder_leaves_no_half_build(image_python, pypi, env, tmp_path):
    hole = BlackHole()
    try:
        cfg = pvc_config(tmp_path, "app-0", hole.url, ["kasprdemo==1.0"])
        proc = start_installer(image_python, cfg, pod_env(env, "app-0"), tmp_path / "t.log")
        key_dir = tmp_path / "cache" / KEY_A
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(str(tmp_path / "app-0") in c and "pip" in c for c in process_cmdlines()):
            time.sleep(0.05)
        # A pod kill takes every process in the container: the installer and pip's group.
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        for pid in os.listdir("/proc"):
            try:
                if pid.isdigit() and str(tmp_path / "app-0").encode() in open("/proc/%s/cmdline" % pid, "rb").read():
                    os.killpg(int(pid), signal.SIGKILL)
            except OSError:
                pass
    finally:
        hole.stop()
    leftovers = os.listdir(key_dir)
    assert any(e.startswith(".tmp-") for e in leftovers), leftovers
    assert tag_of(image_python) not in leftovers, "no build was published"

    run = install(image_python, tmp_path, env, pypi, "app-1", ["kasprdemo==1.0"])
    assert run.returncode == 0, run
    assert run.lines("removing unfinished build")
    assert not [e for e in os.listdir(key_dir) if e.startswith(".tmp-")]
    assert import_from_site(image_python, tmp_path / "app-1", "import kasprdemo; print(kasprdemo.VERSION)") == "1.0"


def test_build_of_another_python_is_left_alone(image_python, pypi, env, tmp_path):
    other = tmp_path / "cache" / KEY_A / "cpython-399-linux-aarch64-glibc2.17"
    other.mkdir(parents=True)
    (other / ".kaspr-build.json").write_text(json.dumps({"installKey": KEY_A, "pythonTag": other.name}))
    (other / "marker.py").write_text("X = 1\n")
    before = sorted(os.listdir(other))
    run = install(image_python, tmp_path, env, pypi, "app-0", ["kasprdemo==1.0"])
    assert run.returncode == 0, run
    assert run.lines("published build")
    assert sorted(os.listdir(other)) == before
    assert os.readlink(tmp_path / "app-0" / "site") != str(other)


def test_running_pod_keeps_its_build_and_old_builds_are_pruned(image_python, pypi, env, tmp_path):
    prune = {"KASPR_PACKAGES_PRUNE_GRACE_SECONDS": "0"}
    cache = tmp_path / "cache"
    tag = tag_of(image_python)
    assert install(image_python, tmp_path, env, pypi, "old-pod", ["kasprdemo==1.0"], KEY_A, prune).returncode == 0
    assert install(image_python, tmp_path, env, pypi, "pod-2", ["kasprdemo==2.0"], KEY_B, prune).returncode == 0
    time.sleep(0.05)
    # pod-2 restarts with new packages: its lease moves from B to C, so B is unreferenced.
    assert install(image_python, tmp_path, env, pypi, "pod-2", ["needsbase==1.0"], KEY_C, prune).returncode == 0
    time.sleep(0.05)
    run = install(image_python, tmp_path, env, pypi, "pod-3", ["basedep==2.0"], KEY_D, prune)
    assert run.returncode == 0, run
    assert run.lines("pruned unused build %s/%s" % (KEY_B, tag))
    assert not (cache / KEY_B / tag).exists()
    for key in (KEY_A, KEY_C, KEY_D):
        assert (cache / key / tag).is_dir(), key
    # The long-running pod on key A still imports from its build.
    assert import_from_site(image_python, tmp_path / "old-pod", "import kasprdemo; print(kasprdemo.VERSION)") == "1.0"


def test_lock_held_too_long_falls_back_to_the_pods_own_volume(image_python, pypi, env, tmp_path):
    """A builder that holds the lock past its worst case does not keep the pod from starting:
    the pod installs into its own volume and says that its cache was off, and why."""
    key_dir = tmp_path / "cache" / KEY_A
    key_dir.mkdir(parents=True)
    with open(key_dir / (".%s.lock" % tag_of(image_python)), "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        run = install(image_python, tmp_path, env, pypi, "app-0", ["kasprdemo==1.0"],
                      extra_env={"KASPR_PACKAGES_LOCK_TIMEOUT": "1"})
    assert run.returncode == 0, run
    summary = (tmp_path / "app-0.termlog").read_text()
    assert summary.startswith("kaspr-packages: OK 1 packages"), summary
    assert "(cache off: lock timeout: another pod held the build lock for %s/" % KEY_A in summary, summary
    assert run.lines("warning: cache off: lock timeout")
    assert run.duration < 30
    site = os.readlink(tmp_path / "app-0" / "site")
    assert site.startswith(str(tmp_path / "app-0" / ".builds")), site
    assert import_from_site(image_python, tmp_path / "app-0", "import kasprdemo; print(kasprdemo.VERSION)") == "1.0"
    assert not (key_dir / tag_of(image_python)).exists(), "nothing was published without the lock"


def test_unusable_cache_dir_is_cache_error(image_python, pypi, env, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = pvc_config(tmp_path, "app-0", pypi.url, ["kasprdemo==1.0"])
    cfg["cacheDir"] = str(blocker / "cache")
    run = run_installer(image_python, cfg, pod_env(env, "app-0"), tmp_path / "t.log")
    assert run.returncode == EXIT["cache_error"], run
    assert "FAILED cache_error: cannot use cache directory %s" % (blocker / "cache") in run.termination, run


def test_pods_sharing_a_hostname_keep_their_own_leases(image_python, pypi, env, tmp_path):
    """Two pods with one hostname (pod.spec.hostname) but different uids hold two leases; the
    build each one uses stays referenced."""
    keep = {"KASPR_PACKAGES_PRUNE_GRACE_SECONDS": "3600"}
    prune = {"KASPR_PACKAGES_PRUNE_GRACE_SECONDS": "0"}
    cache = tmp_path / "cache"
    tag = tag_of(image_python)
    first = install(image_python, tmp_path, env, pypi, "shared", ["kasprdemo==1.0"], KEY_A,
                    dict(keep, KASPR_PACKAGES_POD_UID="11111111-aaaa-4aaa-8aaa-111111111111"))
    assert first.returncode == 0, first
    # The twin has its own volume (target) but the same hostname.
    twin_cfg = pvc_config(tmp_path, "twin", pypi.url, ["kasprdemo==2.0"], key=KEY_B)
    second = run_installer(image_python, twin_cfg,
                           dict(pod_env(env, "shared"), KASPR_PACKAGES_POD_UID="22222222-bbbb-4bbb-8bbb-222222222222",
                                **keep), tmp_path / "twin.termlog")
    assert second.returncode == 0, second
    leases = {}
    for entry in os.listdir(cache / "leases"):
        leases[entry] = json.loads((cache / "leases" / entry).read_text())["build"]
    assert sorted(leases.values()) == sorted(["%s/%s" % (KEY_A, tag), "%s/%s" % (KEY_B, tag)]), leases
    # Once the grace period is over (0 here), two more builds make A and B prunable unless
    # referenced: the newest lease of "shared" (B's pod) keeps B; A's lease is older than the
    # grace period and its pod name has a newer lease, so its pod is taken as gone and A goes.
    for pod, packages, key in (("other-1", ["needsbase==1.0"], KEY_C), ("other-2", ["basedep==2.0"], KEY_D)):
        time.sleep(1.1)
        assert install(image_python, tmp_path, env, pypi, pod, packages, key, prune).returncode == 0
    assert (cache / KEY_B / tag).is_dir()
    assert not (cache / KEY_A / tag).exists()
    assert len([e for e in os.listdir(cache / "leases") if e.startswith("shared.")]) == 1
