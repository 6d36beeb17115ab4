"""Admission on a real control plane: what the API server stores
and what the StatefulSet controller creates once the webhook is registered."""

from __future__ import annotations

import json
import re
import time

import yaml

from e2e_cluster import ControlPlane, wait_for
from e2e_objects import (
    INSTALL_KEY_ANNOTATION,
    SITE_DIR,
    TEMPLATE_HASH_ANNOTATION,
    assert_injected,
    assert_not_injected,
    container,
    env_value,
    init_container,
    kasprapp,
    operator_statefulset,
    plain_statefulset,
)
from e2e_webhook import Webhook

PACKAGES = {"packages": ["kasprdemo==1.0"]}


def _app(cluster: ControlPlane, namespace: str, name: str, python_packages: dict | None = PACKAGES) -> str:
    """Create a KasprApp and return its uid (the owner reference must carry the real one)."""
    created = cluster.create(kasprapp(name, python_packages), namespace=namespace)
    return created["metadata"]["uid"]


def _template(sts: dict) -> tuple[dict, dict]:
    template = sts["spec"]["template"]
    return template["spec"], template["metadata"].get("annotations") or {}


def _revisions(cluster: ControlPlane, namespace: str, sts_name: str) -> list[dict]:
    items = cluster.get_json("controllerrevisions", namespace=namespace)["items"]
    return [r for r in items if any(o["name"] == sts_name for o in r["metadata"].get("ownerReferences") or [])]


# 1 ---------------------------------------------------------------------------------------------
def test_owned_statefulset_pods_come_out_mutated(cluster: ControlPlane, webhook: Webhook, namespace: str):
    before = webhook.admission_requests(kind="StatefulSet", operation="CREATE")
    uid = _app(cluster, namespace, "orders")
    cluster.create(operator_statefulset("orders", uid, replicas=3), namespace=namespace)

    stored = cluster.get_json("statefulset", "orders-app", namespace=namespace)
    spec, annotations = _template(stored)
    assert_injected(spec, annotations)
    assert re.fullmatch(r"[0-9a-f]{16}", annotations[INSTALL_KEY_ANNOTATION]), annotations
    # The operator's own PYTHONPATH is kept after ours.
    assert env_value(container(spec, "kaspr"), "PYTHONPATH")["value"] == f"{SITE_DIR}:/app/lib"
    assert webhook.admission_requests(kind="StatefulSet", operation="CREATE") >= before + 1

    pods = cluster.wait_pods(namespace, "kaspr.io/app=orders", 3)
    assert [p["metadata"]["name"] for p in pods] == ["orders-app-0", "orders-app-1", "orders-app-2"]
    for pod in pods:
        pod_annotations = pod["metadata"].get("annotations") or {}
        init = assert_injected(pod["spec"], pod_annotations)
        assert pod_annotations[TEMPLATE_HASH_ANNOTATION] == annotations[TEMPLATE_HASH_ANNOTATION]
        # Injected exactly once, even though the Pod path saw these pods too.
        assert [c["name"] for c in pod["spec"]["initContainers"]].count(init["name"]) == 1
        config = json.loads(env_value(init, "KASPR_PACKAGES_CONFIG")["value"])
        assert "kasprdemo==1.0" in json.dumps(config)


# 2 ---------------------------------------------------------------------------------------------
def test_server_dry_run_shows_injection_and_creates_nothing(cluster: ControlPlane, webhook: Webhook, namespace: str):
    # A lower-bound-only requirement and onFailure allow both earn warnings.
    uid = _app(cluster, namespace, "preview",
               {"packages": ["kasprdemo>=1.0"], "installPolicy": {"onFailure": "allow"}})
    sts = operator_statefulset("preview", uid, replicas=2)
    proc = cluster.kubectl(["apply", "--dry-run=server", "-o", "yaml", "-n", namespace, "-f", "-"],
                           input=json.dumps(sts))
    shown = yaml.safe_load(proc.stdout)
    spec, annotations = _template(shown)
    assert_injected(spec, annotations)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("Warning:")]
    assert warnings, f"no admission warnings on stderr: {proc.stderr!r}"
    assert any("kasprdemo" in w for w in warnings), warnings

    missing = cluster.kubectl(["get", "statefulset", "preview-app", "-n", namespace], check=False)
    assert missing.returncode != 0 and "NotFound" in missing.stderr
    time.sleep(2)  # give a wrongly created object's controller time to make pods
    assert cluster.pods(namespace, "kaspr.io/app=preview") == []


# 3 ---------------------------------------------------------------------------------------------
def test_unrelated_statefulsets_never_reach_the_webhook(cluster: ControlPlane, webhook: Webhook, namespace: str):
    sts_before = webhook.admission_requests(kind="StatefulSet")
    pods_before = webhook.admission_requests(kind="Pod")
    cluster.create(plain_statefulset("web", replicas=2), namespace=namespace)
    cluster.wait_pods(namespace, "app=web", 2)
    assert webhook.admission_requests(kind="StatefulSet") == sts_before
    assert webhook.admission_requests(kind="Pod") == pods_before

    # Positive control: the counter does move for an owned StatefulSet.
    uid = _app(cluster, namespace, "counted")
    cluster.kubectl(["create", "--dry-run=server", "-n", namespace, "-f", "-"],
                    input=json.dumps(operator_statefulset("counted", uid, replicas=1)))
    assert webhook.admission_requests(kind="StatefulSet") == sts_before + 1

    webhook.stop()
    try:
        # failurePolicy Fail, webhook down: unrelated objects are still admitted...
        cluster.create(plain_statefulset("web-while-down", replicas=1), namespace=namespace)
        cluster.wait_pods(namespace, "app=web-while-down", 1)
        # ...while an owned one is refused, which proves the webhook really is required for it.
        refused = cluster.kubectl(["create", "-n", namespace, "-f", "-"],
                                  input=json.dumps(operator_statefulset("counted", uid, replicas=1)), check=False)
        assert refused.returncode != 0
        assert "failed calling webhook" in refused.stderr, refused.stderr
    finally:
        webhook.start()


# 4 ---------------------------------------------------------------------------------------------
def test_restricted_namespace_admits_mutated_pods(cluster: ControlPlane, webhook: Webhook, namespace: str):
    cluster.kubectl(["label", "namespace", namespace,
                     "pod-security.kubernetes.io/enforce=restricted",
                     "pod-security.kubernetes.io/enforce-version=latest"])
    # Negative control: the namespace really enforces `restricted`.
    plain_pod = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "not-restricted"},
        "spec": {"containers": [{"name": "c", "image": "registry.example/c:1"}]},
    }
    refused = cluster.kubectl(["create", "-n", namespace, "-f", "-"], input=json.dumps(plain_pod), check=False)
    assert refused.returncode != 0 and "violates PodSecurity" in refused.stderr, refused.stderr

    uid = _app(cluster, namespace, "secure")
    cluster.create(operator_statefulset("secure", uid, replicas=2, restricted=True), namespace=namespace)
    pods = cluster.wait_pods(namespace, "kaspr.io/app=secure", 2)
    for pod in pods:
        init = assert_injected(pod["spec"], pod["metadata"].get("annotations") or {})
        sc = init["securityContext"]
        assert sc.get("runAsNonRoot") is True, sc
        assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault" or \
            pod["spec"].get("securityContext", {}).get("seccompProfile", {}).get("type") == "RuntimeDefault"


# 5 ---------------------------------------------------------------------------------------------
INVALID = {
    "packages": ["requests; rm -rf /", "-e git+https://example.com/x.git", "file:///tmp/pkg"],
    "indexUrl": "ftp://index.example",
    "credentials": {"secretRef": {}},
    "cache": {"type": "pvc", "accessMode": "ReadWriteOnce", "size": "lots"},
    "installPolicy": {"retries": 99, "timeout": 5, "onFailure": "sometimes"},
}
INVALID_PATHS = [
    "spec.pythonPackages.packages[0]",
    "spec.pythonPackages.packages[1]",
    "spec.pythonPackages.packages[2]",
    "spec.pythonPackages.indexUrl",
    "spec.pythonPackages.credentials.secretRef.name",
    "spec.pythonPackages.cache.accessMode",
    "spec.pythonPackages.cache.size",
    "spec.pythonPackages.installPolicy.retries",
    "spec.pythonPackages.installPolicy.timeout",
    "spec.pythonPackages.installPolicy.onFailure",
]


def test_invalid_kasprapp_is_rejected_with_all_field_errors(cluster: ControlPlane, webhook: Webhook, namespace: str):
    proc = cluster.kubectl(["create", "-n", namespace, "-f", "-"], input=json.dumps(kasprapp("broken", INVALID)),
                           check=False)
    assert proc.returncode != 0
    assert "denied the request" in proc.stderr, proc.stderr
    missing = [path for path in INVALID_PATHS if path not in proc.stderr]
    assert not missing, f"field errors not reported: {missing}\n{proc.stderr}"
    gone = cluster.kubectl(["get", "kasprapp", "broken", "-n", namespace], check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr

    # The same app made valid is admitted, with its warnings.
    ok = cluster.kubectl(["create", "-n", namespace, "-f", "-"], check=False, input=json.dumps(
        kasprapp("fixed", {"packages": ["kasprdemo"], "installPolicy": {"onFailure": "allow"}})))
    assert ok.returncode == 0, ok.stderr
    assert "Warning:" in ok.stderr, ok.stderr


# 6 ---------------------------------------------------------------------------------------------
def test_operator_rewrite_creates_no_new_controller_revision(cluster: ControlPlane, webhook: Webhook, namespace: str):
    uid = _app(cluster, namespace, "steady")
    operator_sts = operator_statefulset("steady", uid, replicas=1)
    cluster.create(operator_sts, namespace=namespace)
    cluster.wait_pods(namespace, "kaspr.io/app=steady", 1)
    wait_for("the first ControllerRevision", lambda: len(_revisions(cluster, namespace, "steady-app")) == 1, timeout=30)
    first = cluster.get_json("statefulset", "steady-app", namespace=namespace)
    wait_for("status.updateRevision", lambda: cluster.get_json(
        "statefulset", "steady-app", namespace=namespace)["status"].get("updateRevision"), timeout=30)

    def rewrite(template: dict) -> dict:
        current = cluster.get_json("statefulset", "steady-app", namespace=namespace)
        current["spec"]["template"] = template
        return json.loads(cluster.kubectl(["replace", "-n", namespace, "-o", "json", "-f", "-"],
                                          input=json.dumps(current)).stdout)

    # The operator's whole template, without any of our additions.
    after_full = rewrite(operator_sts["spec"]["template"])
    # Only part of our additions lost: the main container's env and mounts rewritten.
    partial = json.loads(json.dumps(first["spec"]["template"]))
    partial["spec"]["containers"][0]["env"] = operator_sts["spec"]["template"]["spec"]["containers"][0]["env"]
    partial["spec"]["containers"][0]["volumeMounts"] = \
        operator_sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    after_partial = rewrite(partial)

    for after in (after_full, after_partial):
        assert after["spec"]["template"] == first["spec"]["template"]
        assert after["metadata"]["generation"] == first["metadata"]["generation"]
    time.sleep(3)  # let the controller act on anything it would
    revisions = _revisions(cluster, namespace, "steady-app")
    assert len(revisions) == 1, [r["metadata"]["name"] for r in revisions]
    final = cluster.get_json("statefulset", "steady-app", namespace=namespace)
    assert final["status"]["updateRevision"] == final["status"]["currentRevision"]
    assert [p["metadata"]["uid"] for p in cluster.pods(namespace, "kaspr.io/app=steady")] == \
        [p["metadata"]["uid"] for p in cluster.wait_pods(namespace, "kaspr.io/app=steady", 1)]


# 7 ---------------------------------------------------------------------------------------------
def test_statefulset_from_before_registration_gets_mutated_pods(cluster: ControlPlane, webhook: Webhook,
                                                               namespace: str):
    webhook.unregister()
    try:
        webhook.wait_effective(active=False)
        _app(cluster, namespace, "legacy")
        # Neither owned by the KasprApp nor labelled kaspr.io/app in its template (its pods are
        # known by app.kubernetes.io/instance), so neither the StatefulSet webhook nor the
        # controller's rollout trigger ever acts on it, and only the Pod path can inject. (An
        # owned one admitted without the webhook is brought in sync by the controller:
        # test_controller.py; an un-owned operator-shaped one: test_hardening.py.)
        sts = operator_statefulset("legacy", None, replicas=2)
        for labels in (sts["metadata"]["labels"], sts["spec"]["template"]["metadata"]["labels"]):
            del labels["kaspr.io/app"]
        sts["spec"]["selector"] = {"matchLabels": {"app.kubernetes.io/instance": "legacy", "kaspr.io/kind": "KasprApp"}}
        cluster.create(sts, namespace=namespace)
        old_pods = cluster.wait_pods(namespace, "app.kubernetes.io/instance=legacy", 2)
        for pod in old_pods:
            assert_not_injected(pod["spec"], pod["metadata"].get("annotations"))
    finally:
        webhook.register()
        webhook.wait_effective(active=True)

    pods_before = webhook.admission_requests(kind="Pod", operation="CREATE")
    old_uids = {p["metadata"]["uid"] for p in old_pods}
    cluster.kubectl(["delete", "pods", "-n", namespace, "-l", "app.kubernetes.io/instance=legacy", "--wait=false"])
    new_pods = wait_for(
        "the StatefulSet controller to recreate the pods",
        lambda: (lambda pods: pods if len(pods) == 2 and not old_uids & {p["metadata"]["uid"] for p in pods} else None)(
            cluster.pods(namespace, "app.kubernetes.io/instance=legacy")),
        timeout=90,
    )
    for pod in new_pods:
        assert_injected(pod["spec"], pod["metadata"].get("annotations") or {})
    assert webhook.admission_requests(kind="Pod", operation="CREATE") >= pods_before + 2
    # The StatefulSet itself was not touched: only the Pod path did the work.
    spec, annotations = _template(cluster.get_json("statefulset", "legacy-app", namespace=namespace))
    assert init_container(spec) is None and TEMPLATE_HASH_ANNOTATION not in annotations


# kube-system ----------------------------------------------------------------------------------
def test_kube_system_is_never_sent_to_the_webhook(cluster: ControlPlane, webhook: Webhook):
    sts_before = webhook.admission_requests(kind="StatefulSet")
    apps_before = webhook.admission_requests(kind="KasprApp")
    uid = _app(cluster, "kube-system", "system-app")
    try:
        shown = json.loads(cluster.kubectl(
            ["create", "--dry-run=server", "-o", "json", "-n", "kube-system", "-f", "-"],
            input=json.dumps(operator_statefulset("system-app", uid, replicas=1))).stdout)
        assert init_container(shown["spec"]["template"]["spec"]) is None
        assert webhook.admission_requests(kind="StatefulSet") == sts_before
        # The KasprApp itself was validated: that webhook has no namespace selector.
        assert webhook.admission_requests(kind="KasprApp") == apps_before + 1
    finally:
        cluster.kubectl(["delete", "kasprapp", "system-app", "-n", "kube-system", "--ignore-not-found"])


# certificates ---------------------------------------------------------------------------------
def test_certificate_rotation_by_secret_symlink_swap(cluster: ControlPlane, webhook: Webhook, namespace: str):
    """The API server keeps calling the webhook across a CA and certificate rotation done the
    way a Secret volume updates (a `..data` symlink swap), with no restart."""
    pid = webhook.process.popen.pid
    webhook.rotate()
    # The registrations now trust only the new CA: a mutation proves the new pair is served.
    webhook.wait_effective()
    uid = _app(cluster, namespace, "rotated")
    cluster.create(operator_statefulset("rotated", uid, replicas=1), namespace=namespace)
    spec, annotations = _template(cluster.get_json("statefulset", "rotated-app", namespace=namespace))
    assert_injected(spec, annotations)
    assert webhook.process.popen.pid == pid and webhook.process.alive()
