"""The webhook under test: the real `serve` binary inside the network namespace, its
least-privilege identity, its registrations, and readers for its probe port."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import string
import subprocess
from pathlib import Path

from e2e_cluster import ControlPlane, E2EError, KeyPair, Process, make_ca, make_cert, tail, wait_for, write_kubeconfig

WEBHOOK_LISTEN = "127.0.0.1:8443"
PROBE_LISTEN = "127.0.0.1:8080"
WEBHOOK_URL = f"https://{WEBHOOK_LISTEN}"
PROBE_URL = f"http://{PROBE_LISTEN}"
MANIFESTS = Path(__file__).parent / "manifests"
REQUESTS_METRIC = "kaspr_packages_webhook_admission_requests_total"

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        samples.append((m.group(1), labels, value))
    return samples


def serve_help(binary: Path) -> str | None:
    """The `serve --help` text, or None when the binary has no `serve` yet."""
    if not binary.exists():
        return None
    proc = subprocess.run([str(binary), "serve", "--help"], capture_output=True, text=True, timeout=30)
    return proc.stdout if proc.returncode == 0 else None


class Webhook:
    def __init__(self, cluster: ControlPlane, binary: Path, workdir: Path, *, least_privilege: bool = True,
                 name: str = "webhook", listen: str = WEBHOOK_LISTEN, probe_listen: str = PROBE_LISTEN):
        """`name` names the log file; a second instance (say, another controller replica) needs its
        own `listen` and `probe_listen`."""
        self.cluster = cluster
        self.binary = binary
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.least_privilege = least_privilege
        self.name = name
        self.listen = listen
        self.probe_url = f"http://{probe_listen}"
        self.extra_args: list[str] = []
        self.process: Process | None = None
        self.generation = 0
        self.ca: KeyPair = make_ca(workdir, "webhook-ca-0", "kaspr-e2e-webhook-ca-0")
        self.trusted: list[KeyPair] = [self.ca]  # what the registrations' caBundle holds
        # The serving pair is laid out like a Kubernetes Secret volume: files behind a `..data`
        # symlink that an update swaps atomically.
        self.tls_dir = workdir / "tls"
        self.tls_dir.mkdir()
        self._publish(self._serving_pair(self.ca))
        for name in ("tls.crt", "tls.key"):
            (self.tls_dir / name).symlink_to(f"..data/{name}")
        if least_privilege:
            cluster.kubectl(["apply", "-f", str(MANIFESTS / "webhook-rbac.yaml")])
            client = make_cert(workdir, cluster.ca, "webhook-client", "kaspr-packages-webhook", client=True)
            self.kubeconfig = write_kubeconfig(workdir / "webhook.kubeconfig", cluster.server, cluster.ca.cert,
                                               client, "kaspr-packages-webhook")
        else:
            self.kubeconfig = cluster.admin_kubeconfig

    def _serving_pair(self, ca: KeyPair) -> KeyPair:
        return make_cert(self.workdir, ca, f"webhook-{self.generation}", "kaspr-packages-webhook",
                         server_sans=["IP:127.0.0.1", "DNS:localhost"])

    def _publish(self, pair: KeyPair) -> None:
        """Swap the `..data` symlink to a new timestamped directory, as the kubelet does."""
        version = self.tls_dir / f"..{self.generation:04d}"
        version.mkdir()
        shutil.copy(pair.cert, version / "tls.crt")
        shutil.copy(pair.key, version / "tls.key")
        staging = self.tls_dir / "..data_tmp"
        staging.symlink_to(version.name)
        os.replace(staging, self.tls_dir / "..data")

    def served_issuer(self) -> str:
        """The issuer CN of the certificate the webhook port presents right now."""
        proc = self.cluster.netns.run(["sh", "-c",
                                       f"openssl s_client -connect {self.listen} -servername localhost"
                                       " </dev/null 2>/dev/null | openssl x509 -noout -issuer"], check=False)
        return proc.stdout.strip()

    def rotate(self) -> None:
        """Rotate to a new CA and serving pair without a restart: trust both CAs, swap the
        Secret-style symlink, wait until the new certificate is served, then trust only the new CA."""
        self.generation += 1
        new_ca = make_ca(self.workdir, f"webhook-ca-{self.generation}", f"kaspr-e2e-webhook-ca-{self.generation}")
        self.trusted = [self.ca, new_ca]
        self.register()
        self._publish(self._serving_pair(new_ca))
        wait_for("the webhook to serve the new certificate",
                 lambda: f"kaspr-e2e-webhook-ca-{self.generation}" in self.served_issuer(),
                 timeout=30, interval=0.5, on_timeout=lambda: tail(self.log_path))
        self.ca = new_ca
        self.trusted = [new_ca]
        self.register()

    @property
    def log_path(self) -> Path:
        return self.cluster.logs / f"{self.name}.log"

    def start(self, timeout: float = 60, extra_args: list[str] | None = None) -> None:
        """Start `serve` (no-op when running). `extra_args` (e.g. `--controller-rollout=false`)
        stay in effect for later restarts until given again."""
        if extra_args is not None:
            self.extra_args = list(extra_args)
        if self.process and self.process.alive():
            return
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "KUBECONFIG": str(self.kubeconfig),
            "RUST_BACKTRACE": "1",
        }
        self.process = self.cluster.spawn(self.name, [
            str(self.binary), "serve",
            "--listen", self.listen,
            "--probe-listen", self.probe_url.removeprefix("http://"),
            "--tls-cert", str(self.tls_dir / "tls.crt"),
            "--tls-key", str(self.tls_dir / "tls.key"),
            "--log-format", "plain",
            "--log-filter", os.environ.get("KASPR_E2E_WEBHOOK_LOG", "info"),
            *self.extra_args,
        ], env=env)
        proc = self.process

        def ready() -> bool:
            proc.ensure_alive()
            status, _ = self.cluster.http_get(f"{self.probe_url}/readyz", timeout=2)
            return status == 200

        wait_for("the webhook's /readyz", ready, timeout=timeout, interval=0.3,
                 on_timeout=lambda: tail(self.log_path))

    def stop(self) -> None:
        self.cluster.stop_process(self.process)
        self.process = None

    def metrics(self) -> list[tuple[str, dict[str, str], float]]:
        status, body = self.cluster.http_get(f"{self.probe_url}/metrics")
        if status != 200:
            raise E2EError(f"GET /metrics answered {status}: {body[:500]}")
        return parse_metrics(body)

    def admission_requests(self, **labels: str) -> float:
        """Sum of the admission request counter over series matching `labels`."""
        samples = [s for s in self.metrics() if s[0] == REQUESTS_METRIC]
        return sum(v for _, lbls, v in samples if all(lbls.get(k) == want for k, want in labels.items()))

    def metric(self, name: str, **labels: str) -> float:
        """Sum of metric `name` over series matching `labels`."""
        return sum(v for n, lbls, v in self.metrics()
                   if n == name and all(lbls.get(k) == want for k, want in labels.items()))

    # -- registration --------------------------------------------------------------------------
    def configurations(self) -> str:
        template = string.Template((MANIFESTS / "webhook-configurations.yaml").read_text())
        ca_bundle = base64.b64encode(b"".join(ca.cert.read_bytes() for ca in self.trusted)).decode()
        return template.substitute(CA_BUNDLE=ca_bundle, WEBHOOK_URL=f"https://{self.listen}")

    def register(self) -> None:
        self.cluster.kubectl(["apply", "-f", "-"], input=self.configurations())

    def unregister(self) -> None:
        for kind in ("mutatingwebhookconfiguration", "validatingwebhookconfiguration"):
            self.cluster.kubectl(["delete", kind, "kaspr-packages-webhook", "--ignore-not-found"])

    def wait_effective(self, active: bool = True, timeout: float = 60) -> None:
        """The API server applies (un)registrations asynchronously: wait until a server-side dry
        run of an owned StatefulSet in a probe namespace is mutated (or no longer is)."""
        from e2e_objects import init_container, kasprapp, operator_statefulset

        cluster = self.cluster
        ns = "e2e-probe"
        if cluster.kubectl(["get", "namespace", ns], check=False).returncode != 0:
            cluster.kubectl(["create", "namespace", ns])
            cluster.wait_namespace_ready(ns)
        if cluster.kubectl(["get", "kasprapp", "probe", "-n", ns], check=False).returncode != 0:
            cluster.apply(kasprapp("probe", {"packages": ["kasprdemo==1.0"]}), namespace=ns)
        app = cluster.get_json("kasprapp", "probe", namespace=ns)
        sts = json.dumps(operator_statefulset("probe", app["metadata"]["uid"], replicas=1))

        def settled() -> bool:
            proc = cluster.kubectl(["create", "--dry-run=server", "-o", "json", "-n", ns, "-f", "-"],
                                   input=sts, check=False)
            if proc.returncode != 0:
                return False
            mutated = init_container(json.loads(proc.stdout)["spec"]["template"]["spec"]) is not None
            return mutated == active

        wait_for(f"the webhook registration to be {'active' if active else 'gone'}", settled,
                 timeout=timeout, interval=0.5, on_timeout=lambda: tail(self.log_path))

    def registered(self) -> bool:
        proc = self.cluster.kubectl(["get", "mutatingwebhookconfiguration", "kaspr-packages-webhook", "-o", "json"],
                                    check=False)
        return proc.returncode == 0 and bool(json.loads(proc.stdout).get("webhooks"))
