"""PVC mode shared by pods of one app that run as different users of one group.

Each installer runs under `setpriv` as a container would: its own uid and primary gid, the
pod's fsGroup as a supplementary group, and no capability at all, not even as uid 0 (the
injected init container drops them), so only the modes and owners of the cache decide.
"""

import os
import stat
import subprocess

import pytest

from conftest import PLAIN_PASSWORD, PLAIN_USER, with_creds
from helpers import EXIT, User, base_env, config, import_from_site, run_installer
from test_pvc import KEY_A, KEY_B, KEY_C, KEY_D

GROUP = 1000
ROOT = User(0, 0, [GROUP])          # a root pod with fsGroup 1000
APP = User(1000, 1000, [GROUP])     # runAsUser/runAsGroup 1000, fsGroup 1000
OTHER = User(2000, 2000, [GROUP])   # another uid of the same app's group


def reachable(path, top):
    """Let other users traverse the test's private temporary directories from `top` down to
    `path`, as they would traverse a container's root filesystem. Nothing above `top` changes."""
    path, top = os.path.abspath(path), os.path.abspath(top)
    assert path == top or path.startswith(top + os.sep), (path, top)
    while True:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o001 == 0:
            os.chmod(path, mode | 0o001)
        if path == top:
            return
        path = os.path.dirname(path)


@pytest.fixture(scope="module")
def shared_python(tmp_path_factory, pypi):
    """The "image" for pods of several users: a venv of the system Python (the test runner's own
    Python may live where other users cannot read), with basedep 1.0 preinstalled."""
    system = "/usr/bin/python3"
    if not os.path.exists(system):
        pytest.skip("needs a system Python that every user can run (%s)" % system)
    root = tmp_path_factory.mktemp("shared-image")
    venv = root / "venv"
    subprocess.run([system, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    env = dict(base_env(root))
    env["PIP_INDEX_URL"] = "http://%s:%s@127.0.0.1:%d/simple/" % (PLAIN_USER, PLAIN_PASSWORD, pypi.port)
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-cache-dir", "basedep==1.0"],
                   check=True, env=env, timeout=300)
    reachable(venv, tmp_path_factory.getbasetemp().parent)
    return python


@pytest.fixture
def world(tmp_path, tmp_path_factory, shared_python):
    reachable(tmp_path, tmp_path_factory.getbasetemp().parent)
    for name in ("pods", "logs", "homes"):
        (tmp_path / name).mkdir()
        os.chmod(tmp_path / name, 0o1777)  # like /tmp: each pod writes its own entries
    return tmp_path


def cache_root(tmp_path, uid=0, gid=GROUP, mode=0o2775):
    """The cache volume's root as the kubelet leaves it with fsGroup ownership management, or as
    the storage admin prepares it (docs/caches.md)."""
    root = tmp_path / "cache"
    root.mkdir()
    os.chown(root, uid, gid)
    os.chmod(root, mode)
    return root


def install(image_python, world, pypi, env, user, pod, packages, key, grace=None):
    target = world / "pods" / ("%s-%d" % (pod, len(os.listdir(world / "pods"))))
    target.mkdir()
    os.chmod(target, 0o777)  # the pod's emptyDir
    home = world / "homes" / target.name
    home.mkdir()
    os.chown(home, user.uid, user.gid)
    cfg = config(target, pypi.url, packages, mode="pvc", cacheDir=str(world / "cache"), installKey=key,
                 credentials=True)
    run_env = dict(with_creds(env), HOSTNAME=pod, HOME=str(home))
    if grace is not None:
        run_env["KASPR_PACKAGES_PRUNE_GRACE_SECONDS"] = str(grace)
    run = run_installer(image_python, cfg, run_env, world / "logs" / (target.name + ".termlog"), user=user)
    run.target = target
    return run


def assert_shared(root, group=GROUP):
    """Everything in the cache below its root is of the app's group: directories setgid and
    group-writable, files group-readable, lock files group-writable."""
    problems = []
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                continue
            mode = stat.S_IMODE(st.st_mode)
            if st.st_gid != group:
                problems.append("%s: group %d" % (path, st.st_gid))
            if stat.S_ISDIR(st.st_mode) and mode & 0o2070 != 0o2070:
                problems.append("%s: directory mode %04o" % (path, mode))
            if stat.S_ISREG(st.st_mode):
                wanted = 0o060 if name.endswith(".lock") else 0o040
                if mode & wanted != wanted:
                    problems.append("%s: file mode %04o" % (path, mode))
    assert not problems, "\n".join(problems)


def assert_ok(run):
    assert run.returncode == 0, run.stdout
    assert "cache off" not in run.termination, run


def tag_from(run):
    return run.lines(" OK ")[0].split(", ")[2]


def imports(image_python, run, version):
    assert import_from_site(image_python, run.target, "import kasprdemo; print(kasprdemo.VERSION)") == version


def test_root_pod_then_non_root_pods_share_builds_locks_leases(shared_python, pypi, env, world):
    cache = cache_root(world)
    first = install(shared_python, world, pypi, env, ROOT, "app-0", ["kasprdemo==1.0"], KEY_A)
    assert_ok(first)
    tag = tag_from(first)
    assert first.lines("published build")
    # The same pod restarts with new packages: its lease moves on, A is no longer referenced.
    moved = install(shared_python, world, pypi, env, ROOT, "app-0", ["kasprdemo==2.0"], KEY_B)
    assert_ok(moved)

    # uid 1000 builds under a lock file and a key directory of its own, takes the prune lock
    # root created, and prunes root's unreferenced build A (grace 0, keeping the two newest).
    third = install(shared_python, world, pypi, env, APP, "app-1", ["needsbase==1.0"], KEY_C, grace=0)
    assert_ok(third)
    assert tag_from(third) == tag, "one image gives one build identity whoever runs it"
    assert third.lines("pruned unused build %s/%s" % (KEY_A, tag)), third
    assert not (cache / KEY_A / tag).exists()

    # uid 2000 uses root's build B without pip, and replaces the lease root wrote for app-0.
    reuse = install(shared_python, world, pypi, env, OTHER, "app-2", ["kasprdemo==2.0"], KEY_B)
    assert_ok(reuse)
    assert reuse.lines("found in the cache; skipping pip") and not reuse.lines("pip: "), reuse
    imports(shared_python, reuse, "2.0")
    renewed = install(shared_python, world, pypi, env, OTHER, "app-0", ["basedep==2.0"], KEY_D)
    assert_ok(renewed)
    lease = cache / "leases" / "app-0.json"
    assert os.stat(lease).st_uid == OTHER.uid and KEY_D in lease.read_text()
    assert_shared(cache)


def test_non_root_pod_then_root_pod_share_the_cache(shared_python, pypi, env, world):
    cache = cache_root(world)
    first = install(shared_python, world, pypi, env, APP, "app-0", ["kasprdemo==1.0"], KEY_A)
    assert_ok(first)
    assert first.lines("published build")
    # A root pod without capabilities may write only what the group may write.
    warm = install(shared_python, world, pypi, env, ROOT, "app-1", ["kasprdemo==1.0"], KEY_A)
    assert_ok(warm)
    assert warm.lines("found in the cache; skipping pip") and not warm.lines("pip: "), warm
    imports(shared_python, warm, "1.0")
    built = install(shared_python, world, pypi, env, ROOT, "app-0", ["kasprdemo==2.0"], KEY_B)
    assert_ok(built)
    assert built.lines("published build")
    again = install(shared_python, world, pypi, env, APP, "app-0", ["kasprdemo==2.0"], KEY_B)
    assert_ok(again)
    assert not again.lines("pip: ")
    imports(shared_python, again, "2.0")
    assert_shared(cache)


def test_a_root_owned_by_the_first_uid_is_opened_to_its_group(shared_python, pypi, env, world):
    """A volume root given to uid 1000 alone (0755, what a storage admin often does) becomes
    2775 when that uid first uses it, so another uid of the group can share the cache."""
    cache = cache_root(world, uid=1000, gid=1000, mode=0o755)
    first = install(shared_python, world, pypi, env, APP, "app-0", ["kasprdemo==1.0"], KEY_A)
    assert_ok(first)
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o2775
    other = install(shared_python, world, pypi, env, OTHER, "app-1", ["kasprdemo==2.0"], KEY_B)
    assert_ok(other)
    assert other.lines("published build")
    assert_shared(cache)


def test_unwritable_root_names_the_user_and_what_it_found(shared_python, pypi, env, world):
    cache_root(world, uid=0, gid=0, mode=0o755)
    run = install(shared_python, world, pypi, env, APP, "app-0", ["kasprdemo==1.0"], KEY_A)
    assert run.returncode == EXIT["cache_error"], run
    message = run.termination
    assert "FAILED cache_error: cannot use cache directory %s" % (world / "cache") in message, message
    assert "Permission denied" in message
    assert "this pod runs as uid 1000 gid 1000 (groups 1000)" in message, message
    assert "%s is owned by uid 0 gid 0 with mode 0755" % (world / "cache") in message, message
    assert "chmod 2775" in message
