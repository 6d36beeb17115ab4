"""Changes over an app's life: a package change rolls the StatefulSet to pods that
import the new version, and removing `pythonPackages` strips exactly what was injected.

The Kaspr operator rewrites its StatefulSet every few seconds; `_operator_update` plays that
UPDATE, which is what carries a KasprApp change through the webhook.
"""

from __future__ import annotations

import copy
import json

from e2e_cluster import ControlPlane, wait_for
from e2e_index import PackageIndex
from e2e_objects import (
    INSTALL_KEY_ANNOTATION,
    TEMPLATE_HASH_ANNOTATION,
    assert_injected,
    init_container,
    kasprapp,
    operator_statefulset,
)
from e2e_webhook import Webhook
from pod_runner import PodRunner


def _sts(cluster: ControlPlane, namespace: str, name: str) -> dict:
    return cluster.get_json("statefulset", name, namespace=namespace)


def _operator_update(cluster: ControlPlane, namespace: str, name: str, template: dict | None = None) -> dict:
    """PUT the StatefulSet back with `template` (default: the one stored now), as the operator does."""
    current = _sts(cluster, namespace, name)
    if template is not None:
        current["spec"]["template"] = copy.deepcopy(template)
    return json.loads(cluster.kubectl(["replace", "-n", namespace, "-o", "json", "-f", "-"],
                                      input=json.dumps(current)).stdout)


def _hash(sts: dict) -> str | None:
    return (sts["spec"]["template"]["metadata"].get("annotations") or {}).get(TEMPLATE_HASH_ANNOTATION)


def test_package_change_rolls_pods_to_the_new_version(
    cluster: ControlPlane, webhook: Webhook, namespace: str, package_index: PackageIndex, pod_runner: PodRunner
):
    cluster.create({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "index-credentials"},
        "stringData": {"username": package_index.username, "password": package_index.password},
    }, namespace=namespace)
    python_packages = {
        "packages": ["kasprdemo==1.0"],
        "indexUrl": package_index.url,
        "trustedHosts": [package_index.host],
        "credentials": {"secretRef": {"name": "index-credentials"}},
        "installPolicy": {"retries": 0, "timeout": 120},
    }
    app = cluster.create(kasprapp("rolling", python_packages), namespace=namespace)
    operator_sts = operator_statefulset("rolling", app["metadata"]["uid"], replicas=2)
    cluster.create(operator_sts, namespace=namespace)
    old_pods = cluster.wait_pods(namespace, "kaspr.io/app=rolling", 2)
    before = _sts(cluster, namespace, "rolling-app")
    old_hash = _hash(before)
    old_key = before["spec"]["template"]["metadata"]["annotations"][INSTALL_KEY_ANNOTATION]

    cluster.kubectl(["patch", "kasprapp", "rolling", "-n", namespace, "--type=json", "-p",
                     json.dumps([{"op": "replace", "path": "/spec/pythonPackages/packages/0",
                                  "value": "kasprdemo==2.0"}])])
    # The webhook's KasprApp cache follows a watch; the operator's next rewrite carries the change.
    after = wait_for(
        "an operator rewrite to render the new packages",
        lambda: (lambda s: s if _hash(s) != old_hash else None)(
            _operator_update(cluster, namespace, "rolling-app", operator_sts["spec"]["template"])),
        timeout=30, interval=1,
    )
    annotations = after["spec"]["template"]["metadata"]["annotations"]
    assert annotations[INSTALL_KEY_ANNOTATION] != old_key
    assert after["metadata"]["generation"] == before["metadata"]["generation"] + 1

    # The StatefulSet controller replaces the highest ordinal first; that pod has the new template.
    old_uids = {p["metadata"]["uid"] for p in old_pods}
    rolled = wait_for(
        "a pod of the new revision",
        lambda: next((p for p in cluster.pods(namespace, "kaspr.io/app=rolling")
                      if p["metadata"]["uid"] not in old_uids
                      and (p["metadata"].get("annotations") or {}).get(TEMPLATE_HASH_ANNOTATION) == _hash(after)),
                     None),
        timeout=60,
    )
    assert_injected(rolled["spec"], rolled["metadata"]["annotations"])
    result = pod_runner.run(rolled, main_argv=["python3", "-c", "import kasprdemo; print(kasprdemo.__version__)"])
    assert result.main is not None and result.main.stdout.strip() == "2.0", result.describe()


def test_removing_python_packages_strips_the_injection(cluster: ControlPlane, webhook: Webhook, namespace: str):
    app = cluster.create(kasprapp("shrinking", {"packages": ["kasprdemo==1.0"]}), namespace=namespace)
    operator_sts = operator_statefulset("shrinking", app["metadata"]["uid"], replicas=1)
    cluster.create(operator_sts, namespace=namespace)
    assert init_container(_sts(cluster, namespace, "shrinking-app")["spec"]["template"]["spec"]) is not None

    cluster.kubectl(["patch", "kasprapp", "shrinking", "-n", namespace, "--type=json", "-p",
                     json.dumps([{"op": "remove", "path": "/spec/pythonPackages"}])])

    # What the API server stores for the operator's template with nothing injected: the same
    # StatefulSet under another name, once the webhook sees the app without pythonPackages
    # (an un-owned StatefulSet with the app's template labels is still the app's).
    unowned = copy.deepcopy(operator_sts)
    del unowned["metadata"]["ownerReferences"]
    unowned["metadata"]["name"] = "shrinking-app-unowned"
    plain_template = wait_for(
        "the webhook to see the app without pythonPackages",
        lambda: (lambda t: t if init_container(t["spec"]) is None else None)(json.loads(cluster.kubectl(
            ["create", "--dry-run=server", "-o", "json", "-n", namespace, "-f", "-"],
            input=json.dumps(unowned)).stdout)["spec"]["template"]),
        timeout=30, interval=1,
    )
    # The operator sends back the template it last saw, our additions included.
    stripped = wait_for(
        "an UPDATE to strip the injection",
        lambda: (lambda s: s if init_container(s["spec"]["template"]["spec"]) is None else None)(
            _operator_update(cluster, namespace, "shrinking-app")),
        timeout=30, interval=1,
    )
    assert stripped["spec"]["template"] == plain_template
