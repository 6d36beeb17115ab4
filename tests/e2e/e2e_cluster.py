"""A real Kubernetes control plane inside a private network namespace.

The network namespace has `lo` (with the service cluster IP range routed to it) and the node's
pod bridge `cni0` (with pods' veths once they run), and no route out of it, so no process
started here can reach anything outside the machine. etcd, kube-apiserver,
kube-controller-manager, the node (see e2e_node.py), the webhook and the package index all run
inside it; the tests talk to them through `ip netns exec`.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

SERVICE_CIDR = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"
# The node's pod network: the `cni0` bridge inside the namespace carries NODE_IP, the node's
# address, which is also where servers that pods must reach (package index, GCS) listen.
POD_CIDR = "10.244.0.0/24"
NODE_IP = "10.244.0.1"
BRIDGE = "cni0"
# A bridge without an address of its own takes the lowest MAC of its ports, so it changes
# whenever a pod's veth comes or goes; every pod's cached neighbour entry for NODE_IP then
# names a MAC the bridge no longer answers to, and replies to the kubelet's probes and to the
# API server are lost until the entry expires. A fixed, locally administered MAC prevents it.
BRIDGE_MAC = "02:00:0a:f4:00:01"
APISERVER_PORT = 6443
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
CONTROLLER_MANAGER_PORT = 10257
# The one webhook address the API server presents a client certificate to (the admission
# configuration's kubeconfig names it); a webhook serving there with `--client-ca` proves the
# API server's calls pass client-certificate authentication.
CLIENT_AUTH_WEBHOOK_HOST = "127.0.0.1:8453"


# Set by scripts/test-e2e for each run and inherited by every process the harness starts.
RUN_MARKER = "KASPR_E2E_RUN_MARKER"


class E2EError(RuntimeError):
    """A step of the harness failed; the message says which and where its logs are."""


def wait_for(
    what: str,
    check: Callable[[], object],
    timeout: float,
    interval: float = 0.5,
    on_timeout: Callable[[], str] | None = None,
):
    """Poll `check` until it returns a truthy value; bounded in time and in attempts."""
    deadline = time.monotonic() + timeout
    attempts = max(1, int(timeout / interval) + 1)
    last_error: Exception | None = None
    for _ in range(attempts):
        try:
            result = check()
            if result:
                return result
            last_error = None
        except Exception as exc:  # noqa: BLE001 - the last error is reported on timeout
            last_error = exc
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    detail = f": {last_error}" if last_error else ""
    extra = f"\n{on_timeout()}" if on_timeout else ""
    raise E2EError(f"timed out after {timeout:.0f}s waiting for {what}{detail}{extra}")


def run(args: Sequence[str], *, check: bool = True, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise E2EError(f"{' '.join(args)} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


def tail(path: Path, lines: int = 40) -> str:
    try:
        content = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return f"--- last {lines} lines of {path} ---\n" + "\n".join(content[-lines:])


class NetworkNamespace:
    """`ip netns` namespace with loopback (the service range routed to it) and the pod bridge."""

    def __init__(self, name: str):
        self.name = name
        self.created = False

    def create(self) -> None:
        run(["ip", "netns", "add", self.name])
        self.created = True
        run(["ip", "-n", self.name, "link", "set", "lo", "up"])
        # Service IPs (e.g. the `kubernetes` Service) resolve to loopback inside the namespace.
        run(["ip", "-n", self.name, "route", "add", "local", SERVICE_CIDR, "dev", "lo"])
        # The node's bridge exists before the API server starts, so NODE_IP is on a real
        # interface for the API server to advertise and the kubelet to report.
        run(["ip", "-n", self.name, "link", "add", BRIDGE, "address", BRIDGE_MAC, "type", "bridge"])
        run(["ip", "-n", self.name, "addr", "add", f"{NODE_IP}/{POD_CIDR.split('/')[1]}", "dev", BRIDGE])
        run(["ip", "-n", self.name, "link", "set", BRIDGE, "up"])
        links = self.links()
        if sorted(links) != ["cni0", "lo"]:
            raise E2EError(f"network namespace {self.name} has unexpected links: {links}")

    def links(self) -> list[str]:
        """Names of the namespace's network interfaces (without the `@peer` suffix)."""
        lines = run(["ip", "-n", self.name, "-o", "link", "show"]).stdout.strip().splitlines()
        return [line.split(":", 2)[1].strip().split("@")[0] for line in lines]

    def wrap(self, args: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def run(self, args: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        return run(self.wrap(args), **kwargs)

    def pids(self) -> list[int]:
        proc = run(["ip", "netns", "pids", self.name], check=False)
        return [int(p) for p in proc.stdout.split() if p.isdigit()]

    def delete(self) -> None:
        if not self.created:
            return
        # Anything still running inside was started by this harness.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            for _ in range(50):
                if not self.pids():
                    break
                time.sleep(0.1)
        run(["ip", "netns", "del", self.name], check=False)
        self.created = False


class Process:
    """A long-running process in its own process group, logging to a file."""

    def __init__(self, name: str, args: Sequence[str], log_path: Path, env: dict[str, str] | None = None):
        self.name = name
        self.args = list(args)
        self.log_path = log_path
        self.env = env
        self.popen: subprocess.Popen | None = None

    def start(self) -> None:
        env = self.env
        if env is not None and RUN_MARKER in os.environ:
            # Every process of a run carries its marker, so a leftover can be found afterwards.
            env = {**env, RUN_MARKER: os.environ[RUN_MARKER]}
        log = open(self.log_path, "ab")
        try:
            self.popen = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        finally:
            log.close()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def ensure_alive(self) -> None:
        if not self.alive():
            code = self.popen.returncode if self.popen else None
            raise E2EError(f"{self.name} exited with {code}\n{tail(self.log_path)}")

    def stop(self, grace: float = 10) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
                try:
                    os.killpg(self.popen.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.popen.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        else:
            # The leader is gone; make sure nothing it started lingers in the group.
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.popen = None


# ---------------------------------------------------------------------------------------------
# Certificates (openssl CLI)


@dataclass
class KeyPair:
    cert: Path
    key: Path


def _openssl(args: Sequence[str]) -> None:
    run(["openssl", *args])


def make_ca(directory: Path, name: str, common_name: str) -> KeyPair:
    pair = KeyPair(directory / f"{name}.crt", directory / f"{name}.key")
    _openssl([
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-days", "3", "-subj", f"/CN={common_name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        "-keyout", str(pair.key), "-out", str(pair.cert),
    ])
    return pair


def make_cert(
    directory: Path,
    ca: KeyPair,
    name: str,
    common_name: str,
    *,
    organization: str | None = None,
    server_sans: Iterable[str] = (),
    client: bool = False,
) -> KeyPair:
    pair = KeyPair(directory / f"{name}.crt", directory / f"{name}.key")
    csr = directory / f"{name}.csr"
    subject = f"/CN={common_name}" + (f"/O={organization}" if organization else "")
    _openssl([
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-subj", subject, "-keyout", str(pair.key), "-out", str(csr),
    ])
    sans = list(server_sans)
    usages = (["serverAuth"] if sans else []) + (["clientAuth"] if client else [])
    ext = directory / f"{name}.ext"
    lines = [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature,keyEncipherment",
        f"extendedKeyUsage={','.join(usages)}",
    ]
    if sans:
        lines.append("subjectAltName=" + ",".join(sans))
    ext.write_text("\n".join(lines) + "\n")
    _openssl([
        "x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
        "-CAcreateserial", "-days", "2", "-sha256", "-extfile", str(ext), "-out", str(pair.cert),
    ])
    csr.unlink()
    ext.unlink()
    return pair


def write_kubeconfig(path: Path, server: str, ca: Path, client: KeyPair, user: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"client-certificate": str(client.cert), "client-key": str(client.key)}}],
        "contexts": [{"name": user, "context": {"cluster": "e2e", "user": user}}],
        "current-context": user,
    }
    path.write_text(json.dumps(config, indent=2))
    return path


# ---------------------------------------------------------------------------------------------
# The control plane


@dataclass
class Tools:
    bin_dir: Path

    def path(self, name: str) -> Path:
        p = self.bin_dir / name
        if not os.access(p, os.X_OK):
            raise E2EError(f"{p} is missing; run scripts/build-k8s-tools")
        return p


@dataclass
class ControlPlane:
    tools: Tools
    workdir: Path
    netns: NetworkNamespace
    processes: list[Process] = field(default_factory=list)

    @classmethod
    def new(cls, tools: Tools, workdir: Path) -> "ControlPlane":
        name = f"kaspr-e2e-{secrets.token_hex(4)}"
        return cls(tools=tools, workdir=workdir, netns=NetworkNamespace(name))

    # -- layout ------------------------------------------------------------------------------
    @property
    def pki(self) -> Path:
        return self.workdir / "pki"

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{APISERVER_PORT}"

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        for d in (self.pki, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        (self.workdir / "etcd").mkdir(mode=0o700)
        self.netns.create()
        self._make_pki()
        self._start_etcd()
        self._start_apiserver()
        self._start_controller_manager()
        self.wait_namespace_ready("default")

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()
        self.netns.delete()

    def spawn(self, name: str, args: Sequence[str], env: dict[str, str] | None = None) -> Process:
        """Start a process inside the namespace; the cluster stops it on teardown."""
        proc = Process(name, self.netns.wrap(args), self.logs / f"{name}.log", env=env)
        proc.start()
        self.processes.append(proc)
        return proc

    def stop_process(self, proc: Process | None) -> None:
        """Stop a process started by `spawn` before teardown (no-op for None)."""
        if proc is not None:
            proc.stop()
            if proc in self.processes:
                self.processes.remove(proc)

    def _make_pki(self) -> None:
        pki = self.pki
        self.ca = make_ca(pki, "ca", "kaspr-e2e-ca")
        self.apiserver_cert = make_cert(
            pki, self.ca, "apiserver", "kube-apiserver",
            server_sans=[
                "IP:127.0.0.1", f"IP:{KUBERNETES_SERVICE_IP}", f"IP:{NODE_IP}", "DNS:localhost", "DNS:kubernetes",
                "DNS:kubernetes.default", "DNS:kubernetes.default.svc",
                "DNS:kubernetes.default.svc.cluster.local",
            ],
        )
        self.admin_cert = make_cert(pki, self.ca, "admin", "kaspr-e2e-admin", organization="system:masters", client=True)
        self.kcm_cert = make_cert(pki, self.ca, "controller-manager", "system:kube-controller-manager", client=True)
        # The API server's identity towards admission webhooks, from a CA of its own.
        self.webhook_client_ca = make_ca(pki, "webhook-client-ca", "kaspr-e2e-webhook-client-ca")
        self.webhook_client = make_cert(pki, self.webhook_client_ca, "apiserver-webhook-client",
                                        "kube-apiserver-webhook-client", client=True)
        self.admission_config = self._write_admission_config()
        self.sa_key = pki / "sa.key"
        self.sa_pub = pki / "sa.pub"
        _openssl(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(self.sa_key)])
        _openssl(["pkey", "-in", str(self.sa_key), "-pubout", "-out", str(self.sa_pub)])
        write_kubeconfig(self.admin_kubeconfig, self.server, self.ca.cert, self.admin_cert, "admin")
        self.kcm_kubeconfig = write_kubeconfig(
            self.workdir / "controller-manager.kubeconfig", self.server, self.ca.cert, self.kcm_cert,
            "system:kube-controller-manager",
        )

    def _write_admission_config(self) -> Path:
        """The AdmissionConfiguration that makes the API server present `webhook_client` to the
        webhook at CLIENT_AUTH_WEBHOOK_HOST (and to no other), as docs/security.md describes."""
        clients = self.workdir / "webhook-clients.kubeconfig"
        clients.write_text(json.dumps({
            "apiVersion": "v1",
            "kind": "Config",
            "users": [{"name": CLIENT_AUTH_WEBHOOK_HOST, "user": {
                "client-certificate": str(self.webhook_client.cert),
                "client-key": str(self.webhook_client.key),
            }}],
        }, indent=2))
        plugin = {"apiVersion": "apiserver.config.k8s.io/v1", "kind": "WebhookAdmissionConfiguration",
                  "kubeConfigFile": str(clients)}
        config = self.workdir / "admission.json"
        config.write_text(json.dumps({
            "apiVersion": "apiserver.config.k8s.io/v1",
            "kind": "AdmissionConfiguration",
            "plugins": [{"name": name, "configuration": plugin}
                        for name in ("MutatingAdmissionWebhook", "ValidatingAdmissionWebhook")],
        }, indent=2))
        return config

    def _start_etcd(self) -> None:
        proc = self.spawn("etcd", [
            str(self.tools.path("etcd")),
            "--name", "e2e",
            "--data-dir", str(self.workdir / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{ETCD_CLIENT_PORT}",
            "--advertise-client-urls", f"http://127.0.0.1:{ETCD_CLIENT_PORT}",
            "--listen-peer-urls", f"http://127.0.0.1:{ETCD_PEER_PORT}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{ETCD_PEER_PORT}",
            "--initial-cluster", f"e2e=http://127.0.0.1:{ETCD_PEER_PORT}",
            "--unsafe-no-fsync",
            "--log-level", "warn",
        ])

        def healthy() -> bool:
            proc.ensure_alive()
            probe = self.netns.run([
                sys.executable, "-c",
                "import urllib.request,sys;"
                f"sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:{ETCD_CLIENT_PORT}/health',timeout=2).read().decode())",
            ], check=False)
            return '"health":"true"' in probe.stdout

        wait_for("etcd health", healthy, timeout=60, on_timeout=lambda: tail(proc.log_path))

    def _start_apiserver(self) -> None:
        pki = self.pki
        proc = self.spawn("kube-apiserver", [
            str(self.tools.path("kube-apiserver")),
            "--etcd-servers", f"http://127.0.0.1:{ETCD_CLIENT_PORT}",
            # Inside the namespace: pods reach it through the `kubernetes` Service, whose
            # endpoint is the node address (kept by the lease reconciler).
            "--bind-address", "0.0.0.0",
            "--advertise-address", NODE_IP,
            "--secure-port", str(APISERVER_PORT),
            "--endpoint-reconciler-type", "lease",
            "--kubelet-client-certificate", str(self.admin_cert.cert),
            "--kubelet-client-key", str(self.admin_cert.key),
            # No DNS in the namespace: dial the kubelet by its InternalIP.
            "--kubelet-preferred-address-types", "InternalIP,Hostname",
            "--service-cluster-ip-range", SERVICE_CIDR,
            "--authorization-mode", "RBAC",
            "--client-ca-file", str(self.ca.cert),
            "--tls-cert-file", str(self.apiserver_cert.cert),
            "--tls-private-key-file", str(self.apiserver_cert.key),
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--service-account-key-file", str(self.sa_pub),
            "--service-account-signing-key-file", str(self.sa_key),
            "--allow-privileged=true",
            "--admission-control-config-file", str(self.admission_config),
            "--profiling=false",
            "--cert-dir", str(pki / "apiserver-generated"),
            "--v=1",
        ])
        wait_for(
            "kube-apiserver /readyz",
            lambda: proc.ensure_alive() or self.kubectl(["get", "--raw", "/readyz"], check=False).stdout.strip() == "ok",
            timeout=120,
            interval=1,
            on_timeout=lambda: tail(proc.log_path),
        )

    def _start_controller_manager(self) -> None:
        self.kcm = self.spawn("kube-controller-manager", [
            str(self.tools.path("kube-controller-manager")),
            "--kubeconfig", str(self.kcm_kubeconfig),
            "--authentication-kubeconfig", str(self.kcm_kubeconfig),
            "--authorization-kubeconfig", str(self.kcm_kubeconfig),
            "--bind-address", "127.0.0.1",
            "--secure-port", str(CONTROLLER_MANAGER_PORT),
            "--cert-dir", str(self.pki / "controller-manager-generated"),
            "--leader-elect=false",
            "--use-service-account-credentials=true",
            "--service-account-private-key-file", str(self.sa_key),
            "--root-ca-file", str(self.ca.cert),
            "--cluster-signing-cert-file", str(self.ca.cert),
            "--cluster-signing-key-file", str(self.ca.key),
            "--service-cluster-ip-range", SERVICE_CIDR,
            "--profiling=false",
            "--v=1",
        ])

    # -- clients -----------------------------------------------------------------------------
    def kubectl(
        self,
        args: Sequence[str],
        *,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess:
        cmd = self.netns.wrap([
            str(self.tools.path("kubectl")), "--kubeconfig", str(kubeconfig or self.admin_kubeconfig),
            "--request-timeout=30s", *args,
        ])
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise E2EError(f"kubectl {' '.join(args)} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def get_json(self, *args: str, namespace: str | None = None) -> dict:
        ns = ["-n", namespace] if namespace else []
        return json.loads(self.kubectl(["get", *args, *ns, "-o", "json"]).stdout)

    def apply(self, obj: dict | list, *, namespace: str | None = None, extra: Sequence[str] = ()) -> subprocess.CompletedProcess:
        body = obj if isinstance(obj, dict) else {"apiVersion": "v1", "kind": "List", "items": obj}
        ns = ["-n", namespace] if namespace else []
        return self.kubectl(["apply", "-f", "-", *ns, *extra], input=json.dumps(body))

    def apply_each_namespace(self, objects: list[dict], default_namespace: str, *, extra: Sequence[str] = (),
                             check: bool = True) -> subprocess.CompletedProcess:
        """Apply rendered objects: those naming their namespace there, the rest in
        `default_namespace` (kubectl refuses a List that mixes namespaces with `-n`)."""
        groups: dict[str, list[dict]] = {}
        for obj in objects:
            groups.setdefault(obj.get("metadata", {}).get("namespace") or default_namespace, []).append(obj)
        stdout, stderr, code = [], [], 0
        for namespace, items in groups.items():
            proc = self.kubectl(["apply", "-n", namespace, *extra, "-f", "-"], check=check,
                                input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
            stdout.append(proc.stdout)
            stderr.append(proc.stderr)
            code = code or proc.returncode
        return subprocess.CompletedProcess(["kubectl", "apply"], code, "".join(stdout), "".join(stderr))

    def create(self, obj: dict, *, namespace: str | None = None) -> dict:
        ns = ["-n", namespace] if namespace else []
        return json.loads(self.kubectl(["create", "-f", "-", *ns, "-o", "json"], input=json.dumps(obj)).stdout)

    def http_get(self, url: str, timeout: float = 5) -> tuple[int, str]:
        """GET a plain-HTTP URL from inside the namespace; (status, body), status 0 when unreachable."""
        script = (
            "import sys, urllib.request, urllib.error\n"
            "try:\n"
            f"    r = urllib.request.urlopen(sys.argv[1], timeout={timeout})\n"
            "    print(r.status); sys.stdout.write(r.read().decode())\n"
            "except urllib.error.HTTPError as e:\n"
            "    print(e.code); sys.stdout.write(e.read().decode())\n"
            "except Exception as e:\n"
            "    print(0); sys.stdout.write(repr(e))\n"
        )
        proc = self.netns.run([sys.executable, "-c", script, url], check=False, timeout=timeout + 10)
        first, _, rest = proc.stdout.partition("\n")
        return (int(first) if first.strip().isdigit() else 0), rest

    def wait_namespace_ready(self, namespace: str, timeout: float = 60) -> None:
        """A namespace is usable for pods once its `default` ServiceAccount and root CA exist."""

        def ready() -> bool:
            self.kcm.ensure_alive()
            sa = self.kubectl(["get", "serviceaccount", "default", "-n", namespace], check=False)
            cm = self.kubectl(["get", "configmap", "kube-root-ca.crt", "-n", namespace], check=False)
            return sa.returncode == 0 and cm.returncode == 0

        wait_for(f"namespace {namespace} to be ready", ready, timeout=timeout, interval=0.5,
                 on_timeout=lambda: tail(self.kcm.log_path))

    def pods(self, namespace: str, selector: str) -> list[dict]:
        pods = self.get_json("pods", "-l", selector, namespace=namespace)["items"]
        return sorted((p for p in pods if not p["metadata"].get("deletionTimestamp")),
                      key=lambda p: p["metadata"]["name"])

    def wait_pods(self, namespace: str, selector: str, count: int, timeout: float = 90) -> list[dict]:
        """Wait until exactly `count` live pods match (the StatefulSet controller creates them)."""

        def enough():
            pods = self.pods(namespace, selector)
            return pods if len(pods) == count else None

        def explain() -> str:
            events = self.kubectl(["get", "events", "-n", namespace, "--sort-by=.lastTimestamp"], check=False)
            return f"events in {namespace}:\n{events.stdout}{events.stderr}"

        return wait_for(f"{count} pods matching {selector} in {namespace}", enough, timeout=timeout,
                        interval=0.5, on_timeout=explain)

    def wait_pods_where(self, namespace: str, selector: str, predicate: Callable[[dict], bool], count: int,
                        timeout: float = 120, what: str = "matching") -> list[dict]:
        """Wait until `count` live pods match `selector` and each satisfies `predicate`."""

        def enough():
            pods = self.pods(namespace, selector)
            return pods if len(pods) == count and all(predicate(p) for p in pods) else None

        def explain() -> str:
            pods = self.kubectl(["get", "pods", "-n", namespace, "-o", "wide"], check=False)
            events = self.kubectl(["get", "events", "-n", namespace, "--sort-by=.lastTimestamp"], check=False)
            ended = []
            for pod in self.pods(namespace, selector):
                statuses = (pod.get("status", {}).get("initContainerStatuses") or []) + \
                    (pod.get("status", {}).get("containerStatuses") or [])
                for status in statuses:
                    for state in (status.get("state") or {}, status.get("lastState") or {}):
                        terminated = state.get("terminated")
                        if terminated and terminated.get("exitCode"):
                            ended.append(f"{pod['metadata']['name']}/{status['name']} exited "
                                         f"{terminated['exitCode']}: {terminated.get('message', '').strip()}")
            return (f"pods:\n{pods.stdout}\nfailed containers:\n" + "\n".join(ended)
                    + f"\nevents in {namespace}:\n{events.stdout}{events.stderr}")

        return wait_for(f"{count} pods {what} {selector} in {namespace}", enough, timeout=timeout,
                        interval=0.5, on_timeout=explain)

    def wait_pods_ready(self, namespace: str, selector: str, count: int, timeout: float = 180) -> list[dict]:
        return self.wait_pods_where(namespace, selector, pod_ready, count, timeout=timeout, what="Ready")

    def diagnostics(self) -> str:
        return "\n".join(tail(p.log_path, 30) for p in self.processes)


def pod_ready(pod: dict) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

