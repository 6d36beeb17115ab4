"""The Helm chart against the real API server.

- `helm lint --strict` and `helm template` with the default values and each `ci/*-values.yaml`
  (every certificate mode, non-default values); every rendered manifest passes a server-side
  dry run, i.e. the API server's own schema of the pinned release; rendering is deterministic.
- `helm install`, `upgrade` and `uninstall` with the webhook process serving the chart's own
  registrations. Here the Deployment's pods are kept off the node (a node selector no node
  matches; test_chart_on_node.py runs them for real): the test runs the binary inside the
  network namespace with the arguments of the rendered Deployment, bound to loopback, as the
  chart's ServiceAccount (a token from `kubectl create token`), so the chart's RBAC is what it
  gets, and several replicas with fast settings can run side by side. The registrations point
  at it through `webhook.url` (loopback inside the namespace).
- Self-managed certificates: the Secret and caBundle survive an upgrade untouched, and a forced
  fast rotation across two replicas fails no admission.
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import pytest
import yaml

from e2e_cluster import ControlPlane, E2EError, Process, tail, wait_for
from e2e_objects import init_container, kasprapp, operator_statefulset
from e2e_webhook import parse_metrics

REPO = Path(__file__).resolve().parents[2]
CHART = Path(os.environ.get("KASPR_E2E_CHART", REPO / "charts" / "kaspr-packages-webhook"))
RELEASE_NAMESPACE = "kaspr-packages-system"
# Cert-manager's kinds need its CRDs, which this offline cluster does not have.
CERT_MANAGER_GROUP = "cert-manager.io"

pytestmark = pytest.mark.skipif(not (CHART / "Chart.yaml").exists(), reason=f"no chart at {CHART}")


class Helm:
    def __init__(self, cluster: ControlPlane, home: Path):
        self.cluster = cluster
        home.mkdir(parents=True, exist_ok=True)
        # helm keeps its state in these; never in the invoking user's home.
        self.env = [f"HELM_{kind}_HOME={home / kind.lower()}" for kind in ("CACHE", "CONFIG", "DATA")]

    def __call__(self, *args: str, check: bool = True):
        return self.cluster.netns.run(
            ["env", *self.env, str(self.cluster.tools.path("helm")),
             "--kubeconfig", str(self.cluster.admin_kubeconfig), *args],
            check=check, timeout=180,
        )


def _objects(manifest: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(manifest) if doc]


def _exists(cluster: ControlPlane, obj: dict) -> bool:
    kind = obj["kind"]
    group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
    resource = f"{kind}.{group}" if group else kind
    namespace = obj["metadata"].get("namespace") or RELEASE_NAMESPACE
    proc = cluster.kubectl(["get", resource, obj["metadata"]["name"], "-n", namespace, "--ignore-not-found",
                            "-o", "name"], check=False)
    return proc.returncode == 0 and proc.stdout.strip() != ""


def _ensure_namespace(cluster: ControlPlane, name: str) -> None:
    if cluster.kubectl(["get", "namespace", name], check=False).returncode != 0:
        cluster.kubectl(["create", "namespace", name])


def _value_files() -> list[Path]:
    return sorted((CHART / "ci").glob("*-values.yaml"))


@pytest.fixture
def helm(cluster: ControlPlane, e2e_workdir: Path) -> Helm:
    return Helm(cluster, e2e_workdir / "helm")


def cluster_version(cluster: ControlPlane) -> str:
    return json.loads(cluster.kubectl(["get", "--raw", "/version"]).stdout)["gitVersion"]


@pytest.mark.parametrize("version,accepted", [("v1.34.9", False), ("v1.35.0", True), ("v1.37.2", True),
                                              ("v1.38.0", True)])
def test_chart_refuses_releases_older_than_it_is_tested_on(cluster: ControlPlane, helm: Helm, version: str,
                                                          accepted: bool):
    proc = helm("template", "rendered", str(CHART), "--kube-version", version, check=False)
    if accepted:
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode != 0 and "kubeVersion: >=1.35.0-0" in proc.stderr, proc.stderr


def test_chart_lints_and_renders_valid_manifests_in_every_mode(cluster: ControlPlane, helm: Helm):
    _ensure_namespace(cluster, RELEASE_NAMESPACE)
    variants = [("defaults", [])] + [(f.name, ["-f", str(f)]) for f in _value_files()]
    assert len(variants) >= 4, "expected ci/ values for every certificate mode and non-default values"
    modes = set()
    for label, values in variants:
        helm("lint", "--strict", str(CHART), *values)
        # `helm template` assumes Kubernetes 1.20 unless told; the chart refuses that.
        args = ["template", "rendered", str(CHART), "--namespace", RELEASE_NAMESPACE,
                "--kube-version", cluster_version(cluster), *values]
        rendered = helm(*args).stdout
        # Deterministic: a GitOps tool rendering with `helm template` sees no churn.
        assert helm(*args).stdout == rendered, f"{label}: two renders differ"
        objects = _objects(rendered)
        by_kind = {}
        for obj in objects:
            by_kind.setdefault(obj["kind"], []).append(obj)
        assert {"Deployment", "Service", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                "PodDisruptionBudget", "MutatingWebhookConfiguration",
                "ValidatingWebhookConfiguration"} <= by_kind.keys(), (label, by_kind.keys())
        args_of = by_kind["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]["args"]
        mode = "self-managed" if "--self-managed-certs" in args_of else (
            "cert-manager" if "Certificate" in by_kind else "provided")
        modes.add(mode)
        _check_least_privilege(label, mode, objects)

        # The API server's own validation of every object (cert-manager kinds aside: no CRDs).
        core = [o for o in objects if not o["apiVersion"].startswith(CERT_MANAGER_GROUP + "/")]
        for namespace in {o["metadata"]["namespace"] for o in core if o["metadata"].get("namespace")}:
            _ensure_namespace(cluster, namespace)  # Roles of server.watchNamespaces live there
        if mode == "cert-manager":
            assert {"Certificate"} <= by_kind.keys(), label
        proc = cluster.apply_each_namespace(core, RELEASE_NAMESPACE, extra=["--dry-run=server"], check=False)
        assert proc.returncode == 0, f"{label}: server-side validation failed:\n{proc.stderr}"
    assert modes == {"self-managed", "cert-manager", "provided"}, modes


def _check_least_privilege(label: str, mode: str, objects: list[dict]) -> None:
    secret_rules = [rule for o in objects if o["kind"] in ("Role", "ClusterRole")
                    for rule in o.get("rules", []) if "secrets" in rule.get("resources", [])]
    if mode == "self-managed":
        assert secret_rules and all(r.get("resourceNames") and "create" not in r["verbs"] and "list" not in r["verbs"]
                                    for r in secret_rules), (label, secret_rules)
        assert not any(o["kind"] == "ClusterRole" and any("secrets" in r.get("resources", []) for r in o["rules"])
                       for o in objects), label
    else:
        assert not secret_rules, (label, secret_rules)
    pod = next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True, label
    assert container["readOnlyRootFilesystem"] is True and container["capabilities"]["drop"] == ["ALL"], label
    assert container["allowPrivilegeEscalation"] is False, label


# ---------------------------------------------------------------------------------------------
# The webhook as the Deployment would run it.


class ChartReplica:
    """One replica of the chart's Deployment, run as a process in the network namespace."""

    def __init__(self, cluster: ControlPlane, binary: Path, name: str, args: list[str], kubeconfig: Path):
        self.cluster = cluster
        self.name = name
        self.args = args
        self.kubeconfig = kubeconfig
        self.process: Process | None = None
        self.probe_port = next(a.rsplit(":", 1)[1] for a in args if a.startswith("--probe-listen="))
        self.binary = binary

    def start(self) -> None:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "KUBECONFIG": str(self.kubeconfig),
               "RUST_BACKTRACE": "1"}
        self.process = self.cluster.spawn(self.name, [str(self.binary), *self.args], env=env)

    def probe(self, path: str) -> tuple[int, str]:
        return self.cluster.http_get(f"http://127.0.0.1:{self.probe_port}{path}", timeout=2)

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            self.process.ensure_alive()
            return self.probe("/readyz")[0] == 200

        wait_for(f"{self.name} /readyz", ready, timeout=timeout, interval=0.3, on_timeout=self.log)

    def metric(self, name: str, **labels: str) -> float:
        status, body = self.probe("/metrics")
        if status != 200:
            raise E2EError(f"{self.name} /metrics answered {status}")
        return sum(v for n, lbls, v in parse_metrics(body)
                   if n == name and all(lbls.get(k) == want for k, want in labels.items()))

    def log(self) -> str:
        return tail(self.cluster.logs / f"{self.name}.log", 60)

    def stop(self) -> None:
        self.cluster.stop_process(self.process)
        self.process = None


def _deployment_args(manifest: list[dict]) -> tuple[list[str], str]:
    deployment = next(o for o in manifest if o["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert not container.get("env"), "the test would have to pass the container's env too"
    return container["args"], pod["serviceAccountName"]


def _service_account_kubeconfig(cluster: ControlPlane, service_account: str, path: Path) -> Path:
    token = cluster.kubectl(["create", "token", service_account, "-n", RELEASE_NAMESPACE,
                             "--duration=2h"]).stdout.strip()
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": {"server": cluster.server,
                                                "certificate-authority": str(cluster.ca.cert)}}],
        "users": [{"name": service_account, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "e2e", "user": service_account}}],
        "current-context": "sa",
    }
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


def _replica_args(args: list[str], cert_dir: Path, port_offset: int = 0) -> list[str]:
    """The Deployment's args, with the pod's emptyDir mapped to a directory of the test and,
    for a second replica on the same loopback, other ports."""
    out = []
    for arg in args:
        if arg.startswith("--cert-dir="):
            arg = f"--cert-dir={cert_dir}"
        elif port_offset and arg.startswith(("--listen=", "--probe-listen=")):
            flag, _, addr = arg.partition("=")
            host, _, port = addr.rpartition(":")
            arg = f"{flag}={host}:{int(port) + port_offset}"
        out.append(arg)
    return out


def _secret(cluster: ControlPlane, name: str) -> dict[str, bytes]:
    data = cluster.get_json("secret", name, namespace=RELEASE_NAMESPACE).get("data") or {}
    return {k: base64.b64decode(v) for k, v in data.items()}


def _ca_bundles(cluster: ControlPlane, name: str) -> list[bytes]:
    bundles = []
    for kind in ("mutatingwebhookconfiguration", "validatingwebhookconfiguration"):
        for hook in cluster.get_json(kind, name)["webhooks"]:
            bundles.append(base64.b64decode(hook["clientConfig"].get("caBundle", "")))
    return bundles


def _wait_bundles_match_secret(cluster: ControlPlane, fullname: str, replica: ChartReplica) -> dict[str, bytes]:
    def in_step():
        secret = _secret(cluster, f"{fullname}-tls")
        bundle = secret.get("ca-bundle.crt")
        return secret if bundle and all(b == bundle for b in _ca_bundles(cluster, fullname)) else None

    return wait_for("the Secret's CA bundle in every webhook configuration", in_step, timeout=60,
                    on_timeout=replica.log)


def _admit_owned_statefulset(cluster: ControlPlane, namespace: str, app: str, uid: str) -> tuple[bool, str]:
    """A server-side dry run of an owned StatefulSet: (mutated, error text)."""
    proc = cluster.kubectl(["create", "--dry-run=server", "-o", "json", "-n", namespace, "-f", "-"],
                           input=json.dumps(operator_statefulset(app, uid, replicas=1)), check=False)
    if proc.returncode != 0:
        return False, proc.stderr
    spec = json.loads(proc.stdout)["spec"]["template"]["spec"]
    return init_container(spec) is not None, "" if init_container(spec) else "not mutated"


REQUESTS = "kaspr_packages_webhook_admission_requests_total"
EXPIRY = "kaspr_packages_webhook_certificate_expiry_timestamp_seconds"


class Release:
    """A chart release whose webhook runs as processes in the namespace; always cleaned up."""

    def __init__(self, cluster: ControlPlane, helm: Helm, binary: Path, workdir: Path, name: str):
        self.cluster, self.helm, self.binary, self.name = cluster, helm, binary, name
        self.workdir = workdir / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.fullname = f"{name}-kaspr-packages-webhook"
        self.replicas: list[ChartReplica] = []
        self.manifest: list[dict] = []

    def install(self, *values: str) -> None:
        _ensure_namespace(self.cluster, RELEASE_NAMESPACE)
        self.helm("install", self.name, str(CHART), "--namespace", RELEASE_NAMESPACE,
                  # The replicas are host processes here: keep the Deployment's pods off the node.
                  "--set-string", "nodeSelector.kaspr-e2e/no-such-node=true", "--set", "server.bindAddress=127.0.0.1",
                  *values)
        self.manifest = _objects(self.helm("get", "manifest", self.name, "--namespace", RELEASE_NAMESPACE).stdout)

    def start_replicas(self, count: int) -> list[ChartReplica]:
        args, service_account = _deployment_args(self.manifest)
        kubeconfig = _service_account_kubeconfig(self.cluster, service_account, self.workdir / "sa.kubeconfig")
        for i in range(count):
            replica = ChartReplica(self.cluster, self.binary, f"{self.name}-{i}",
                                   _replica_args(args, self.workdir / f"certs-{i}", port_offset=i), kubeconfig)
            replica.start()
            self.replicas.append(replica)
        for replica in self.replicas:
            replica.wait_ready()
        return self.replicas

    def cleanup(self) -> None:
        for replica in self.replicas:
            replica.stop()
        self.helm("uninstall", self.name, "--namespace", RELEASE_NAMESPACE, check=False)
        # Whatever happened, leave no registration behind for the other tests.
        for kind in ("mutatingwebhookconfiguration", "validatingwebhookconfiguration"):
            self.cluster.kubectl(["delete", kind, self.fullname, "--ignore-not-found"], check=False)


@pytest.fixture
def release_factory(cluster: ControlPlane, helm: Helm, webhook_binary: Path, e2e_workdir: Path):
    releases: list[Release] = []

    def make(name: str) -> Release:
        release = Release(cluster, helm, webhook_binary, e2e_workdir / "chart-releases", name)
        releases.append(release)
        return release

    yield make
    for release in releases:
        release.cleanup()


def test_chart_installs_serves_upgrades_and_uninstalls(cluster: ControlPlane, helm: Helm, release_factory,
                                                       namespace: str):
    release = release_factory("e2e-chart")
    # Self-managed certificates (the default); the registrations call the process on loopback.
    values = ["--set", "webhook.url=https://127.0.0.1:10250", "--set", "probes.port=18080",
              "--set", "certificates.selfManaged.checkInterval=1s", "--set", "certificates.selfManaged.overlap=5s"]
    release.install(*values)
    missing = [f"{o['kind']}/{o['metadata']['name']}" for o in release.manifest if not _exists(cluster, o)]
    assert not missing, missing
    assert not _secret(cluster, f"{release.fullname}-tls"), "the chart creates the Secret empty"

    (replica,) = release.start_replicas(1)
    secret = _wait_bundles_match_secret(cluster, release.fullname, replica)
    assert {"ca.crt", "tls.crt", "tls.key", "ca-bundle.crt"} <= secret.keys()

    # The chart's registrations reach this process: a KasprApp is validated, an owned
    # StatefulSet mutated, an invalid KasprApp refused.
    validated = replica.metric(REQUESTS, endpoint="validate")
    cluster.apply(kasprapp("charted", {"packages": ["kasprdemo==1.0"]}), namespace=namespace)
    assert replica.metric(REQUESTS, endpoint="validate") > validated
    uid = cluster.get_json("kasprapp", "charted", namespace=namespace)["metadata"]["uid"]
    mutated_before = replica.metric(REQUESTS, endpoint="mutate", kind="StatefulSet")
    mutated, error = _admit_owned_statefulset(cluster, namespace, "charted", uid)
    assert mutated, error
    assert replica.metric(REQUESTS, endpoint="mutate", kind="StatefulSet") > mutated_before
    bad = cluster.kubectl(["create", "-n", namespace, "-f", "-"], check=False,
                          input=json.dumps(kasprapp("refused", {"packages": ["-e ."]})))
    assert bad.returncode != 0 and "spec.pythonPackages.packages[0]" in bad.stderr, bad.stderr

    # Upgrade with a changed registration: Helm patches the configurations, and keeps the
    # Secret and the caBundle the webhook wrote (the webhook need not write them again).
    writes_before = replica.log().count("CA bundle written")
    helm("upgrade", release.name, str(CHART), "--namespace", RELEASE_NAMESPACE, "--reuse-values",
         "--set", "webhook.timeoutSeconds=9")
    status = json.loads(helm("status", release.name, "--namespace", RELEASE_NAMESPACE, "-o", "json").stdout)
    assert status["version"] == 2 and status["info"]["status"] == "deployed", status["info"]
    hooks = cluster.get_json("mutatingwebhookconfiguration", release.fullname)["webhooks"]
    assert {h["timeoutSeconds"] for h in hooks} == {9}
    assert _secret(cluster, f"{release.fullname}-tls") == secret
    assert all(b == secret["ca-bundle.crt"] for b in _ca_bundles(cluster, release.fullname))
    mutated, error = _admit_owned_statefulset(cluster, namespace, "charted", uid)
    assert mutated, error
    time.sleep(3)  # a few of the webhook's checks
    assert replica.log().count("CA bundle written") == writes_before, replica.log()
    assert _secret(cluster, f"{release.fullname}-tls") == secret

    replica.stop()
    helm("uninstall", release.name, "--namespace", RELEASE_NAMESPACE, "--wait", "--timeout", "60s")
    wait_for("the release's objects to be gone",
             lambda: not any(_exists(cluster, o) for o in release.manifest), timeout=60)
    assert json.loads(helm("list", "--namespace", RELEASE_NAMESPACE, "-o", "json").stdout) == []


def test_self_managed_rotation_fails_no_admission(cluster: ControlPlane, release_factory, namespace: str):
    """Two replicas share the Secret; with a 24 s validity the CA and certificate rotate every
    ~18 s (stage 10 s before expiry, promote and retire 4 s apart), while admissions keep going
    through the registrations. Not one may fail."""
    release = release_factory("e2e-rotation")
    release.install(
        "--set", "webhook.url=https://127.0.0.1:10250", "--set", "probes.port=18080",
        "--set", "certificates.selfManaged.validity=24s", "--set", "certificates.selfManaged.renewBefore=10s",
        "--set", "certificates.selfManaged.overlap=4s", "--set", "certificates.selfManaged.checkInterval=1s",
    )
    first, second = release.start_replicas(2)
    _wait_bundles_match_secret(cluster, release.fullname, first)
    cluster.apply(kasprapp("rotating", {"packages": ["kasprdemo==1.0"]}), namespace=namespace)
    uid = cluster.get_json("kasprapp", "rotating", namespace=namespace)["metadata"]["uid"]

    served_cas: list[bytes] = []
    bundle_sizes: set[int] = set()
    failures: list[str] = []
    admissions = 0
    deadline = time.monotonic() + 90
    for _ in range(1000):
        if time.monotonic() > deadline:
            break
        mutated, error = _admit_owned_statefulset(cluster, namespace, "rotating", uid)
        admissions += 1
        if not mutated:
            failures.append(error)
        secret = _secret(cluster, f"{release.fullname}-tls")
        ca = secret.get("ca.crt", b"")
        if not served_cas or served_cas[-1] != ca:
            served_cas.append(ca)
        trusted = secret.get("ca-bundle.crt", b"").count(b"BEGIN CERTIFICATE")
        bundle_sizes.add(trusted)
        # Two rotations after the first CA, the last one retired.
        if len(served_cas) >= 3 and trusted == 1:
            break
    assert not failures, f"{len(failures)} of {admissions} admissions failed during rotation: {failures[:3]}"
    assert len(served_cas) >= 3, f"only {len(served_cas)} CAs served in 90 s\n{first.log()}"
    assert bundle_sizes >= {1, 2}, bundle_sizes
    assert admissions >= 20, admissions
    for replica in (first, second):
        replica.process.ensure_alive()
    # Both replicas serve the same generation once the Secret is still for a check interval.
    wait_for("both replicas to serve the same certificate",
             lambda: first.metric(EXPIRY) == second.metric(EXPIRY) > 0, timeout=20, interval=0.3)
    for replica in (first, second):
        assert "check failed" not in replica.log(), replica.log()
