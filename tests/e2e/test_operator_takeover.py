"""Kaspr operator v0.14+ compatibility: the operator renders `pythonPackages` itself (an init
container `install-packages`), and the KasprApp annotation `packages.kaspr.io/operator-packages:
takeover` hands the injection to the webhook (e2e_operator.py plays the operator).

- The operator's CRD types `spec.pythonPackages` and prunes what it does not declare: every
  setting of ours lives in annotations and survives a round trip through it.
- Under takeover both operator loops converge at once: one ControllerRevision per package
  configuration, no pod replaced, no write of ours, no whole-template replacement.
- The declared securityContexts reach the pod, so a taken-over app runs in a namespace
  enforcing Pod Security `restricted`, which the operator's own rendering never passes.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from e2e_cluster import ControlPlane, wait_for
from e2e_index import PackageIndex
from e2e_objects import RESTRICTED_CONTAINER_SECURITY, kasprapp, operator_statefulset
from e2e_operator import OPERATOR_INIT, OperatorLoops, packages_hash, render, watch_fields
from e2e_webhook import Webhook
from test_node_pods import app_statefulset, credentials_secret, logs, python_packages

MANIFESTS = Path(__file__).parent / "manifests"
TAKEOVER = {"packages.kaspr.io/operator-packages": "takeover"}
RECONCILES = "kaspr_packages_webhook_controller_reconciles_total"
# The operator's schema, installed under a group of its own beside the suite's KasprApp CRD.
SCHEMA_GROUP = "operator-schema.kaspr.io"
SCHEMA_PLURAL = "operatorkasprapps"


def _revisions(cluster: ControlPlane, namespace: str, sts_name: str) -> list[dict]:
    items = cluster.get_json("controllerrevisions", namespace=namespace)["items"]
    return [r for r in items if any(o["name"] == sts_name for o in r["metadata"].get("ownerReferences") or [])]


def _pod_uids(cluster: ControlPlane, namespace: str, app: str) -> list[str]:
    return sorted(p["metadata"]["uid"] for p in cluster.pods(namespace, f"kaspr.io/app={app}"))


def _with_annotations(app: dict, annotations: dict) -> dict:
    app["metadata"]["annotations"] = dict(annotations)
    app["spec"]["authentication"] = {}  # required by the operator's CRD
    return app


# -- the operator's CRD -------------------------------------------------------------------------

@pytest.fixture
def operator_schema(cluster: ControlPlane) -> str:
    """The operator's CRD under a group and resource names of its own, so that `kubectl get
    kasprapp` elsewhere stays unambiguous; the schema is the operator's."""
    crd = yaml.safe_load((MANIFESTS / "kasprapp-crd-operator.yaml").read_text())
    name = f"{SCHEMA_PLURAL}.{SCHEMA_GROUP}"
    crd["metadata"]["name"] = name
    crd["spec"]["group"] = SCHEMA_GROUP
    crd["spec"]["names"] = {"kind": "KasprApp", "listKind": "KasprAppList", "plural": SCHEMA_PLURAL,
                            "singular": SCHEMA_PLURAL.removesuffix("s")}
    cluster.kubectl(["apply", "-f", "-"], input=json.dumps(crd))
    cluster.kubectl(["wait", "--for=condition=Established", "--timeout=60s", f"crd/{name}"], timeout=90)
    yield name
    cluster.kubectl(["delete", "crd", name, "--timeout=60s"], check=False, timeout=90)


def test_every_setting_of_ours_survives_the_operators_crd(cluster: ControlPlane, operator_schema: str,
                                                         namespace: str, webhook_binary: Path, tmp_path: Path):
    ours = {
        "packages.kaspr.io/operator-packages": "takeover",
        "packages.kaspr.io/gcs-auth": "workload-identity",
        "packages.kaspr.io/mode": "cache",
        "packages.kaspr.io/install-tool": "uv",
        # A revision no webhook of this cluster runs: stored, and nothing moves.
        "packages.kaspr.io/move-to-revision": "roundtrip-canary",
    }
    packages = {
        "packages": ["requests==2.31.0"],
        # Workload Identity in a form the CRD accepts: it requires secretRef.name, the
        # annotation says it is not used.
        "cache": {"type": "gcs", "gcs": {"bucket": "kaspr-cache", "secretRef": {"name": "unused"}}},
        # What a new setting under pythonPackages would meet: pruned.
        "installer": "uv",
    }
    app = _with_annotations(kasprapp("roundtrip", packages, template={
        "kasprContainer": {"securityContext": RESTRICTED_CONTAINER_SECURITY},
        "pythonPackagesInitContainer": {"securityContext": {"readOnlyRootFilesystem": True}},
    }), ours)
    app["apiVersion"] = f"{SCHEMA_GROUP}/v1alpha1"
    # kubectl asks for strict field validation: the undeclared key is refused by name...
    strict = cluster.kubectl(["create", "-n", namespace, "-f", "-"], input=json.dumps(app), check=False)
    assert strict.returncode != 0 and 'unknown field "spec.pythonPackages.installer"' in strict.stderr, \
        strict.stderr
    # ...a client that does not (the operator's, most controllers, GitOps tools) loses it.
    stored = json.loads(cluster.kubectl(["create", "--validate=false", "-n", namespace, "-o", "json", "-f", "-"],
                                        input=json.dumps(app)).stdout)

    assert {k: v for k, v in stored["metadata"]["annotations"].items() if k.startswith("packages.kaspr.io/")} == ours
    assert "installer" not in stored["spec"]["pythonPackages"], "the typed object prunes undeclared keys"
    assert stored["spec"]["pythonPackages"]["cache"] == {
        "type": "gcs", "enabled": False, "accessMode": "ReadWriteMany",
        "gcs": {"bucket": "kaspr-cache", "prefix": "kaspr-packages/", "maxArchiveSize": "1Gi",
                "secretRef": {"name": "unused", "key": "sa.json"}},
    }
    assert stored["spec"]["template"]["kasprContainer"]["securityContext"] == RESTRICTED_CONTAINER_SECURITY

    # What the webhook makes of the stored object: takeover, no key Secret, both contexts.
    stored["apiVersion"] = "kaspr.io/v1alpha1"
    (tmp_path / "app.json").write_text(json.dumps(stored))
    base = operator_statefulset("roundtrip", stored["metadata"]["uid"], replicas=1)
    base["metadata"]["namespace"] = namespace
    (tmp_path / "sts.json").write_text(json.dumps(render(base, "roundtrip", stored["spec"]["pythonPackages"])))
    out = subprocess.run([str(webhook_binary), "preview", "--kasprapp", str(tmp_path / "app.json"),
                          "--object", str(tmp_path / "sts.json"), "--output", "json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    pod = json.loads(out.stdout)["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["name"] == OPERATOR_INIT and init["command"][0] == "python3", init
    config = json.loads(next(e["value"] for e in init["env"] if e["name"] == "KASPR_PACKAGES_CONFIG"))
    assert config["gcs"]["bucket"] == "kaspr-cache" and "keyFile" not in config["gcs"], config
    assert config["installTool"] == "uv", config
    assert {v["name"] for v in pod["volumes"]}.isdisjoint({"gcs-sa-key", "kaspr-packages-gcs-key"}), pod["volumes"]
    assert pod["containers"][0]["securityContext"] == RESTRICTED_CONTAINER_SECURITY
    assert init["securityContext"]["readOnlyRootFilesystem"] is True
    assert "securityContext" not in out.stderr, out.stderr  # no "unknown field" warning

    # Without the annotation, Workload Identity (no secretRef) cannot be written there at all.
    no_ref = _with_annotations(kasprapp("no-ref", {
        "packages": ["requests==2.31.0"], "cache": {"type": "gcs", "gcs": {"bucket": "kaspr-cache"}}}), {})
    no_ref["apiVersion"] = f"{SCHEMA_GROUP}/v1alpha1"
    refused = cluster.kubectl(["create", "-n", namespace, "-f", "-"], input=json.dumps(no_ref), check=False)
    assert refused.returncode != 0 and "secretRef" in refused.stderr, refused.stderr


# -- both loops --------------------------------------------------------------------------------

def test_takeover_converges_with_both_operator_loops(cluster: ControlPlane, webhook: Webhook, namespace: str):
    """PVC mode, where the operator's watch compares PACKAGES_HASH on both containers. About
    two and a half minutes of the operator's real periods, with one package change."""
    name = "quiet"
    packages = {"packages": ["kasprdemo==1.0"], "cache": {"type": "pvc", "enabled": True}}
    app = cluster.create(_with_annotations(kasprapp(name, packages), TAKEOVER), namespace=namespace)
    base = operator_statefulset(name, app["metadata"]["uid"], replicas=1)
    cluster.create(render(base, name, packages), namespace=namespace)
    sts_name = f"{name}-app"
    stored = cluster.get_json("statefulset", sts_name, namespace=namespace)
    pod = stored["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == [OPERATOR_INIT]
    assert pod["initContainers"][0]["command"][0] == "python3"
    assert watch_fields(stored) == watch_fields(render(base, name, packages))
    cluster.wait_pods(namespace, f"kaspr.io/app={name}", 1)
    wait_for("the first ControllerRevision", lambda: len(_revisions(cluster, namespace, sts_name)) == 1, timeout=30)

    def steady(seconds: float, loops: OperatorLoops) -> None:
        before = cluster.get_json("statefulset", sts_name, namespace=namespace)
        pods = _pod_uids(cluster, namespace, name)
        ours = webhook.metric(RECONCILES, part="rollout", outcome="changed")
        patches, replacements = loops.patches, loops.replacements
        time.sleep(seconds)
        after = cluster.get_json("statefulset", sts_name, namespace=namespace)
        assert loops.patches - patches >= int(seconds // loops.patch_every) - 1, "the 10 s loop ran"
        assert loops.replacements == replacements, "no whole-template replacement in steady state"
        assert after["metadata"]["generation"] == before["metadata"]["generation"], "no spec write"
        assert after["spec"]["template"] == before["spec"]["template"]
        assert _pod_uids(cluster, namespace, name) == pods, "no pod replaced"
        assert webhook.metric(RECONCILES, part="rollout", outcome="changed") == ours, "no write of ours"

    loops = OperatorLoops(cluster, namespace, name, base).start()
    try:
        steady(65, loops)
        assert len(_revisions(cluster, namespace, sts_name)) == 1

        # A package change: the operator's next 10 s patch brings its new PACKAGES_HASH on the
        # main container, the webhook renders the new packages with that hash on both watch
        # fields (or, had the comparison come first, its replacement does), and our controller
        # leaves the rollout to the operator: one new revision.
        changed = dict(packages, packages=["kasprdemo==2.0"])
        cluster.kubectl(["patch", "kasprapp", name, "-n", namespace, "--type=merge",
                         "-p", json.dumps({"spec": {"pythonPackages": changed}})])
        wait_for("the new configuration on both watch fields", lambda: watch_fields(cluster.get_json(
            "statefulset", sts_name, namespace=namespace))[3:] == (packages_hash(changed),) * 2, timeout=45)
        assert loops.replacements <= 1
        replacements = loops.replacements
        steady(65, loops)
        assert loops.replacements == replacements
        assert len(_revisions(cluster, namespace, sts_name)) == 2, "one revision per configuration"
    finally:
        loops.stop()
    assert not loops.errors, loops.errors


# -- Pod Security restricted, on the node --------------------------------------------------------

@pytest.fixture
def app_image(images) -> str:
    return images["app"].ref


def test_a_taken_over_app_runs_in_a_restricted_namespace(cluster: ControlPlane, webhook: Webhook, namespace: str,
                                                        package_index: PackageIndex, app_image: str):
    cluster.kubectl(["label", "namespace", namespace,
                     "pod-security.kubernetes.io/enforce=restricted",
                     "pod-security.kubernetes.io/enforce-version=latest"])
    credentials_secret(cluster, namespace, package_index)
    packages = python_packages(package_index, ["kasprdemo==1.0"])
    template = {"kasprContainer": {"securityContext": RESTRICTED_CONTAINER_SECURITY},
                "pythonPackagesInitContainer": {"securityContext": {"runAsUser": 1000}}}

    def deploy(name: str, annotations: dict) -> dict:
        app = cluster.create(_with_annotations(kasprapp(name, packages, template=template), annotations),
                             namespace=namespace)
        base = app_statefulset(name, app["metadata"]["uid"], app_image)
        cluster.create(render(base, name, packages), namespace=namespace)
        return base

    # Respect: the operator's own rendering has no container securityContext; never admitted.
    deploy("respected", {})
    wait_for("the refusal of the operator's pod", lambda: any(
        "violates PodSecurity" in e.get("message", "") for e in cluster.get_json(
            "events", namespace=namespace)["items"] if e["involvedObject"]["name"] == "respected-app"), timeout=60)
    assert cluster.pods(namespace, "kaspr.io/app=respected") == []

    # Takeover: admitted, our installer runs as install-packages, the app imports the package.
    deploy("taken", TAKEOVER)
    (pod,) = cluster.wait_pods_ready(namespace, "kaspr.io/app=taken", 1)
    spec = pod["spec"]
    assert [c["name"] for c in spec["initContainers"]] == [OPERATOR_INIT]
    assert spec["containers"][0]["securityContext"] == RESTRICTED_CONTAINER_SECURITY
    pythonpath = next(e["value"] for e in spec["containers"][0]["env"] if e["name"] == "PYTHONPATH")
    assert pythonpath == "/opt/kaspr/packages/site", pythonpath
    status = next(s for s in pod["status"]["initContainerStatuses"] if s["name"] == OPERATOR_INIT)
    terminated = status["state"]["terminated"]
    # What the operator reads for its status: exit code and termination message of
    # install-packages, now our installer's one-line summary.
    assert terminated["exitCode"] == 0 and terminated.get("message"), terminated
    app_log = logs(cluster, namespace, pod["metadata"]["name"], "kaspr")
    assert "kasprdemo 1.0 /opt/kaspr/packages/" in app_log, app_log
    assert "uid 1000" in app_log, app_log
    assert package_index.password not in logs(cluster, namespace, pod["metadata"]["name"], OPERATOR_INIT)


# -- switching modes: one cache, no orphans ------------------------------------------------------

def _claims(cluster: ControlPlane, namespace: str) -> set[str]:
    return {c["metadata"]["name"] for c in cluster.get_json("pvc", namespace=namespace)["items"]
            if not c["metadata"].get("deletionTimestamp")}


def _claims_in_pods(cluster: ControlPlane, namespace: str, app: str) -> set[str]:
    return {v["persistentVolumeClaim"]["claimName"] for p in cluster.pods(namespace, f"kaspr.io/app={app}")
            for v in p["spec"].get("volumes") or [] if "persistentVolumeClaim" in v}


SWITCH_CACHES = {
    "emptyDir": {},
    "pvc": {"cache": {"type": "pvc", "enabled": True}},
    "gcs": {"cache": {"type": "gcs", "gcs": {"bucket": "kaspr-cache", "secretRef": {"name": "gcs-key"}}}},
}


@pytest.mark.parametrize("mode", list(SWITCH_CACHES))
def test_switching_to_takeover_and_back_keeps_one_cache_per_mode(cluster: ControlPlane, webhook: Webhook,
                                                                namespace: str, mode: str):
    """Respect: the operator's injection (in PVC mode its claim) serves the pods and no claim of
    ours exists. Takeover: ours serves them; the operator's claim stays the operator's, mounted
    by no pod. Back to respect: the operator's injection returns through its own watch, and our
    claim is deleted once unused. The loops run fast here."""
    name = f"switch-{mode.lower()}"
    packages = {"packages": ["kasprdemo==1.0"], **SWITCH_CACHES[mode]}
    app = cluster.create(_with_annotations(kasprapp(name, packages), {}), namespace=namespace)
    base = operator_statefulset(name, app["metadata"]["uid"], replicas=1)
    loops = OperatorLoops(cluster, namespace, name, base, patch_every=2, compare_every=5)
    loops.sync_claim()
    cluster.create(render(base, name, packages), namespace=namespace)
    sts_name = f"{name}-app"
    pvc = mode == "pvc"
    theirs = {f"{name}-app-python-packages"} if pvc else set()
    ours = {f"{name}-python-packages"} if pvc else set()

    def injection() -> str:
        sts = cluster.get_json("statefulset", sts_name, namespace=namespace)
        (init,) = sts["spec"]["template"]["spec"]["initContainers"]
        return "ours" if init["command"][0] == "python3" else "theirs"

    def settled(expected_injection: str, claims: set[str], mounted: set[str]) -> bool:
        pods = cluster.pods(namespace, f"kaspr.io/app={name}")
        return (injection() == expected_injection and _claims(cluster, namespace) == claims
                and len(pods) == 1 and _claims_in_pods(cluster, namespace, name) == mounted
                and all((p["metadata"].get("annotations") or {}).get("packages.kaspr.io/template-hash")
                        for p in pods) == (expected_injection == "ours"))

    loops.start()
    try:
        wait_for("respect: the operator's injection and claim only",
                 lambda: settled("theirs", theirs, theirs), timeout=60)
        cluster.kubectl(["annotate", "kasprapp", name, "-n", namespace,
                         "packages.kaspr.io/operator-packages=takeover"])
        wait_for("takeover: our injection, our claim in the pods",
                 lambda: settled("ours", theirs | ours, ours), timeout=90)
        cluster.kubectl(["annotate", "--overwrite", "kasprapp", name, "-n", namespace,
                         "packages.kaspr.io/operator-packages=respect"])
        wait_for("respect again: the operator's injection and claim only",
                 lambda: settled("theirs", theirs, theirs), timeout=120)
    finally:
        loops.stop()
    assert not loops.errors, loops.errors
    final = cluster.get_json("statefulset", sts_name, namespace=namespace)
    assert watch_fields(final) == watch_fields(loops.desired())
    annotations = final["spec"]["template"]["metadata"].get("annotations") or {}
    assert not [k for k in annotations if k.startswith("packages.kaspr.io/")], annotations
