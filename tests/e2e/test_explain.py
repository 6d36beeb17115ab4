"""`kaspr-packages-webhook explain` against the real control plane, through a kubeconfig as a
user runs it: its lines and its exit status (0 injected and current, 1 error, 2 usage,
3 not injected by design, 4 problem found)."""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path

from e2e_cluster import ControlPlane, wait_for
from e2e_index import PackageIndex
from e2e_objects import TEMPLATE_HASH_ANNOTATION, kasprapp
from e2e_webhook import Webhook
from test_node_pods import credentials_secret, deploy, init_terminated, python_packages

WEBHOOK_CONFIG = "kaspr-packages-webhook"


def explain(cluster: ControlPlane, binary: Path, *args: str) -> subprocess.CompletedProcess:
    """Runs `explain` inside the cluster's network namespace with the admin kubeconfig."""
    return cluster.netns.run([str(binary), "explain", *args, "--kubeconfig", str(cluster.admin_kubeconfig)],
                             check=False, timeout=60)


def assert_explained(proc: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    shown = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == code, shown
    for fragment in fragments:
        assert fragment in proc.stdout, f"{fragment!r} missing\n{shown}"


def test_explain_injected_pod_then_out_of_sync_statefulset(
        cluster: ControlPlane, webhook: Webhook, webhook_binary: Path, namespace: str,
        package_index: PackageIndex, images):
    credentials_secret(cluster, namespace, package_index)
    deploy(cluster, namespace, "told", python_packages(package_index, ["kasprdemo==1.0"]), images["app"].ref)
    (pod,) = cluster.wait_pods_ready(namespace, "kaspr.io/app=told", 1)
    current = pod["metadata"]["annotations"][TEMPLATE_HASH_ANNOTATION]
    pod_name = pod["metadata"]["name"]

    assert_explained(
        explain(cluster, webhook_binary, "pod", pod_name, "-n", namespace), 0,
        f"Pod {namespace}/{pod_name}: injected and current",
        f"ok      namespace {namespace} is served by webhook pods.packages.kaspr.io of {WEBHOOK_CONFIG}",
        "info    owned by StatefulSet told-app",
        f"ok      KasprApp {namespace}/told is valid: 1 package(s), emptyDir mode, install key ",
        f"ok      injected and current: template hash {current}",
        "ok      init container kaspr-packages: completed, exit code 0 (Completed): kaspr-packages: ",
        "(rendering settings: defaults (the webhook is not behind an in-cluster Service",
    )
    assert_explained(
        explain(cluster, webhook_binary, "sts", "told-app", "-n", namespace), 0,
        f"ok      webhook statefulsets.packages.kaspr.io matches: rules cover UPDATE of statefulsets, "
        f"matchConditions hold: owned-by-kasprapp",
        "info    belongs to KasprApp told (its ownerReference)",
        f"ok      injected and current: template hash {current}",
        f"ok      pods: all 1 carry template hash {current}",
    )
    assert_explained(explain(cluster, webhook_binary, "kasprapp", "told", "-n", namespace), 0,
                     f"KasprApp {namespace}/told: valid, and what it owns is current",
                     f"ok      StatefulSet told-app: injected and current: template hash {current}")

    # The rollout trigger off, a package change leaves the StatefulSet behind its app.
    try:
        webhook.stop()
        webhook.start(extra_args=["--controller-rollout=false"])
        cluster.kubectl(["patch", "kasprapp", "told", "-n", namespace, "--type=merge", "-p",
                         json.dumps({"spec": {"pythonPackages": {"packages": ["kasprdemo==2.0"]}}})])
        proc = explain(cluster, webhook_binary, "statefulset", "told-app", "-n", namespace)
        assert_explained(
            proc, 4,
            f"StatefulSet {namespace}/told-app: problem found",
            f"PROBLEM out of date: template hash {current} on the object, ",
            "PROBLEM what differs:\n          install key: ",
            "installer settings (KASPR_PACKAGES_CONFIG): installKey, packages",
        )
        report = json.loads(explain(cluster, webhook_binary, "sts", "told-app", "-n", namespace, "-o", "json").stdout)
        assert (report["verdict"], report["exitCode"]) == ("problem", 4), report
        assert report["templateHash"] == current, report
        assert report["desiredTemplateHash"] not in (None, current), report
        assert "installer settings (KASPR_PACKAGES_CONFIG): installKey, packages" in report["differences"], report
        assert_explained(
            explain(cluster, webhook_binary, "po", pod_name, "-n", namespace), 4,
            f"PROBLEM out of date: template hash {current} on the pod, ",
            "info    its StatefulSet is out of date too",
        )
    finally:
        webhook.stop()
        webhook.start(extra_args=[])


def test_explain_failed_install_shows_the_termination_message(
        cluster: ControlPlane, webhook: Webhook, webhook_binary: Path, namespace: str,
        package_index: PackageIndex, images):
    credentials_secret(cluster, namespace, package_index)
    deploy(cluster, namespace, "sorry", python_packages(package_index, ["kasprdemo==9.9"]), images["app"].ref)

    def failed(pod: dict) -> bool:
        terminated = init_terminated(pod)
        return bool(terminated and terminated["exitCode"] != 0)

    (pod,) = cluster.wait_pods_where(namespace, "kaspr.io/app=sorry", failed, 1, timeout=120, what="failed")
    proc = explain(cluster, webhook_binary, "pod", pod["metadata"]["name"], "-n", namespace)
    assert_explained(proc, 4, "ok      injected and current: template hash ", "PROBLEM init container kaspr-packages: ",
                     "kaspr-packages: FAILED package_not_found: ", "kasprdemo==9.9")


def test_explain_pod_in_excluded_namespace_is_not_injected_by_design(
        cluster: ControlPlane, webhook: Webhook, webhook_binary: Path):
    name = f"explain-{secrets.token_hex(2)}"
    excluded = "kube-system"
    cluster.apply(kasprapp(name, {"packages": ["kasprdemo==1.0"]}), namespace=excluded)
    try:
        cluster.create({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"kaspr.io/kind": "KasprApp", "kaspr.io/app": name}},
            # Never scheduled: only the object matters here.
            "spec": {"nodeSelector": {"kaspr.io/none": "none"},
                     "containers": [{"name": "kaspr", "image": "registry.example/kaspr/kaspr:0.1"}]},
        }, namespace=excluded)
        pod = cluster.get_json("pod", name, namespace=excluded)
        assert TEMPLATE_HASH_ANNOTATION not in (pod["metadata"].get("annotations") or {})
        assert_explained(
            explain(cluster, webhook_binary, "pod", name, "-n", excluded), 3,
            f"Pod {excluded}/{name}: not injected (by design)",
            f"skip    namespace {excluded} is excluded by the configuration: webhook pods.packages.kaspr.io of "
            f"{WEBHOOK_CONFIG}: its namespaceSelector requires kubernetes.io/metadata.name NotIn [kube-system]",
            f"ok      KasprApp {excluded}/{name} is valid",
            "skip    not injected: the API server does not call the webhook for it",
        )
        assert "PROBLEM" not in explain(cluster, webhook_binary, "pod", name, "-n", excluded).stdout
    finally:
        cluster.kubectl(["delete", "pod", name, "-n", excluded, "--wait=false", "--grace-period=0"], check=False)
        cluster.kubectl(["delete", "kasprapp", name, "-n", excluded, "--wait=false"], check=False)


def test_explain_invalid_kasprapp_lists_every_error(
        cluster: ControlPlane, webhook: Webhook, webhook_binary: Path, namespace: str):
    invalid = kasprapp("wrong", {"packages": ["requests; rm -rf /", "-e ."], "installPolicy": {"retries": 99}})
    # The validating webhook refuses such an app; an app stored while it was not called (or
    # before it was installed) is what explain has to report.
    cluster.kubectl(["delete", "validatingwebhookconfiguration", WEBHOOK_CONFIG])
    try:
        def created() -> bool:
            body = json.dumps(invalid)
            return cluster.kubectl(["create", "-n", namespace, "-f", "-"], input=body, check=False).returncode == 0

        wait_for("the API server to stop calling the validating webhook", created, timeout=60, interval=0.5)
    finally:
        webhook.register()

        def denied_again() -> bool:
            probe = dict(invalid, metadata={"name": "probe"})
            return cluster.kubectl(["create", "--dry-run=server", "-n", namespace, "-f", "-"],
                                   input=json.dumps(probe), check=False).returncode != 0

        wait_for("the validating webhook to be called again", denied_again, timeout=60, interval=0.5)
    proc = explain(cluster, webhook_binary, "kapp", "wrong", "-n", namespace)
    assert_explained(
        proc, 4,
        f"KasprApp {namespace}/wrong: problem found",
        f"PROBLEM KasprApp {namespace}/wrong is invalid, so the webhook denies its StatefulSets and pods:",
        "spec.pythonPackages.packages[0]: ",
        "spec.pythonPackages.packages[1]: ",
        "spec.pythonPackages.installPolicy.retries: ",
    )
    report = json.loads(explain(cluster, webhook_binary, "kapp", "wrong", "-n", namespace, "-o", "json").stdout)
    assert [e.split(":")[0] for e in report["validationErrors"]] == [
        "spec.pythonPackages.packages[0]", "spec.pythonPackages.packages[1]",
        "spec.pythonPackages.installPolicy.retries"], report


def test_explain_errors_and_usage(cluster: ControlPlane, webhook: Webhook, webhook_binary: Path, namespace: str):
    missing = explain(cluster, webhook_binary, "pod", "nope", "-n", namespace)
    assert missing.returncode == 1, missing
    assert f"error: Pod {namespace}/nope not found" in missing.stderr, missing.stderr
    usage = explain(cluster, webhook_binary, "deployment", "x")
    assert usage.returncode == 2, usage
