"""Hardening on a real control plane: deletions are never blocked by validation, and pods that
need no patch never depend on the webhook being up."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import yaml

from e2e_cluster import CLIENT_AUTH_WEBHOOK_HOST, ControlPlane, make_cert, tail, wait_for
from e2e_objects import (
    TEMPLATE_HASH_ANNOTATION,
    assert_injected,
    kasprapp,
    operator_statefulset,
)
from e2e_webhook import Webhook

INVALID = {"packages": ["requests; rm -rf /"]}


def _invalid_app_with_finalizer(cluster: ControlPlane, webhook: Webhook, namespace: str, name: str) -> None:
    """An app whose spec no longer validates, as if written before the webhook existed."""
    webhook.unregister()
    webhook.wait_effective(active=False)
    try:
        app = kasprapp(name, INVALID)
        app["metadata"]["finalizers"] = ["kaspr.io/e2e-cleanup"]
        cluster.create(app, namespace=namespace)
    finally:
        webhook.register()
        webhook.wait_effective(active=True)


def test_an_invalid_app_can_still_be_deleted(cluster: ControlPlane, webhook: Webhook, namespace: str):
    _invalid_app_with_finalizer(cluster, webhook, namespace, "legacy")

    # A metadata-only update of the unchanged invalid spec goes through, with the error as a warning.
    labelled = cluster.kubectl(["label", "kasprapp", "legacy", "-n", namespace, "team=data"], check=False)
    assert labelled.returncode == 0, labelled.stderr
    assert "unchanged by this update" in labelled.stderr, labelled.stderr

    # A new invalid value is still denied, naming only what changed.
    changed = cluster.kubectl(
        ["patch", "kasprapp", "legacy", "-n", namespace, "--type=json", "-p",
         json.dumps([{"op": "add", "path": "/spec/pythonPackages/packages/-", "value": "-e ."}])],
        check=False)
    assert changed.returncode != 0 and "denied the request" in changed.stderr, changed.stderr
    assert "packages[1]" in changed.stderr and "packages[0]" not in changed.stderr, changed.stderr

    # Deleting it: the finalizer can be removed, so the deletion completes.
    cluster.kubectl(["delete", "kasprapp", "legacy", "-n", namespace, "--wait=false"])
    removed = cluster.kubectl(
        ["patch", "kasprapp", "legacy", "-n", namespace, "--type=merge", "-p", '{"metadata":{"finalizers":null}}'],
        check=False)
    assert removed.returncode == 0, removed.stderr
    wait_for("the KasprApp to be gone",
             lambda: cluster.kubectl(["get", "kasprapp", "legacy", "-n", namespace], check=False).returncode != 0,
             timeout=30)


def test_pods_of_an_injected_app_restart_while_the_webhook_is_down(cluster: ControlPlane, webhook: Webhook,
                                                                    namespace: str):
    app = cluster.create(kasprapp("steady", {"packages": ["kasprdemo==1.0"]}), namespace=namespace)
    cluster.create(operator_statefulset("steady", app["metadata"]["uid"], replicas=2), namespace=namespace)
    old = cluster.wait_pods(namespace, "kaspr.io/app=steady", 2)
    for pod in old:
        assert_injected(pod["spec"], pod["metadata"].get("annotations") or {})

    webhook.stop()
    try:
        # The registration stays, with failurePolicy Fail: a pod that would need a patch is refused.
        bare = {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "needs-patch", "labels": {"kaspr.io/kind": "KasprApp", "kaspr.io/app": "steady"}},
                "spec": {"containers": [{"name": "kaspr", "image": "kaspr:e2e"}]}}
        refused = cluster.kubectl(["create", "-n", namespace, "-f", "-"], input=json.dumps(bare), check=False)
        assert refused.returncode != 0 and "failed calling webhook" in refused.stderr, refused.stderr

        # A pod of the injected template needs none, so it is recreated without the webhook.
        old_uids = {p["metadata"]["uid"] for p in old}
        cluster.kubectl(["delete", "pod", old[0]["metadata"]["name"], "-n", namespace, "--wait=false"])
        recreated = wait_for(
            "the StatefulSet controller to recreate the pod without the webhook",
            lambda: (lambda pods: pods if len(pods) == 2 and len(old_uids & {p["metadata"]["uid"] for p in pods}) == 1
                     else None)(cluster.pods(namespace, "kaspr.io/app=steady")),
            timeout=90)
        fresh = [p for p in recreated if p["metadata"]["uid"] not in old_uids]
        assert len(fresh) == 1
        assert TEMPLATE_HASH_ANNOTATION in (fresh[0]["metadata"].get("annotations") or {})
        assert_injected(fresh[0]["spec"], fresh[0]["metadata"]["annotations"])
    finally:
        webhook.start()
        webhook.wait_effective(active=True)


CHART = Path(__file__).resolve().parents[2] / "charts" / "kaspr-packages-webhook"


def test_watched_namespaces_get_workload_rights_there_only(cluster: ControlPlane, e2e_workdir: Path):
    """With server.watchNamespaces, StatefulSet patch and PVC writes come from Roles in those
    namespaces; the ClusterRole keeps only reads, Events and its own webhook configurations."""
    release_ns, watched, other = "kpw-rbac", ["kpw-apps", "kpw-data"], "kpw-other"
    for namespace in [release_ns, *watched, other]:
        if cluster.kubectl(["get", "namespace", namespace], check=False).returncode != 0:
            cluster.kubectl(["create", "namespace", namespace])
    home = e2e_workdir / "helm-rbac"
    helm_env = [f"HELM_{kind}_HOME={home / kind.lower()}" for kind in ("CACHE", "CONFIG", "DATA")]
    rendered = cluster.netns.run(
        ["env", *helm_env, str(cluster.tools.path("helm")), "template", "rbac", str(CHART), "--namespace", release_ns,
         "--kube-version", json.loads(cluster.kubectl(["get", "--raw", "/version"]).stdout)["gitVersion"],
         "--set", "server.watchNamespaces={%s}" % ",".join(watched)], timeout=120).stdout
    objects = [o for o in yaml.safe_load_all(rendered) if o]
    cluster_rules = [r for o in objects if o["kind"] == "ClusterRole" for r in o["rules"]]
    assert not [r for r in cluster_rules if {"statefulsets", "persistentvolumeclaims"} & set(r["resources"])], \
        cluster_rules
    roles = {o["metadata"]["namespace"] for o in objects if o["kind"] == "Role" and o["metadata"]["name"].endswith("-workloads")}
    assert roles == set(watched), roles

    rbac = [o for o in objects if o["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")]
    cluster.apply_each_namespace(rbac, release_ns)
    account = next(o for o in objects if o["kind"] == "ServiceAccount")["metadata"]["name"]
    who = "system:serviceaccount:%s:%s" % (release_ns, account)

    def can(verb: str, resource: str, namespace: str) -> bool:
        proc = cluster.kubectl(["auth", "can-i", verb, resource, "-n", namespace, "--as", who], check=False)
        return proc.stdout.strip() == "yes"

    for namespace in watched:
        assert can("patch", "statefulsets", namespace) and can("create", "persistentvolumeclaims", namespace)
        assert can("delete", "persistentvolumeclaims", namespace)
    assert not can("patch", "statefulsets", other)
    assert not can("create", "persistentvolumeclaims", other) and not can("delete", "persistentvolumeclaims", other)
    assert can("list", "kasprapps.kaspr.io", other), "KasprApps stay readable everywhere"


def test_an_unowned_operator_statefulset_is_injected_and_rolled(cluster: ControlPlane, webhook: Webhook,
                                                                namespace: str):
    """As a 2025 Kaspr operator leaves it after a failed first create: no ownerReferences and no
    labels on the StatefulSet, only the pod template's kaspr.io/kind and kaspr.io/app."""
    # The StatefulSet below deliberately carries no reference to the app.
    cluster.create(kasprapp("orphan", {"packages": ["kasprdemo==1.0"]}), namespace=namespace)
    sts = operator_statefulset("orphan", None, replicas=2)
    sts["metadata"].pop("labels", None)
    created = cluster.create(sts, namespace=namespace)
    template = created["spec"]["template"]
    assert_injected(template["spec"], template["metadata"].get("annotations") or {})
    first_hash = template["metadata"]["annotations"][TEMPLATE_HASH_ANNOTATION]

    # A package change rolls it: the controller finds it by its template labels.
    reconciles = "kaspr_packages_webhook_controller_reconciles_total"
    changed_before = webhook.metric(reconciles, part="rollout", outcome="changed")
    cluster.kubectl(["patch", "kasprapp", "orphan", "-n", namespace, "--type=json", "-p",
                     json.dumps([{"op": "replace", "path": "/spec/pythonPackages/packages/0",
                                  "value": "kasprdemo==2.0"}])])

    def rolled():
        stored = cluster.get_json("statefulset", "orphan-app", namespace=namespace)
        annotations = stored["spec"]["template"]["metadata"].get("annotations") or {}
        new_hash = annotations.get(TEMPLATE_HASH_ANNOTATION)
        return stored if new_hash and new_hash != first_hash else None

    stored = wait_for("the controller to roll the un-owned StatefulSet", rolled, timeout=90, interval=1)
    assert_injected(stored["spec"]["template"]["spec"], stored["spec"]["template"]["metadata"]["annotations"])
    assert stored["metadata"]["generation"] >= created["metadata"]["generation"] + 1
    assert webhook.metric(reconciles, part="rollout", outcome="changed") >= changed_before + 1


# A bare HTTPS POST of an empty review from inside the namespace, with or without a client
# certificate; prints the status code, or the TLS error's class and text.
_POST = r"""
import json, ssl, sys, urllib.request
url, ca, cert, key = sys.argv[1:5]
ctx = ssl.create_default_context(cafile=ca)
if cert:
    ctx.load_cert_chain(cert, key)
req = urllib.request.Request(url, data=b"{}", headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
        print(resp.status)
except urllib.error.HTTPError as err:
    print(err.code)
except Exception as err:
    print(type(err).__name__, err)
"""


def test_client_certificates_admit_the_api_server_and_refuse_others(
        cluster: ControlPlane, webhook_binary: Path, e2e_workdir: Path, namespace: str):
    """`serve --client-ca`: the API server, configured by its admission configuration to present
    a client certificate, reaches the webhook (failurePolicy Fail, so a refused handshake would
    fail the request); a caller without a certificate is refused at the handshake."""
    hook = Webhook(cluster, webhook_binary, e2e_workdir / "webhook-client-auth", name="webhook-client-auth",
                   listen=CLIENT_AUTH_WEBHOOK_HOST, probe_listen="127.0.0.1:8083")
    hook.start(extra_args=["--client-ca", str(cluster.webhook_client_ca.cert),
                           "--controller-pvc=false", "--controller-rollout=false"])
    name = f"kaspr-e2e-client-auth-{namespace}"
    try:
        configuration = {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": name},
            "webhooks": [{
                "name": "client-auth.packages.kaspr.io",
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Fail",
                "timeoutSeconds": 10,
                "clientConfig": {"url": f"https://{CLIENT_AUTH_WEBHOOK_HOST}/mutate",
                                 "caBundle": base64.b64encode(hook.ca.cert.read_bytes()).decode()},
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                           "resources": ["configmaps"], "scope": "Namespaced"}],
            }],
        }
        cluster.kubectl(["apply", "-f", "-"], input=json.dumps(configuration))
        calls = lambda: hook.admission_requests(endpoint="mutate")  # noqa: E731

        # Registrations take effect asynchronously: dry-run creates until the webhook is called.
        def called() -> bool:
            before = calls()
            proc = cluster.kubectl(["create", "configmap", "probe", "-n", namespace, "--dry-run=server"],
                                   check=False)
            assert "x509" not in proc.stderr and "tls" not in proc.stderr.lower(), proc.stderr
            return proc.returncode == 0 and calls() > before

        wait_for("the API server's call through client-certificate authentication", called,
                 timeout=60, interval=0.5, on_timeout=lambda: tail(hook.log_path))
        before = calls()
        cluster.kubectl(["create", "configmap", "admitted", "-n", namespace, "--from-literal=k=v"])
        assert calls() > before

        def post(*client: Path) -> str:
            cert, key = (str(client[0]), str(client[1])) if client else ("", "")
            return cluster.netns.run([sys.executable, "-c", _POST, f"https://{CLIENT_AUTH_WEBHOOK_HOST}/mutate",
                                      str(hook.ca.cert), cert, key]).stdout.strip()

        anonymous = post()
        assert not anonymous.isdigit(), f"a caller without a client certificate got an answer: {anonymous}"
        # A certificate the webhook's CA did not sign (the cluster's own CA) is refused as well.
        stranger = make_cert(e2e_workdir, cluster.ca, "stranger-client", "stranger", client=True)
        refused = post(stranger.cert, stranger.key)
        assert not refused.isdigit(), f"a certificate from another CA got an answer: {refused}"
        # The positive control: the API server's own certificate gets an HTTP answer.
        answered = post(cluster.webhook_client.cert, cluster.webhook_client.key)
        assert answered.isdigit(), answered
    finally:
        cluster.kubectl(["delete", "mutatingwebhookconfiguration", name, "--ignore-not-found"], check=False)
        hook.stop()

