"""Package sets on the real node (docs/builds.md): with --builds=true, a configuration is
resolved once by a Job into a hash-locked set that every pod restores; nothing rolls until a
new set is built, and a set that cannot be built replaces no pod.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import pytest

from e2e_cluster import ControlPlane, pod_ready, wait_for
from e2e_gcs import GcsStandIn
from e2e_index import INDEX_PORT, PackageIndex, build_wheel, start_index
from e2e_webhook import Webhook
from test_node_pods import (
    app_statefulset, cache_claim, credentials_secret, host_path_volume, logs, python_packages,
)
from e2e_objects import INIT_CONTAINER, kasprapp

PACKAGE = "kasprlocked"


@pytest.fixture(scope="module")
def builds_webhook(webhook: Webhook):
    """The session's webhook, restarted with builds on for this module, and back after it."""
    previous = list(webhook.extra_args)
    webhook.stop()
    webhook.start(extra_args=[*previous, "--builds=true"])
    yield webhook
    webhook.stop()
    webhook.start(extra_args=previous)


@pytest.fixture
def app_image(images) -> str:
    return images["app"].ref


def lock_state(cluster: ControlPlane, namespace: str, app: str) -> tuple[dict, dict]:
    found = cluster.kubectl(["get", "configmap", f"{app}-python-packages-lock", "-n", namespace, "-o", "json"],
                            check=False)
    if found.returncode != 0:
        return {}, {}
    data = json.loads(found.stdout).get("data") or {}
    return json.loads(data.get("state.json") or "{}"), data


def version_in(cluster: ControlPlane, namespace: str, pod: str) -> str:
    return cluster.kubectl(["exec", "-n", namespace, pod, "-c", "kaspr", "--", "python3", "-c",
                            f"import {PACKAGE}; print({PACKAGE}.__version__)"]).stdout.strip()


def pods(cluster: ControlPlane, namespace: str, app: str) -> list[dict]:
    return cluster.get_json("pods", "-l", f"kaspr.io/app={app}", namespace=namespace)["items"]


def warnings_for(cluster: ControlPlane, namespace: str, reason: str) -> list[str]:
    events = cluster.get_json("events.events.k8s.io", namespace=namespace)["items"]
    return [e.get("note", "") for e in events if e.get("reason") == reason]


def test_one_locked_set_builds_before_rollout(
    cluster: ControlPlane, builds_webhook: Webhook, namespace: str, package_index: PackageIndex,
    app_image: str, e2e_workdir: Path,
):
    wheels = e2e_workdir / "index" / "packages"
    build_wheel(wheels, PACKAGE, "1.0")
    app = "lockedapp"
    cache_claim(cluster, namespace, app, host_path_volume(cluster, f"sets-{namespace}"))
    credentials_secret(cluster, namespace, package_index)
    kapp = cluster.create(kasprapp(app, python_packages(package_index, [PACKAGE], cache={"enabled": True})),
                          namespace=namespace)
    sts = app_statefulset(app, kapp["metadata"]["uid"], app_image, replicas=1, imports=False)
    cluster.create(sts, namespace=namespace)

    # First deployment: the pod waits for the set its template names; one Job builds it.
    (first,) = cluster.wait_pods_ready(namespace, f"kaspr.io/app={app}", 1, timeout=300)
    # The pod restored the set as soon as the Job published it; the controller records it
    # when it next looks at the Job.
    wait_for("the set recorded as current", lambda: lock_state(cluster, namespace, app)[0].get("current"),
             timeout=60, interval=1)
    state, data = lock_state(cluster, namespace, app)
    current = state["current"]
    assert [s["state"] for s in state["sets"]] == ["Built"], state
    assert first["metadata"]["annotations"]["packages.kaspr.io/set"] == current
    lock = data[f"{current}.pylock.toml"]
    assert f'name = "{PACKAGE}"' in lock and 'version = "1.0"' in lock and "sha256" in lock, lock
    assert package_index.password not in lock and package_index.username not in lock
    assert version_in(cluster, namespace, first["metadata"]["name"]) == "1.0"
    assert "restored from the cache" in logs(cluster, namespace, first["metadata"]["name"], INIT_CONTAINER)

    # A newer release appears; restarts and scale-ups keep the locked version.
    build_wheel(wheels, PACKAGE, "1.1")
    cluster.kubectl(["delete", "pod", "-n", namespace, first["metadata"]["name"], "--wait=true"], timeout=90)
    cluster.kubectl(["scale", "statefulset", f"{app}-app", "-n", namespace, "--replicas=2"])
    running = cluster.wait_pods_where(namespace, f"kaspr.io/app={app}",
                                      lambda p: pod_ready(p) and p["metadata"]["uid"] != first["metadata"]["uid"],
                                      2, what="Ready on the locked set")
    assert first["metadata"]["name"] in {p["metadata"]["name"] for p in running}
    for pod in running:
        assert version_in(cluster, namespace, pod["metadata"]["name"]) == "1.0"
        assert pod["metadata"]["annotations"]["packages.kaspr.io/set"] == current

    # A typo'd version: a Warning Event, a failed set, and no pod replaced.
    uids = {p["metadata"]["uid"] for p in running}
    cluster.kubectl(["patch", "kasprapp", app, "-n", namespace, "--type=merge", "-p",
                     json.dumps({"spec": {"pythonPackages": {"packages": [f"{PACKAGE}==9.9"]}}})])
    wait_for("a PackageBuildFailed Event", lambda: warnings_for(cluster, namespace, "PackageBuildFailed"),
             timeout=240, interval=2)
    note = warnings_for(cluster, namespace, "PackageBuildFailed")[0]
    assert "package_not_found" in note and f"{PACKAGE}==9.9" in note, note
    assert builds_webhook.metric("kaspr_packages_webhook_package_builds_total", outcome="failed",
                                 category="package_not_found") >= 1
    time.sleep(10)
    assert {p["metadata"]["uid"] for p in pods(cluster, namespace, app)} == uids
    assert lock_state(cluster, namespace, app)[0]["current"] == current

    # Fixed, and a fresh resolution asked for: built first, then rolled onto 1.1.
    cluster.kubectl(["patch", "kasprapp", app, "-n", namespace, "--type=merge", "-p",
                     json.dumps({"spec": {"pythonPackages": {"packages": [PACKAGE]}}})])
    cluster.kubectl(["annotate", "kasprapp", app, "-n", namespace, "packages.kaspr.io/refresh=1", "--overwrite"])
    wait_for("a new current set", lambda: lock_state(cluster, namespace, app)[0].get("current") not in (None, current),
             timeout=240, interval=2)
    newest = lock_state(cluster, namespace, app)[0]["current"]
    rolled = cluster.wait_pods_where(
        namespace, f"kaspr.io/app={app}",
        lambda p: pod_ready(p) and p["metadata"].get("annotations", {}).get("packages.kaspr.io/set") == newest,
        2, what="rolled onto the new set", timeout=300)
    for pod in rolled:
        assert version_in(cluster, namespace, pod["metadata"]["name"]) == "1.1"
    # Each set was built by one Job, and finished Jobs are gone.
    wait_for("the build Jobs to be removed",
             lambda: not cluster.get_json("jobs", namespace=namespace)["items"], timeout=60, interval=2)


@pytest.fixture
def second_replica(cluster: ControlPlane, builds_webhook: Webhook, webhook_binary: Path, e2e_workdir: Path,
                   namespace: str):
    """Another webhook replica with builds on (its controller only: it is not registered), watching
    the test's namespace."""
    replica = Webhook(cluster, webhook_binary, e2e_workdir / f"webhook-builds-b-{secrets.token_hex(3)}",
                      least_privilege=builds_webhook.least_privilege, name="webhook-builds-b",
                      listen="127.0.0.1:8446", probe_listen="127.0.0.1:8085")
    replica.start(extra_args=["--namespaces", namespace, "--builds=true"])
    yield replica
    replica.stop()


def test_emptydir_two_webhook_replicas_build_one_set_that_both_pods_restore(
    cluster: ControlPlane, builds_webhook: Webhook, second_replica: Webhook, namespace: str,
    package_index: PackageIndex, app_image: str, e2e_workdir: Path,
):
    package = "kasprpair"
    build_wheel(e2e_workdir / "index" / "packages", package, "1.0")
    app = "pairapp"
    credentials_secret(cluster, namespace, package_index)
    kapp = cluster.create(kasprapp(app, python_packages(package_index, [package])), namespace=namespace)
    cluster.create(app_statefulset(app, kapp["metadata"]["uid"], app_image, replicas=2, imports=False),
                   namespace=namespace)

    # Both replicas see the app at once; the Job's name is the set's, so one build starts.
    running = cluster.wait_pods_ready(namespace, f"kaspr.io/app={app}", 2, timeout=420)
    wait_for("the set recorded as current", lambda: lock_state(cluster, namespace, app)[0].get("current"),
             timeout=60, interval=1)
    state, data = lock_state(cluster, namespace, app)
    current = state["current"]
    assert [s["state"] for s in state["sets"]] == ["Built"], state
    assert f'name = "{package}"' in data[f"{current}.pylock.toml"]
    events = cluster.get_json("events.events.k8s.io", namespace=namespace)["items"]
    started = [e for e in events if e.get("reason") == "PackageBuildStarted"]
    assert len(started) == 1, [e.get("note") for e in started]
    assert current in started[0].get("note", "")
    for pod in running:
        name = pod["metadata"]["name"]
        assert pod["metadata"]["annotations"]["packages.kaspr.io/set"] == current
        # emptyDir: each pod installs exactly the locked set, hash-checked, without resolving.
        assert "hash-checked, no resolution" in logs(cluster, namespace, name, INIT_CONTAINER)
        assert cluster.kubectl(["exec", "-n", namespace, name, "-c", "kaspr", "--", "python3", "-c",
                                f"import {package}; print({package}.__version__)"]).stdout.strip() == "1.0"


@pytest.fixture
def own_index(cluster: ControlPlane, test_venv: Path, e2e_workdir: Path):
    """A package index of the test's own, which it may stop without disturbing other tests."""
    index = start_index(cluster, test_venv, e2e_workdir / f"index-{secrets.token_hex(3)}", port=INDEX_PORT + 1,
                        name=f"pypiserver-{secrets.token_hex(3)}")
    yield index
    cluster.stop_process(index.process)


@pytest.mark.parametrize("mode", ["pvc", "gcs"])
def test_built_sets_restart_with_the_index_stopped(
    cluster: ControlPlane, builds_webhook: Webhook, namespace: str, own_index: PackageIndex, app_image: str,
    gcs: GcsStandIn, mode: str,
):
    """Once a set is built into the PVC or the bucket, pods restart and become Ready with the
    package index down: they restore the set and never ask the index."""
    app = f"offline{mode}"
    credentials_secret(cluster, namespace, own_index)
    template = None
    if mode == "pvc":
        cache_claim(cluster, namespace, app, host_path_volume(cluster, f"offline-{namespace}"))
        cache = {"enabled": True}
    else:
        bucket = f"kaspr-{namespace}"[:63]
        gcs.create_bucket(bucket)
        cluster.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "gcs-key"},
                        "stringData": {"sa.json": gcs.key_json}}, namespace=namespace)
        cache = {"type": "gcs", "gcs": {"bucket": bucket, "secretRef": {"name": "gcs-key"}}}
        template = {"pythonPackagesInitContainer": {"env": [{"name": "STORAGE_EMULATOR_HOST", "value": gcs.url}]}}
    extra = {"template": template} if template else {}
    kapp = cluster.create(kasprapp(app, python_packages(own_index, ["kasprdemo==2.0"], cache=cache), **extra),
                          namespace=namespace)
    cluster.create(app_statefulset(app, kapp["metadata"]["uid"], app_image, replicas=2), namespace=namespace)
    before = cluster.wait_pods_ready(namespace, f"kaspr.io/app={app}", 2, timeout=420)
    wait_for("the set recorded as current", lambda: lock_state(cluster, namespace, app)[0].get("current"),
             timeout=60, interval=1)
    current = lock_state(cluster, namespace, app)[0]["current"]
    if mode == "gcs":
        assert any(f"/{app}/sets/{current}/" in name for name in gcs.objects(bucket)), gcs.objects(bucket)

    cluster.stop_process(own_index.process)
    assert cluster.http_get(own_index.url, timeout=3)[0] == 0, "the index still answers"
    old = {p["metadata"]["uid"] for p in before}
    cluster.kubectl(["delete", "pod", "-n", namespace, "-l", f"kaspr.io/app={app}", "--wait=true"], timeout=120)
    after = cluster.wait_pods_where(namespace, f"kaspr.io/app={app}",
                                    lambda p: pod_ready(p) and p["metadata"]["uid"] not in old,
                                    2, what="Ready again with the index stopped", timeout=300)
    where = "the cache" if mode == "pvc" else "the bucket"
    for pod in after:
        name = pod["metadata"]["name"]
        assert pod["metadata"]["annotations"]["packages.kaspr.io/set"] == current
        log = logs(cluster, namespace, name, INIT_CONTAINER)
        assert f"restored from {where}" in log and "pip:" not in log, log
        assert cluster.kubectl(["exec", "-n", namespace, name, "-c", "kaspr", "--", "python3", "-c",
                                "import kasprdemo; print(kasprdemo.__version__)"]).stdout.strip() == "2.0"
