"""A real Kubernetes node inside the test's network namespace: containerd (2.4, built from the
Go module proxy by scripts/build-containerd, or Debian's 1.6 when asked for), runc from
Debian's packages, the CNI bridge plugins, and the kubelet, kube-scheduler and kube-proxy
built from the same pinned release as the control plane.

With containerd 2.x the node mounts image volumes (`volumes[].image`) and pulls them from the
registry inside the namespace (`REGISTRY_HOST`, plain HTTP, through a `hosts.toml` under the
CRI images plugin's `config_path`).

Pods get addresses on the `cni0` bridge (10.244.0.0/24); the bridge, the veths and every
address live inside the namespace, which has no route out, so nothing a pod does can leave the
machine. Images are never pulled: they are built locally as OCI archives and imported.

Leaving nothing behind is part of the contract (see `Node.stop`): containers live in their own
namespaces and cgroups, so stopping the namespace's processes is not enough.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Sequence

from e2e_cluster import (
    NODE_IP,
    POD_CIDR,
    ControlPlane,
    E2EError,
    Process,
    make_cert,
    run,
    tail,
    wait_for,
    write_kubeconfig,
)

NODE_NAME = "kaspr-e2e-node"
# The OCI registry inside the namespace (see e2e_registry.py); the node pulls from it over HTTP.
REGISTRY_HOST = f"{NODE_IP}:5000"
# containerd's sandbox image; the locally built pause image is imported under this reference.
SANDBOX_IMAGE = "registry.k8s.io/pause:3.10"
CNI_BIN_DIR = Path("/usr/lib/cni")
# What a kubelet changes host-wide (they are not per network namespace); restored on stop.
HOST_SYSCTLS = ("vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops")
# Paths outside the node's state directory that a kubelet, containerd or the CNI plugins
# create whatever they are told; removed on stop when this node created them.
FIXED_PATHS = (
    Path("/var/lib/kubelet"),
    Path("/var/log/containers"),
    Path("/var/log/pods"),
    Path("/var/lib/cni"),
    Path("/run/containerd"),
    Path("/etc/cni"),
    Path("/opt/cni"),
)
CGROUP_ROOT = Path("/sys/fs/cgroup")


def read_host_sysctls() -> dict[str, str]:
    values = {}
    for key in HOST_SYSCTLS:
        try:
            values[key] = (Path("/proc/sys") / key).read_text().strip()
        except OSError:
            pass
    return values


def kubepods_cgroups() -> list[Path]:
    """Every `kubepods` cgroup directory the kubelet made, across the v1 hierarchies."""
    found = []
    if not CGROUP_ROOT.is_dir():
        return found
    for hierarchy in CGROUP_ROOT.iterdir():
        candidate = hierarchy / "kubepods"
        if candidate.is_dir():
            found.append(candidate)
    return found


def mounts_under(prefix: Path) -> list[str]:
    """Mount points at or below `prefix` in this mount namespace, deepest first."""
    points = []
    with open("/proc/self/mountinfo") as info:
        for line in info:
            point = line.split()[4].replace("\\040", " ")
            if point == str(prefix) or point.startswith(str(prefix) + "/"):
                points.append(point)
    return sorted(points, key=lambda p: p.count("/"), reverse=True)


class Node:
    """containerd + kubelet + kube-scheduler + kube-proxy for one ControlPlane."""

    def __init__(self, cluster: ControlPlane, images: Sequence[Path], containerd_dir: Path | None = None):
        """`containerd_dir` holds containerd, ctr and containerd-shim-runc-v2 (containerd 2.x,
        scripts/build-containerd); None runs Debian's containerd from PATH."""
        self.cluster = cluster
        self.dir = cluster.workdir / "node"
        self.images = list(images)
        self.containerd_dir = containerd_dir
        self.processes: list[Process] = []
        self.containerd: Process | None = None
        self.kubelet: Process | None = None

    # -- layout ------------------------------------------------------------------------------
    @property
    def socket(self) -> Path:
        return self.dir / "containerd" / "containerd.sock"

    def tool(self, name: str) -> str:
        """containerd's own programs: from `containerd_dir`, else from PATH."""
        return str(self.containerd_dir / name) if self.containerd_dir else name

    @property
    def mounts_image_volumes(self) -> bool:
        """containerd 2.1+ mounts image volumes; Debian's 1.6 does not."""
        return self.containerd_dir is not None

    def enter(self, args: Sequence[str]) -> list[str]:
        # Not `ip netns exec`: it remounts /sys, which hides the cgroup mounts the kubelet and
        # runc need. nsenter joins only the network namespace.
        return ["nsenter", f"--net=/run/netns/{self.cluster.netns.name}", *args]

    def spawn(self, name: str, args: Sequence[str], env: dict[str, str] | None = None) -> Process:
        proc = Process(name, self.enter(args), self.cluster.logs / f"{name}.log", env=env)
        proc.start()
        self.processes.append(proc)
        return proc

    def ctr(self, args: Sequence[str], timeout: float = 120) -> subprocess.CompletedProcess:
        return run([self.tool("ctr"), "--address", str(self.socket), "-n", "k8s.io", *args], timeout=timeout)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        for tool in (self.tool("containerd"), "runc", self.tool("ctr"), "nsenter", "iptables"):
            if shutil.which(tool) is None:
                raise E2EError(f"the node needs `{tool}` (scripts/test-e2e installs it from Debian's packages)")
        if not (CNI_BIN_DIR / "bridge").exists():
            raise E2EError(f"no CNI plugins in {CNI_BIN_DIR} (Debian package containernetworking-plugins)")
        self.dir.mkdir(parents=True, exist_ok=True)
        record_host_state(self.dir)
        self._bind_node_role()
        self._node_sysctls()
        self._write_cni()
        self._start_containerd()
        self._import_images()
        self._start_kubelet()
        self._start_scheduler()
        self._start_proxy()
        self.wait_ready()

    def _bind_node_role(self) -> None:
        # With RBAC as the only authorizer (no Node authorizer), kubelets get their
        # permissions from the system:node role bound to their group.
        self.cluster.apply({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "kaspr-e2e-nodes"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:node"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:nodes"}],
        })

    def _node_sysctls(self) -> None:
        # Routing between pods and Service backends happens in this namespace, and replies on
        # the same bridge must pass iptables so kube-proxy's NAT is undone (br_netfilter).
        if not Path("/proc/sys/net/bridge").exists():
            if shutil.which("modprobe") is None:
                raise E2EError("the node needs the br_netfilter kernel module; load it (modprobe br_netfilter)")
            run(["modprobe", "br_netfilter"])
        for key, value in (("net.ipv4.ip_forward", "1"), ("net.bridge.bridge-nf-call-iptables", "1")):
            self.cluster.netns.run(["sysctl", "-qw", f"{key}={value}"])

    def _write_cni(self) -> None:
        conf_dir = self.dir / "cni" / "net.d"
        conf_dir.mkdir(parents=True)
        conflist = {
            "cniVersion": "0.4.0",
            "name": "kaspr-e2e",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": True,
                    "isDefaultGateway": True,
                    # Nothing may leave the namespace, so nothing is masqueraded.
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP}]],
                        "dataDir": str(self.dir / "cni" / "ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        (conf_dir / "10-kaspr-e2e.conflist").write_text(json.dumps(conflist, indent=2))

    def _start_containerd(self) -> None:
        base = self.dir / "containerd"
        base.mkdir(parents=True)
        config = base / "config.toml"
        disabled = """disabled_plugins = [
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]"""
        if self.containerd_dir is not None:
            config.write_text(self._config_v3(base, disabled))
        else:
            config.write_text(self._config_v2(base, disabled))
        # containerd finds its shim on PATH: ours first, so a 2.x daemon never runs 1.6's shim.
        env = None
        if self.containerd_dir is not None:
            env = {**os.environ, "PATH": f"{self.containerd_dir}:{os.environ.get('PATH', '')}"}
        self.containerd = self.spawn("containerd", [self.tool("containerd"), "--config", str(config),
                                                    "--log-level", "warn"], env=env)

        def up() -> bool:
            self.containerd.ensure_alive()
            return self.socket.exists() and run(
                [self.tool("ctr"), "--address", str(self.socket), "version"], check=False, timeout=10).returncode == 0

        wait_for("containerd", up, timeout=60, on_timeout=lambda: tail(self.containerd.log_path))

    def _config_v2(self, base: Path, disabled: str) -> str:
        """Debian's containerd 1.6 (config version 2)."""
        return f"""version = 2
root = "{base / 'root'}"
state = "{base / 'state'}"
{disabled}

[grpc]
  address = "{self.socket}"

[ttrpc]
  address = "{self.socket}.ttrpc"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{SANDBOX_IMAGE}"
  # Root here lacks CAP_SYS_RESOURCE: runc cannot lower a sandbox's oom_score_adj.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{base / 'runc'}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{self.dir / 'cni' / 'net.d'}"
"""

    def _config_v3(self, base: Path, disabled: str) -> str:
        """containerd 2.x (config version 3: the CRI plugin split into images and runtime),
        with the registry inside the namespace reachable over plain HTTP."""
        hosts = base / "certs.d"
        registry_dir = hosts / REGISTRY_HOST
        registry_dir.mkdir(parents=True)
        (registry_dir / "hosts.toml").write_text(f"""server = "http://{REGISTRY_HOST}"

[host."http://{REGISTRY_HOST}"]
  capabilities = ["pull", "resolve", "push"]
""")
        return f"""version = 3
root = "{base / 'root'}"
state = "{base / 'state'}"
{disabled}

[grpc]
  address = "{self.socket}"

[ttrpc]
  address = "{self.socket}.ttrpc"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{SANDBOX_IMAGE}"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "{hosts}"

[plugins."io.containerd.cri.v1.runtime"]
  # Root here lacks CAP_SYS_RESOURCE: runc cannot lower a sandbox's oom_score_adj.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      snapshotter = "overlayfs"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{base / 'runc'}"
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{CNI_BIN_DIR}"]
    conf_dir = "{self.dir / 'cni' / 'net.d'}"
"""

    def _import_images(self) -> None:
        for archive in self.images:
            start = time.monotonic()
            self.ctr(["images", "import", str(archive)], timeout=300)
            print(f"node: imported {archive.name} in {time.monotonic() - start:.1f}s")

    def _start_kubelet(self) -> None:
        cp = self.cluster
        kdir = self.dir / "kubelet"
        kdir.mkdir(parents=True)
        client = make_cert(cp.pki, cp.ca, "kubelet", f"system:node:{NODE_NAME}",
                           organization="system:nodes", client=True)
        kubeconfig = write_kubeconfig(kdir / "kubeconfig", cp.server, cp.ca.cert, client, f"system:node:{NODE_NAME}")
        endpoint = f"unix://{self.socket}"
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "cgroupDriver": "cgroupfs",
            # This machine runs cgroup v1. From 1.35 the kubelet refuses to start on it unless
            # told otherwise; upstream keeps the cgroup v1 code until at least 1.38.
            "failCgroupV1": False,
            "failSwapOn": False,
            "containerRuntimeEndpoint": endpoint,
            "imageServiceEndpoint": endpoint,
            "address": NODE_IP,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(cp.ca.cert)},
            },
            "authorization": {"mode": "Webhook"},
            "podLogsDir": str(self.dir / "pod-logs"),
            "resolvConf": "",
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
            # Images are imported, never pulled: garbage collection must not remove them.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "nodeStatusUpdateFrequency": "5s",
            "serializeImagePulls": False,
        }
        (kdir / "config.yaml").write_text(json.dumps(config, indent=2))
        self.kubelet = self.spawn("kubelet", [
            str(cp.tools.path("kubelet")),
            "--config", str(kdir / "config.yaml"),
            "--kubeconfig", str(kubeconfig),
            "--root-dir", str(kdir / "root"),
            "--cert-dir", str(kdir / "pki"),
            "--hostname-override", NODE_NAME,
            "--node-ip", NODE_IP,
            "--v=1",
        ])

    def _start_scheduler(self) -> None:
        cp = self.cluster
        self.spawn("kube-scheduler", [
            str(cp.tools.path("kube-scheduler")),
            "--kubeconfig", str(cp.admin_kubeconfig),
            "--authentication-kubeconfig", str(cp.admin_kubeconfig),
            "--authorization-kubeconfig", str(cp.admin_kubeconfig),
            "--bind-address", "127.0.0.1",
            "--leader-elect=false",
            "--v=1",
        ])

    def _start_proxy(self) -> None:
        cp = self.cluster
        self.spawn("kube-proxy", [
            str(cp.tools.path("kube-proxy")),
            "--kubeconfig", str(cp.admin_kubeconfig),
            "--hostname-override", NODE_NAME,
            "--proxy-mode", "iptables",
            "--cluster-cidr", POD_CIDR,
            # Leave the host's conntrack settings alone.
            "--conntrack-max-per-core=0",
            "--conntrack-tcp-timeout-established=0",
            "--conntrack-tcp-timeout-close-wait=0",
            "--metrics-bind-address", "127.0.0.1:10249",
            "--healthz-bind-address", "127.0.0.1:10256",
            "--v=1",
        ])

    def _kubelet_refused_cgroups(self) -> None:
        """One clear sentence when a kubelet no longer runs on this machine's cgroup v1."""
        if self.kubelet is None or self.kubelet.alive():
            return
        try:
            log = self.kubelet.log_path.read_text(errors="replace")
        except OSError:
            return
        refusal = "not run on a host using cgroup v1"  # the kubelet's own words (1.35+)
        if refusal in log:
            line = next((line for line in log.splitlines() if refusal in line), "")
            raise E2EError(
                "the kubelet refused to start on this machine's cgroup v1 hierarchy although its "
                f"configuration sets failCgroupV1: false; this release no longer supports cgroup v1 here: {line}")

    def wait_ready(self, timeout: float = 120) -> None:
        def ready() -> bool:
            self._kubelet_refused_cgroups()
            for proc in self.processes:
                proc.ensure_alive()
            node = self.cluster.kubectl(["get", "node", NODE_NAME, "-o", "json"], check=False)
            if node.returncode != 0:
                return False
            conditions = json.loads(node.stdout)["status"].get("conditions", [])
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

        wait_for(f"node {NODE_NAME} Ready", ready, timeout=timeout, interval=1,
                 on_timeout=lambda: "\n".join(tail(p.log_path, 30) for p in self.processes))

    def diagnostics(self) -> str:
        return "\n".join(tail(p.log_path, 30) for p in self.processes)

    # -- teardown ----------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop the node gracefully where possible, then sweep away every trace of it."""
        self._delete_pods()
        by_name = {p.name: p for p in self.processes}
        for name in ("kube-proxy", "kube-scheduler", "kubelet"):
            if name in by_name:
                by_name[name].stop(grace=10)
        _kill_cgroup_processes()
        self._stop_tasks()
        if self.containerd is not None:
            self.containerd.stop(grace=10)
        self.processes.clear()
        sweep(self.dir)

    def _delete_pods(self) -> None:
        if self.kubelet is None or not self.kubelet.alive():
            return
        self.cluster.kubectl(["delete", "pods", "--all", "--all-namespaces", "--grace-period=0", "--force",
                              "--wait=false"], check=False, timeout=60)

        def gone() -> bool:
            listing = run([self.tool("ctr"), "--address", str(self.socket), "-n", "k8s.io", "tasks", "list", "-q"],
                          check=False, timeout=10)
            return listing.returncode != 0 or not listing.stdout.strip()

        try:
            wait_for("the node's containers to stop", gone, timeout=30, interval=1)
        except E2EError:
            pass  # whatever remains is killed by the sweep

    def _stop_tasks(self) -> None:
        if self.containerd is None or not self.containerd.alive():
            return
        ctr = [self.tool("ctr"), "--address", str(self.socket), "-n", "k8s.io", "tasks"]
        listing = run([*ctr, "list", "-q"], check=False, timeout=10)
        for task in listing.stdout.split():
            run([*ctr, "kill", "-s", "SIGKILL", task], check=False, timeout=10)
            run([*ctr, "delete", "-f", task], check=False, timeout=10)


# -------------------------------------------------------------------------------------------
# The sweep: works from the node's state directory alone, so a kept cluster's teardown.sh and
# an interrupted run clean up the same way as the suite.

STATE_FILE = "host-state.json"


def record_host_state(node_dir: Path) -> None:
    """Before the node starts: what it may change outside its directory, to restore later."""
    state = {
        "sysctls": read_host_sysctls(),
        "preexisting": [str(p) for p in FIXED_PATHS if p.exists()],
    }
    (node_dir / STATE_FILE).write_text(json.dumps(state))


def sweep(node_dir: Path) -> None:
    """Remove every trace of a node: shims, container processes, mounts, cgroups, files it
    made outside its directory, and the host sysctls the kubelet changed."""
    _kill_shims(node_dir)
    _kill_cgroup_processes()
    for point in mounts_under(node_dir):
        subprocess.run(["umount", "-l", point], capture_output=True)
    _remove_cgroups()
    try:
        state = json.loads((node_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return
    preexisting = set(state.get("preexisting", []))
    for path in FIXED_PATHS:
        if str(path) not in preexisting and path.exists():
            shutil.rmtree(path, ignore_errors=True)
    for key, value in state.get("sysctls", {}).items():
        try:
            (Path("/proc/sys") / key).write_text(value)
        except OSError:
            pass


def _kill_shims(node_dir: Path) -> None:
    # Shims run in sessions of their own; each names the containerd socket it serves.
    marker = str(node_dir)
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            cmdline = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "containerd" in cmdline and marker in cmdline:
            try:
                os.kill(int(pid_dir.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _kill_cgroup_processes() -> None:
    for _ in range(20):
        pids = set()
        for root in kubepods_cgroups():
            for procs in root.rglob("cgroup.procs"):
                try:
                    pids.update(int(p) for p in procs.read_text().split())
                except (OSError, ValueError):
                    continue
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


def _remove_cgroups() -> None:
    for root in kubepods_cgroups():
        # Children before parents; a cgroup directory goes with rmdir, not by removing files.
        children = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
        for directory in [*children, root]:
            try:
                directory.rmdir()
            except OSError:
                pass


def leftovers(node_dir: Path) -> list[str]:
    """What a node left behind on the host (empty after a clean teardown)."""
    found = [f"mount {m}" for m in mounts_under(node_dir)]
    found += [f"cgroup {c}" for c in kubepods_cgroups()]
    return found


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "sweep":
        sys.exit("usage: e2e_node.py sweep NODE_DIR")
    sweep(Path(sys.argv[2]))
