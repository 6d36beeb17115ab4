"""The Helm chart for real: the locally built webhook image runs as the chart's Deployment on
the node, the API server calls it through its Service (`clientConfig.service`), and admissions
keep succeeding while certificates rotate and `helm upgrade` rolls the Deployment.

The host-process webhook of the other scenarios is stopped and unregistered meanwhile, so the
chart's replicas are the only webhook and the only controller.
"""

from __future__ import annotations

import base64
import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from e2e_cluster import BRIDGE, ControlPlane, E2EError, make_ca, make_cert, pod_ready, wait_for
from e2e_objects import init_container, kasprapp, operator_statefulset
from e2e_webhook import Webhook
from test_helm_chart import CHART, RELEASE_NAMESPACE, Helm

pytestmark = pytest.mark.skipif(not (CHART / "Chart.yaml").exists(), reason=f"no chart at {CHART}")

RELEASE = "kpw"  # the release's objects are named after the chart: kpw-kaspr-packages-webhook


@pytest.fixture
def helm(cluster: ControlPlane, e2e_workdir) -> Helm:
    return Helm(cluster, e2e_workdir / "helm-node")


@pytest.fixture
def chart_only(cluster: ControlPlane, webhook: Webhook):
    """Take the host-process webhook (and its controller) out while the chart's replicas serve."""
    webhook.unregister()
    webhook.stop()
    yield
    webhook.start()
    webhook.register()
    webhook.wait_effective()


def image_values(images) -> list[str]:
    repository, tag = images["webhook"].ref.rsplit(":", 1)
    return ["--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
            "--set", "image.pullPolicy=Never"]


def release_pods(cluster: ControlPlane) -> list[dict]:
    return cluster.pods(RELEASE_NAMESPACE, f"app.kubernetes.io/instance={RELEASE}")


def fullname(cluster: ControlPlane) -> str:
    deployments = cluster.get_json("deployments", "-l", f"app.kubernetes.io/instance={RELEASE}",
                                   namespace=RELEASE_NAMESPACE)["items"]
    assert len(deployments) == 1, [d["metadata"]["name"] for d in deployments]
    return deployments[0]["metadata"]["name"]


def admit(cluster: ControlPlane, namespace: str, app: str, uid: str) -> tuple[bool, str]:
    """A server-side dry-run create of the app's StatefulSet: (injected, error)."""
    sts = operator_statefulset(app, uid, replicas=1)
    proc = cluster.kubectl(["create", "--dry-run=server", "-o", "json", "-n", namespace, "-f", "-"],
                           input=json.dumps(sts), check=False, timeout=30)
    if proc.returncode != 0:
        return False, proc.stderr.strip()
    if init_container(json.loads(proc.stdout)["spec"]["template"]["spec"]) is None:
        return False, "not injected"
    return True, ""


class AdmissionLoop:
    """Admissions in a background thread, bounded in count and time, counting failures."""

    def __init__(self, cluster: ControlPlane, namespace: str, app: str, uid: str, limit: int = 2000,
                 seconds: float = 400):
        self.args = (cluster, namespace, app, uid)
        self.limit, self.seconds = limit, seconds
        self.count = 0
        self.failures: list[str] = []
        self.replica_states: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        deadline = start + self.seconds
        last_look = -10.0
        while not self._stop.is_set() and self.count < self.limit and time.monotonic() < deadline:
            ok, error = admit(*self.args)
            self.count += 1
            if not ok:
                now = time.monotonic() - start
                self.failures.append(f"[{now:.1f}s] {error}")
                if now - last_look >= 5:
                    # What the replicas looked like when admissions failed, for the report.
                    last_look = now
                    load = Path("/proc/loadavg").read_text().split()[:3]
                    self.replica_states.append(f"[{now:.1f}s] load {' '.join(load)}; " + "; ".join(
                        f"{p['metadata']['name']} ready={pod_ready(p)} restarts="
                        f"{[c.get('restartCount', 0) for c in p['status'].get('containerStatuses') or []]} "
                        f"last={[c.get('lastState') for c in p['status'].get('containerStatuses') or []]}"
                        for p in release_pods(self.args[0])) + "\n" + node_side(self.args[0]))

    def __enter__(self) -> "AdmissionLoop":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def release_pod_events(cluster: ControlPlane) -> str:
    """The release's pod Events (probe failures, kills, restarts), oldest first."""
    proc = cluster.kubectl(["get", "events", "-n", RELEASE_NAMESPACE, "--field-selector", "involvedObject.kind=Pod",
                            "--sort-by", ".lastTimestamp", "-o", "custom-columns=LAST:.lastTimestamp,COUNT:.count,"
                            "POD:.involvedObject.name,REASON:.reason,MESSAGE:.message"], check=False)
    return proc.stdout or proc.stderr


def node_side(cluster: ControlPlane) -> str:
    """What the node sees of the release's pods at this moment: each pod's /livez asked
    directly at its IP (no Service, no kubelet), the bridge's address and neighbours."""
    lines = []
    for pod in release_pods(cluster):
        ip = pod["status"].get("podIP")
        ports = [p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])
                 if p.get("name") == "probes"]
        if not ip or not ports:
            lines.append(f"{pod['metadata']['name']}: no IP or probe port yet")
            continue
        probe = cluster.netns.run(["curl", "-sS", "-m", "3", "-o", "/dev/null", "-w", "%{http_code} %{time_total}s",
                                   f"http://{ip}:{ports[0]}/livez"], check=False)
        lines.append(f"{pod['metadata']['name']} {ip}: /livez {probe.stdout.strip()} {probe.stderr.strip()}")
    for args in (["ip", "-br", "link", "show", "master", BRIDGE], ["ip", "neigh", "show", "dev", BRIDGE],
                 ["ip", "-br", "link", "show", BRIDGE]):
        proc = cluster.netns.run(args, check=False)
        lines.append(f"$ {' '.join(args)}\n{proc.stdout.strip()}{proc.stderr.strip()}")
    return "\n".join(lines)


def secret_data(cluster: ControlPlane, name: str) -> dict[str, bytes]:
    proc = cluster.kubectl(["get", "secret", name, "-n", RELEASE_NAMESPACE, "-o", "json"], check=False)
    if proc.returncode != 0:
        return {}
    return {k: base64.b64decode(v) for k, v in (json.loads(proc.stdout).get("data") or {}).items()}


def served_certificate(cluster: ControlPlane, service: str) -> str:
    """The leaf certificate the Service's endpoint presents right now, as PEM."""
    svc = cluster.get_json("service", service, namespace=RELEASE_NAMESPACE)
    ip = svc["spec"]["clusterIP"]
    proc = cluster.netns.run(["sh", "-c", f"openssl s_client -connect {ip}:443 -servername "
                              f"{service}.{RELEASE_NAMESPACE}.svc </dev/null 2>/dev/null | openssl x509"],
                             check=False, timeout=30)
    return proc.stdout.strip()


def test_chart_deployment_serves_through_its_service_through_rotation_and_upgrade(
    cluster: ControlPlane, helm: Helm, images, namespace: str, chart_only
):
    helm("install", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE, "--create-namespace",
         *image_values(images),
         # The other scenarios' apps were rendered by the host-process webhook; this release
         # serves and reconciles the test's own namespace only.
         "--set", "server.watchNamespaces={%s}" % namespace,
         # Rotate every ~40 s during the test: stage 20 s before expiry, overlap 8 s.
         "--set", "certificates.selfManaged.validity=60s", "--set", "certificates.selfManaged.renewBefore=20s",
         "--set", "certificates.selfManaged.overlap=8s", "--set", "certificates.selfManaged.checkInterval=1s",
         "--wait", "--timeout", "240s")
    try:
        name = fullname(cluster)
        pods = release_pods(cluster)
        assert len(pods) == 2 and all(pod_ready(p) for p in pods), [p["status"] for p in pods]
        pdb = cluster.get_json("poddisruptionbudget", name, namespace=RELEASE_NAMESPACE)
        assert pdb["spec"]["maxUnavailable"] == 1, pdb["spec"]
        for pod in pods:
            main = pod["spec"]["containers"][0]
            assert main["image"] == images["webhook"].ref
            assert main["securityContext"]["runAsNonRoot"] is True
            assert main["securityContext"]["readOnlyRootFilesystem"] is True
        for kind in ("mutatingwebhookconfiguration", "validatingwebhookconfiguration"):
            for hook in cluster.get_json(kind, name)["webhooks"]:
                service = hook["clientConfig"].get("service")
                assert service and service["name"] == name and service["namespace"] == RELEASE_NAMESPACE, hook
                assert "url" not in hook["clientConfig"], hook

        app = cluster.create(kasprapp("charted", {"packages": ["kasprdemo==1.0"]}), namespace=namespace)
        uid = app["metadata"]["uid"]
        wait_for("the chart's webhook to inject through its Service",
                 lambda: admit(cluster, namespace, "charted", uid)[0], timeout=60, interval=1)

        first_ca = secret_data(cluster, f"{name}-tls").get("ca.crt")
        old_pods = {p["metadata"]["name"] for p in pods}
        with AdmissionLoop(cluster, namespace, "charted", uid) as loop:
            # Two rotations of the CA: each new generation is staged, served and trusted.
            cas = [first_ca]

            def rotated_twice() -> bool:
                ca = secret_data(cluster, f"{name}-tls").get("ca.crt")
                if ca and ca != cas[-1]:
                    cas.append(ca)
                return len(cas) >= 3

            wait_for("two certificate rotations", rotated_twice, timeout=200, interval=1)
            # An upgrade that changes the pod template rolls the Deployment, one pod at a time.
            helm("upgrade", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE, "--reuse-values",
                 "--set", "podAnnotations.kaspr-e2e/rolled=yes", "--wait", "--timeout", "240s")
            ready_seen: list[int] = []

            def rolled() -> bool:
                pods = release_pods(cluster)
                ready_seen.append(sum(pod_ready(p) for p in pods))
                return len(pods) == 2 and all(pod_ready(p) for p in pods) and \
                    not old_pods & {p["metadata"]["name"] for p in pods}

            wait_for("the rolled replicas to be Ready", rolled, timeout=120, interval=0.5)
            # One replica at a time (maxUnavailable of the PDB): never none serving.
            assert min(ready_seen) >= 1, ready_seen
            time.sleep(5)  # admissions against the new replicas only
        assert loop.count >= 30, loop.count
        assert not loop.failures, (f"{len(loop.failures)} of {loop.count} admissions failed: {loop.failures[:3]} "
                                   f"... {loop.failures[-2:]}\nreplicas then: {loop.replica_states}\n"
                                   f"their events:\n{release_pod_events(cluster)}\nthe node now:\n{node_side(cluster)}")
        # The leaf the Service presents chains to the CA the Secret holds now.
        leaf = served_certificate(cluster, name)
        assert "BEGIN CERTIFICATE" in leaf, leaf
        assert secret_data(cluster, f"{name}-tls")["tls.crt"].decode().strip().startswith(leaf.splitlines()[0])
    finally:
        helm("uninstall", RELEASE, "--namespace", RELEASE_NAMESPACE, "--wait", "--timeout", "120s", check=False)


def test_provided_certificate_reloads_after_the_kubelets_secret_swap(
    cluster: ControlPlane, helm: Helm, images, namespace: str, chart_only, e2e_workdir
):
    """`provided` mode mounts the Secret as a volume; replacing the Secret reaches the pods
    through the kubelet's `..data` swap, and the webhook serves the new pair without a restart."""
    pki = e2e_workdir / "chart-provided"
    pki.mkdir(exist_ok=True)
    ca = make_ca(pki, "ca", "provided-ca")
    service = f"{RELEASE}-kaspr-packages-webhook"
    sans = [f"DNS:{service}.{RELEASE_NAMESPACE}.svc", f"DNS:{service}.{RELEASE_NAMESPACE}.svc.cluster.local"]
    first = make_cert(pki, ca, "first", "first-leaf", server_sans=sans)
    second = make_cert(pki, ca, "second", "second-leaf", server_sans=sans)
    if cluster.kubectl(["get", "namespace", RELEASE_NAMESPACE], check=False).returncode != 0:
        cluster.kubectl(["create", "namespace", RELEASE_NAMESPACE])

    def put_secret(pair) -> None:
        manifest = cluster.kubectl(["create", "secret", "tls", "provided-tls", "-n", RELEASE_NAMESPACE,
                                    f"--cert={pair.cert}", f"--key={pair.key}", "--dry-run=client", "-o", "json"]).stdout
        cluster.kubectl(["apply", "-f", "-"], input=manifest)

    put_secret(first)
    bundle = base64.b64encode(ca.cert.read_bytes()).decode()
    helm("install", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE, *image_values(images),
         "--set", "certificates.mode=provided", "--set", "certificates.provided.secretName=provided-tls",
         "--set", f"certificates.provided.caBundle={bundle}", "--wait", "--timeout", "240s")
    try:
        assert fullname(cluster) == service
        app = cluster.create(kasprapp("provided", {"packages": ["kasprdemo==1.0"]}), namespace=namespace)
        wait_for("admission through the provided certificate",
                 lambda: admit(cluster, namespace, "provided", app["metadata"]["uid"])[0], timeout=60, interval=1)
        assert "first-leaf" in _subject(served_certificate(cluster, service))

        put_secret(second)
        wait_for("the kubelet to swap the Secret volume and the webhook to serve the new pair",
                 lambda: "second-leaf" in _subject(served_certificate(cluster, service)), timeout=180, interval=2)
        ok, error = admit(cluster, namespace, "provided", app["metadata"]["uid"])
        assert ok, error
        statuses = [s for p in release_pods(cluster) for s in p["status"]["containerStatuses"]]
        assert [s.get("restartCount", 0) for s in statuses] == [0, 0], (
            [s.get("lastState") for s in statuses], release_pod_events(cluster), node_side(cluster))
    finally:
        helm("uninstall", RELEASE, "--namespace", RELEASE_NAMESPACE, "--wait", "--timeout", "120s", check=False)
        cluster.kubectl(["delete", "secret", "provided-tls", "-n", RELEASE_NAMESPACE, "--ignore-not-found"],
                        check=False)


def _subject(pem: str) -> str:
    if not pem:
        return ""
    proc = subprocess.run(["openssl", "x509", "-noout", "-subject"], input=pem, capture_output=True, text=True)
    if proc.returncode != 0:
        raise E2EError(proc.stderr)
    return proc.stdout
