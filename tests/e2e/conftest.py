"""Fixtures of the end-to-end suite: one control plane and node per session in a private
network namespace, the webhook, the package index, the pod runner and a namespace per test.

Environment:
  KASPR_E2E_BIN_DIR       directory with etcd, kube-apiserver, kube-controller-manager,
                          kube-scheduler, kubelet, kube-proxy, kubectl, helm (default:
                          built/cached by scripts/build-k8s-tools)
  KASPR_E2E_IMAGES_FILE   lines `ROLE ARCHIVE REFERENCE` naming the OCI archives the node
                          imports (roles: pause, app, webhook); scripts/test-e2e writes it
  KASPR_E2E_WEBHOOK_BIN   the webhook binary (default: target/debug/kaspr-packages-webhook)
  KASPR_E2E_IMAGE_PYTHON  interpreter that plays the app image's `python3` (default: a
                          virtualenv with only pip, made once from the test interpreter)
  KASPR_E2E_CONTAINERD_DIR  directory with containerd 2.x, ctr and containerd-shim-runc-v2
                          (scripts/build-containerd); unset: Debian's containerd from PATH,
                          and the image-mode tests are skipped
  KASPR_E2E_KEEP=1        leave the cluster running after the session, for debugging
  KASPR_E2E_RUN_FILE      file the harness writes its work directory into (scripts/test-e2e
                          uses it to clean up after an interrupted run)
"""

from __future__ import annotations

import atexit
import fcntl
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from e2e_cluster import ControlPlane, Tools, tail, wait_for
from e2e_gcs import GcsStandIn, start_gcs
from e2e_index import PackageIndex, start_index
from e2e_node import Node
from e2e_registry import Registry, start_registry
from e2e_webhook import MANIFESTS, Webhook, serve_help
from pod_runner import PodRunner

REPO = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("KASPR_CACHE_DIR", Path.home() / ".cache" / "kaspr-packages-webhook"))
KEEP = os.environ.get("KASPR_E2E_KEEP") == "1"


_KEPT: list[str] = []


def pytest_terminal_summary(terminalreporter):
    # After capture has ended, so the note shows whatever the tests' outcome.
    for note in _KEPT:
        terminalreporter.write_sep("=", "kept cluster")
        terminalreporter.write_line(note)


def _sigterm(signum, frame):  # noqa: ARG001
    # Turn SIGTERM into an interrupt so fixture finalizers tear the cluster down.
    raise KeyboardInterrupt


def pytest_configure(config):  # noqa: ARG001
    signal.signal(signal.SIGTERM, _sigterm)


# ---------------------------------------------------------------------------------------------
# Session: tools, control plane


@pytest.fixture(scope="session")
def tools() -> Tools:
    bin_dir = os.environ.get("KASPR_E2E_BIN_DIR")
    if not bin_dir:
        proc = subprocess.run([str(REPO / "scripts" / "build-k8s-tools")], capture_output=True, text=True,
                              timeout=4 * 3600)
        if proc.returncode != 0:
            pytest.fail(f"scripts/build-k8s-tools failed:\n{proc.stderr[-4000:]}")
        bin_dir = proc.stdout.strip().splitlines()[-1]
    return Tools(Path(bin_dir))


@dataclass(frozen=True)
class Image:
    archive: Path
    ref: str


@pytest.fixture(scope="session")
def images() -> dict[str, Image]:
    """The locally built images the node runs, by role (pause, app, webhook)."""
    listing = os.environ.get("KASPR_E2E_IMAGES_FILE")
    if not listing:
        pytest.fail("KASPR_E2E_IMAGES_FILE is not set: run the suite with scripts/test-e2e, which builds the images")
    found = {}
    for line in Path(listing).read_text().splitlines():
        if line.strip():
            role, archive, ref = line.split()
            found[role] = Image(Path(archive), ref)
    missing = {"pause", "app", "webhook"} - found.keys()
    if missing:
        pytest.fail(f"{listing} names no image for {sorted(missing)}")
    return found


@pytest.fixture(scope="session")
def e2e_workdir() -> Path:
    if os.geteuid() != 0:
        pytest.fail("the end-to-end suite needs root (network and mount namespaces)")
    for tool in ("ip", "unshare", "mount", "openssl"):
        if shutil.which(tool) is None:
            pytest.fail(f"the end-to-end suite needs `{tool}` on PATH")
    workdir = Path(tempfile.mkdtemp(prefix="kaspr-e2e-"))
    os.chmod(workdir, 0o755)
    run_file = os.environ.get("KASPR_E2E_RUN_FILE")
    if run_file:
        Path(run_file).write_text(f"{workdir}\n")
    yield workdir
    if not KEEP:
        shutil.rmtree(workdir, ignore_errors=True)


def _write_debug_helpers(cluster: ControlPlane) -> None:
    ns = cluster.netns.name
    kubectl = cluster.tools.path("kubectl")
    (cluster.workdir / "env.sh").write_text(
        "# source this file to use the kept cluster\n"
        f"export KUBECONFIG={shlex.quote(str(cluster.admin_kubeconfig))}\n"
        f"kubectl() {{ ip netns exec {ns} {kubectl} \"$@\"; }}\n"
        f"in_cluster_netns() {{ ip netns exec {ns} \"$@\"; }}\n"
    )
    teardown = cluster.workdir / "teardown.sh"
    node_dir = cluster.workdir / "node"
    teardown.write_text(
        "#!/bin/sh\n"
        "# Stops every process inside the test network namespace, sweeps away what the node left\n"
        "# on the host (containers, mounts, cgroups, sysctls), deletes the namespace and this directory.\n"
        f"ns={ns}\n"
        "for sig in TERM KILL; do\n"
        "  pids=$(ip netns pids \"$ns\" 2>/dev/null)\n"
        "  [ -z \"$pids\" ] && break\n"
        "  kill -s $sig $pids 2>/dev/null\n"
        "  sleep 2\n"
        "done\n"
        f"python3 {shlex.quote(str(Path(__file__).resolve().parent / 'e2e_node.py'))} sweep {shlex.quote(str(node_dir))}\n"
        "ip netns del \"$ns\" 2>/dev/null\n"
        f"rm -rf {shlex.quote(str(cluster.workdir))}\n"
    )
    teardown.chmod(0o755)


@pytest.fixture(scope="session")
def cluster(tools: Tools, e2e_workdir: Path, images: dict[str, Image]) -> ControlPlane:
    cp = ControlPlane.new(tools, e2e_workdir)
    containerd_dir = os.environ.get("KASPR_E2E_CONTAINERD_DIR")
    node = Node(cp, [images[role].archive for role in ("pause", "app", "webhook")],
                containerd_dir=Path(containerd_dir) if containerd_dir else None)
    if KEEP:
        _KEPT.append(
            f"KASPR_E2E_KEEP=1: cluster left running in network namespace {cp.netns.name}\n"
            f"  source {cp.workdir}/env.sh   # then: kubectl get pods -A\n"
            f"  logs in {cp.logs}\n"
            f"  {cp.workdir}/teardown.sh   # when done"
        )

    stopped = []

    def stop():
        if not KEEP and not stopped:
            stopped.append(True)
            try:
                node.stop()
            finally:
                cp.stop()

    atexit.register(stop)  # also on an interrupted session
    _write_debug_helpers(cp)  # before anything starts, so teardown.sh can clean up any failure
    try:
        cp.start()
        cp.kubectl(["apply", "-f", str(MANIFESTS / "kasprapp-crd.yaml")])
        cp.kubectl(["wait", "--for=condition=Established", "--timeout=60s", "crd/kasprapps.kaspr.io"], timeout=90)
        wait_for("the kasprapps API", lambda: cp.kubectl(["get", "kasprapps", "-A"], check=False).returncode == 0,
                 timeout=30)
        node.start()
        cp.node = node
    except BaseException:
        sys.stderr.write(cp.diagnostics() + "\n" + node.diagnostics() + "\n")
        stop()
        raise
    yield cp
    stop()


# ---------------------------------------------------------------------------------------------
# Session: Python, package index, pod runner


@pytest.fixture(scope="session")
def test_venv() -> Path:
    venv = Path(sys.prefix)
    if not (venv / "bin" / "pypi-server").exists():
        pytest.fail(f"pypi-server is not installed in {venv}; run the suite with scripts/python-env's venv")
    return venv


@pytest.fixture(scope="session")
def image_python() -> str:
    """The interpreter that plays the app image: a clean virtualenv with only pip (offline)."""
    chosen = os.environ.get("KASPR_E2E_IMAGE_PYTHON")
    if chosen:
        return chosen
    base = Path(getattr(sys, "_base_executable", sys.executable)).resolve()
    version = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    target = CACHE_DIR / "e2e-image-python" / version
    python = target / "bin" / "python3"

    def usable() -> bool:
        return python.exists() and subprocess.run([str(python), "-m", "pip", "--version"],
                                                  capture_output=True).returncode == 0

    if not usable():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Two suites starting at once must not build the same virtualenv side by side.
        with open(target.parent / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not usable():
                shutil.rmtree(target, ignore_errors=True)
                subprocess.run([str(base), "-m", "venv", str(target)], check=True, capture_output=True, timeout=300)
    return str(python)


@pytest.fixture(scope="session")
def package_index(cluster: ControlPlane, test_venv: Path, e2e_workdir: Path) -> PackageIndex:
    return start_index(cluster, test_venv, e2e_workdir / "index")


@pytest.fixture(scope="session")
def gcs(cluster: ControlPlane, e2e_workdir: Path) -> GcsStandIn:
    return start_gcs(cluster, e2e_workdir / "gcs")


@pytest.fixture(scope="session")
def registry(cluster: ControlPlane, e2e_workdir: Path) -> Registry:
    """The OCI registry image mode pushes to and the node pulls from; needs a node that mounts
    image volumes (containerd 2.x)."""
    if not cluster.node.mounts_image_volumes:
        pytest.skip("the node runs Debian's containerd 1.6, which cannot mount image volumes "
                    "(KASPR_E2E_CONTAINERD=debian)")
    served = start_registry(cluster, REPO, e2e_workdir / "registry")
    yield served
    served.stop()


@pytest.fixture(scope="session")
def pod_runner(cluster: ControlPlane, e2e_workdir: Path, image_python: str) -> PodRunner:
    return PodRunner(cluster.kubectl, cluster.netns.wrap, e2e_workdir / "pods", image_python)


# ---------------------------------------------------------------------------------------------
# Session: the webhook


@pytest.fixture(scope="session")
def webhook_binary() -> Path:
    binary = Path(os.environ.get("KASPR_E2E_WEBHOOK_BIN", REPO / "target" / "debug" / "kaspr-packages-webhook"))
    if serve_help(binary) is None:
        pytest.fail(f"{binary} has no working `serve` subcommand (build it with cargo build)")
    return binary


@pytest.fixture(scope="session")
def webhook(cluster: ControlPlane, webhook_binary: Path, e2e_workdir: Path) -> Webhook:
    least_privilege = os.environ.get("KASPR_E2E_WEBHOOK_ADMIN") != "1"
    hook = Webhook(cluster, webhook_binary, e2e_workdir / "webhook", least_privilege=least_privilege)
    try:
        hook.start()
        hook.register()
        hook.wait_effective()
    except BaseException:
        sys.stderr.write(tail(hook.log_path, 80) + "\n")
        raise
    yield hook
    if not KEEP:
        hook.stop()


# ---------------------------------------------------------------------------------------------
# Per test


@pytest.fixture
def namespace(cluster: ControlPlane, request) -> str:
    base = "".join(c if c.isalnum() else "-" for c in request.node.name.lower().removeprefix("test_"))[:40].strip("-")
    name = f"{base}-{secrets.token_hex(2)}"
    cluster.kubectl(["create", "namespace", name])
    cluster.wait_namespace_ready(name)
    yield name
    if not KEEP:
        cluster.kubectl(["delete", "namespace", name, "--wait=false"], check=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        cp = item.funcargs.get("cluster")
        if isinstance(cp, ControlPlane):
            node = getattr(cp, "node", None)
            report.sections.append(("control plane logs", cp.diagnostics() + ("\n" + node.diagnostics() if node else "")))

