"""The controller that `serve` runs beside the webhook.

Unlike test_lifecycle.py, nothing here plays the operator: a KasprApp edit alone must reach the
StatefulSet, and the PVC must follow the KasprApp. There is no volume provisioner, so claims stay
Pending unless a test binds them to a volume it made; only a bound claim may grow.
"""

from __future__ import annotations

import json
import secrets
import time

import pytest

from e2e_cluster import ControlPlane, wait_for
from e2e_objects import (
    CONFIG_HASH_ANNOTATION,
    INSTALL_KEY_ANNOTATION,
    REVISION_ANNOTATION,
    TEMPLATE_HASH_ANNOTATION,
    assert_injected,
    assert_not_injected,
    init_container,
    kasprapp,
    operator_statefulset,
)
from e2e_webhook import Webhook

# Short: the controller reacts within seconds.
CONTROLLER_TIMEOUT = 30
OUT_OF_SYNC = "kaspr_packages_webhook_kasprapps_out_of_sync"
RECONCILES = "kaspr_packages_webhook_controller_reconciles_total"


# ---------------------------------------------------------------------------------------------
# Helpers


def _sts(cluster: ControlPlane, namespace: str, name: str) -> dict:
    return cluster.get_json("statefulset", name, namespace=namespace)


def _template(sts: dict) -> tuple[dict, dict]:
    template = sts["spec"]["template"]
    return template["spec"], template["metadata"].get("annotations") or {}


def _hash(cluster: ControlPlane, namespace: str, name: str) -> str | None:
    return _template(_sts(cluster, namespace, name))[1].get(TEMPLATE_HASH_ANNOTATION)


def _patch_app(cluster: ControlPlane, namespace: str, name: str, patch: dict | list) -> None:
    kind = "json" if isinstance(patch, list) else "merge"
    cluster.kubectl(["patch", "kasprapp", name, "-n", namespace, f"--type={kind}", "-p", json.dumps(patch)])


def _packages(cluster: ControlPlane, namespace: str, name: str, packages: list[str]) -> None:
    _patch_app(cluster, namespace, name, {"spec": {"pythonPackages": {"packages": packages}}})


def _cache(cluster: ControlPlane, namespace: str, name: str, **cache) -> None:
    _patch_app(cluster, namespace, name, {"spec": {"pythonPackages": {"cache": cache}}})


def _pvc(cluster: ControlPlane, namespace: str, name: str) -> dict | None:
    proc = cluster.kubectl(["get", "pvc", name, "-n", namespace, "-o", "json"], check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def _gone(claim: dict | None) -> bool:
    # A bound claim may wait on its protection finalizer; a deletion timestamp is the decision.
    return claim is None or bool(claim["metadata"].get("deletionTimestamp"))


def _request(claim: dict | None) -> str | None:
    return ((claim or {}).get("spec", {}).get("resources", {}).get("requests") or {}).get("storage")


def _owners(claim: dict) -> list[tuple[str, str]]:
    return [(o["kind"], o["uid"]) for o in claim["metadata"].get("ownerReferences") or []]


def _events(cluster: ControlPlane, namespace: str, app: str, reason: str | None = None) -> list[dict]:
    """events.k8s.io/v1 Events about the KasprApp `app`."""
    items = cluster.get_json("events.v1.events.k8s.io", namespace=namespace)["items"]
    return [e for e in items
            if e.get("regarding", {}).get("kind") == "KasprApp" and e["regarding"].get("name") == app
            and (reason is None or e.get("reason") == reason)]


def _wait_event(cluster: ControlPlane, namespace: str, app: str, reason: str, kind: str = "Warning") -> dict:
    def found():
        events = _events(cluster, namespace, app, reason)
        return events[0] if events else None

    event = wait_for(f"a {reason} Event on KasprApp {app}", found, timeout=CONTROLLER_TIMEOUT,
                     on_timeout=lambda: json.dumps(_events(cluster, namespace, app), indent=1)[-3000:])
    assert event["type"] == kind, event
    assert event["reportingController"] == "kaspr-packages-webhook", event
    return event


def _revisions(cluster: ControlPlane, namespace: str, sts: str) -> list[dict]:
    items = cluster.get_json("controllerrevisions", namespace=namespace)["items"]
    return [r for r in items if any(o["name"] == sts for o in r["metadata"].get("ownerReferences") or [])]


def _failures_logged(hook: Webhook, namespace: str) -> list[str]:
    text = hook.log_path.read_text(errors="replace") if hook.log_path.exists() else ""
    return [line for line in text.splitlines() if "reconcile failed" in line and namespace in line]


@pytest.fixture
def second_replica(cluster: ControlPlane, webhook_binary, e2e_workdir, webhook: Webhook, namespace: str):
    """Another `serve` process on other ports, never registered: only its controller matters.
    It watches only the test's namespace, so its metrics speak of this test alone."""
    replica = Webhook(cluster, webhook_binary, e2e_workdir / f"webhook-b-{secrets.token_hex(3)}",
                      least_privilege=webhook.least_privilege, name="webhook-b",
                      listen="127.0.0.1:8444", probe_listen="127.0.0.1:8081")
    replica.extra_args = ["--namespaces", namespace]
    yield replica
    replica.stop()


# ---------------------------------------------------------------------------------------------
# Rollout trigger


def test_kasprapp_edit_alone_rolls_and_strips_the_statefulset(cluster: ControlPlane, webhook: Webhook,
                                                              namespace: str):
    app = cluster.create(kasprapp("edited", {"packages": ["kasprdemo==1.0"]}), namespace=namespace)
    cluster.create(operator_statefulset("edited", app["metadata"]["uid"], replicas=1), namespace=namespace)
    first = _hash(cluster, namespace, "edited-app")
    assert first
    (old_pod,) = cluster.wait_pods(namespace, "kaspr.io/app=edited", 1)
    wait_for("the first ControllerRevision", lambda: len(_revisions(cluster, namespace, "edited-app")) == 1,
             timeout=CONTROLLER_TIMEOUT)
    old_key = _template(_sts(cluster, namespace, "edited-app"))[1][INSTALL_KEY_ANNOTATION]

    _packages(cluster, namespace, "edited", ["kasprdemo==2.0"])
    second = wait_for("the controller to roll the StatefulSet",
                      lambda: (lambda h: h if h not in (None, first) else None)(_hash(cluster, namespace, "edited-app")),
                      timeout=CONTROLLER_TIMEOUT)
    rolled = _sts(cluster, namespace, "edited-app")
    spec, annotations = _template(rolled)
    assert_injected(spec, annotations)
    assert annotations[INSTALL_KEY_ANNOTATION] != old_key
    wait_for("a second ControllerRevision", lambda: len(_revisions(cluster, namespace, "edited-app")) == 2,
             timeout=CONTROLLER_TIMEOUT)
    event = _wait_event(cluster, namespace, "edited", "PackagesRollout", kind="Normal")
    assert second in event["note"], event

    # The controller-manager replaces the pod with one of the new template.
    new_pod = wait_for(
        "the pod to be replaced with the new template",
        lambda: next((p for p in cluster.pods(namespace, "kaspr.io/app=edited")
                      if p["metadata"]["uid"] != old_pod["metadata"]["uid"]
                      and (p["metadata"].get("annotations") or {}).get(TEMPLATE_HASH_ANNOTATION) == second), None),
        timeout=90)
    assert_injected(new_pod["spec"], new_pod["metadata"]["annotations"])

    # In sync now: no further writes, so no new revision and no new generation.
    generation = rolled["metadata"]["generation"]
    time.sleep(3)
    assert _sts(cluster, namespace, "edited-app")["metadata"]["generation"] == generation
    assert len(_revisions(cluster, namespace, "edited-app")) == 2

    _patch_app(cluster, namespace, "edited", [{"op": "remove", "path": "/spec/pythonPackages"}])
    wait_for("the controller to strip the StatefulSet",
             lambda: init_container(_template(_sts(cluster, namespace, "edited-app"))[0]) is None,
             timeout=CONTROLLER_TIMEOUT)
    assert_not_injected(*_template(_sts(cluster, namespace, "edited-app")))


def _answering_revision(cluster: ControlPlane) -> str | None:
    """The rendering revision of the webhook the API server calls now: a server-side dry run of a
    StatefulSet in the probe namespace that `Webhook.wait_effective` prepared."""
    app = cluster.get_json("kasprapp", "probe", namespace="e2e-probe")
    sts = json.dumps(operator_statefulset("probe", app["metadata"]["uid"], replicas=1))
    proc = cluster.kubectl(["create", "--dry-run=server", "-o", "json", "-n", "e2e-probe", "-f", "-"],
                           input=sts, check=False)
    if proc.returncode != 0:
        return None
    return _template(json.loads(proc.stdout))[1].get(REVISION_ANNOTATION)


def test_two_rendering_revisions_side_by_side_never_fight(cluster: ControlPlane, webhook: Webhook,
                                                          second_replica: Webhook, namespace: str):
    """Two `serve` processes of different renderings (another --revision and other init-container
    resources) with their controllers running, as old and new replicas during a rolling upgrade:
    the app keeps its revision through a rewrite answered by the other one, and a configuration
    change gives exactly one new ControllerRevision, which neither controller rewrites."""
    app = cluster.create(kasprapp("twice", {"packages": ["kasprdemo==1.0"]}), namespace=namespace)
    operator_sts = operator_statefulset("twice", app["metadata"]["uid"], replicas=1)
    cluster.create(operator_sts, namespace=namespace)
    wait_for("the first ControllerRevision", lambda: len(_revisions(cluster, namespace, "twice-app")) == 1,
             timeout=CONTROLLER_TIMEOUT)
    first = _sts(cluster, namespace, "twice-app")
    first_annotations = _template(first)[1]
    assert first_annotations[REVISION_ANNOTATION] != "canary", first_annotations
    assert first_annotations[CONFIG_HASH_ANNOTATION], first_annotations

    # The other rendering's controller finds the app in sync and writes nothing.
    second_replica.extra_args = [
        "--namespaces", f"{namespace},e2e-probe", "--revision", "canary",
        "--init-container-resources", '{"requests":{"cpu":"10m","memory":"64Mi"}}',
    ]
    second_replica.start()
    wait_for("the second controller to reconcile the app",
             lambda: second_replica.metric(RECONCILES, part="rollout", outcome="in_sync") >= 1,
             timeout=CONTROLLER_TIMEOUT)
    assert second_replica.metric(RECONCILES, part="rollout", outcome="changed") == 0

    try:
        # Now the other rendering answers admissions: the operator's rewrite keeps the revision.
        second_replica.register()
        wait_for("the API server to call the second rendering",
                 lambda: _answering_revision(cluster) == "canary", timeout=60, interval=0.5)
        current = _sts(cluster, namespace, "twice-app")
        current["spec"]["template"] = operator_sts["spec"]["template"]
        rewritten = json.loads(cluster.kubectl(["replace", "-n", namespace, "-o", "json", "-f", "-"],
                                               input=json.dumps(current)).stdout)
        assert rewritten["spec"]["template"] == first["spec"]["template"]
        assert rewritten["metadata"]["generation"] == first["metadata"]["generation"]

        # A change of the app's own configuration: one rollout, to the answering revision.
        _packages(cluster, namespace, "twice", ["kasprdemo==2.0"])
        wait_for("a second ControllerRevision", lambda: len(_revisions(cluster, namespace, "twice-app")) == 2,
                 timeout=CONTROLLER_TIMEOUT)
        moved = _sts(cluster, namespace, "twice-app")
        spec, annotations = _template(moved)
        assert_injected(spec, annotations)
        assert annotations[REVISION_ANNOTATION] == "canary", annotations
        assert init_container(spec)["resources"] == {"requests": {"cpu": "10m", "memory": "64Mi"}}

        # Both controllers keep running: neither flips it back.
        time.sleep(6)
        settled = _sts(cluster, namespace, "twice-app")
        assert settled["metadata"]["generation"] == moved["metadata"]["generation"]
        assert len(_revisions(cluster, namespace, "twice-app")) == 2
        assert _template(settled)[1][REVISION_ANNOTATION] == "canary"
    finally:
        webhook.register()
        wait_for("the API server to call the first rendering again",
                 lambda: _answering_revision(cluster) not in (None, "canary"), timeout=60, interval=0.5)


MARK_ANNOTATION = "packages.kaspr.io/rollout-revision"
MOVES = "kaspr_packages_webhook_revision_moves_total"


def _marked(sts: dict) -> str | None:
    return (sts["metadata"].get("annotations") or {}).get(MARK_ANNOTATION)


def test_a_new_revision_moves_apps_one_at_a_time_and_a_failed_move_stops_the_wave(
        cluster: ControlPlane, webhook: Webhook, second_replica: Webhook, namespace: str):
    """Apps injected by the first rendering; a second `serve` of another revision with a rollout
    budget of 1 answers admissions and moves them one at a time, each finished before the next
    starts. The first app (by name) cannot become Ready (no kubelet runs its pod): its move fails
    at the deadline with a Warning Event and a metric, and the others stay on their revision until
    it finishes (scaled to zero here); then the wave goes on and every app ends on the new revision
    with one ControllerRevision per revision."""
    # Scaled to zero, a StatefulSet has finished once the controller-manager has rolled it.
    apps = {"move-a": 0, "move-b": 0, "move-c": 0, "move-0": 1}
    for name, replicas in apps.items():
        app = cluster.create(kasprapp(name, {"packages": ["kasprdemo==1.0"]}), namespace=namespace)
        cluster.create(operator_statefulset(name, app["metadata"]["uid"], replicas=replicas), namespace=namespace)
    for name in apps:
        wait_for(f"the first ControllerRevision of {name}",
                 lambda name=name: len(_revisions(cluster, namespace, f"{name}-app")) == 1, timeout=CONTROLLER_TIMEOUT)
    first_revision = _template(_sts(cluster, namespace, "move-a-app"))[1][REVISION_ANNOTATION]
    assert first_revision != "canary"

    second_replica.extra_args = [
        "--namespaces", f"{namespace},e2e-probe", "--revision", "canary",
        "--init-container-resources", '{"requests":{"cpu":"10m","memory":"64Mi"}}',
        "--rollout-budget=1", "--rollout-deadline=8s",
    ]
    second_replica.start()
    try:
        second_replica.register()
        wait_for("the API server to call the second rendering",
                 lambda: _answering_revision(cluster) == "canary", timeout=60, interval=0.5)

        def states() -> dict[str, dict]:
            items = cluster.get_json("statefulsets", namespace=namespace)["items"]
            return {s["metadata"]["name"].removesuffix("-app"): s for s in items}

        # The stuck app moves first, fails at the deadline and stops the wave.
        event = _wait_event(cluster, namespace, "move-0", "RevisionMoveFailed")
        assert "move-0-app" in event["note"] and "canary" in event["note"], event
        assert second_replica.metric(MOVES, outcome="failed") == 1
        wait_for("the stuck app to be rendered by the new revision",
                 lambda: _template(states()["move-0"])[1].get(REVISION_ANNOTATION) == "canary",
                 timeout=CONTROLLER_TIMEOUT)
        time.sleep(4)
        held = states()
        for name in ("move-a", "move-b", "move-c"):
            assert _template(held[name])[1][REVISION_ANNOTATION] == first_revision, name
            assert _marked(held[name]) is None, name

        # Fixed (here: scaled to zero), it finishes; the wave goes on, one app at a time.
        cluster.kubectl(["scale", "statefulset", "move-0-app", "-n", namespace, "--replicas=0"])
        most_rolling, order = 0, []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            current = states()
            # A mark is cleared (once finished) before the next app is marked: with budget 1,
            # never two marks at once. Zero replicas finish at once, so the mark is the witness.
            rolling = [n for n, s in current.items() if _marked(s) == "canary"]
            most_rolling = max(most_rolling, len(rolling))
            order.extend(n for n in rolling if n not in order)
            if all(_template(s)[1].get(REVISION_ANNOTATION) == "canary" and _marked(s) is None
                   for s in current.values()):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"not every app moved: { {n: (_template(s)[1].get(REVISION_ANNOTATION), _marked(s)) for n, s in states().items()} }")
        assert most_rolling <= 1, most_rolling
        assert [n for n in order if n != "move-0"] == ["move-a", "move-b", "move-c"], order

        for name in apps:
            spec, annotations = _template(_sts(cluster, namespace, f"{name}-app"))
            assert_injected(spec, annotations)
            assert init_container(spec)["resources"] == {"requests": {"cpu": "10m", "memory": "64Mi"}}
            # One rollout per revision change: the first injection and the move.
            assert len(_revisions(cluster, namespace, f"{name}-app")) == 2, name
            _wait_event(cluster, namespace, name, "RevisionMoveFinished", kind="Normal")
        assert second_replica.metric(MOVES, outcome="finished") == len(apps)
        assert second_replica.metric(MOVES, outcome="started") == len(apps)
        wait_for("the old revision's series to go",
                 lambda: second_replica.metric("kaspr_packages_webhook_revision_apps", revision=first_revision) == 0
                 and second_replica.metric("kaspr_packages_webhook_revision_apps", revision="canary") == len(apps),
                 timeout=CONTROLLER_TIMEOUT)
    finally:
        webhook.register()
        wait_for("the API server to call the first rendering again",
                 lambda: _answering_revision(cluster) not in (None, "canary"), timeout=60, interval=0.5)


def test_statefulset_admitted_without_the_webhook_is_reported_and_brought_in_sync(
        cluster: ControlPlane, webhook: Webhook, namespace: str):
    out_of_sync_before = webhook.metric(OUT_OF_SYNC)
    webhook.unregister()
    try:
        webhook.wait_effective(active=False)
        app = cluster.create(kasprapp("bypassed", {"packages": ["kasprdemo==1.0"]}), namespace=namespace)
        cluster.create(operator_statefulset("bypassed", app["metadata"]["uid"], replicas=1), namespace=namespace)
        wait_for("the out-of-sync gauge to count the app", lambda: webhook.metric(OUT_OF_SYNC) >= out_of_sync_before + 1,
                 timeout=CONTROLLER_TIMEOUT)
        event = _wait_event(cluster, namespace, "bypassed", "StatefulSetOutOfSync")
        assert "bypassed-app" in event["note"], event
        # Sending it again changes nothing while no webhook is registered: no write, no revision churn.
        assert init_container(_template(_sts(cluster, namespace, "bypassed-app"))[0]) is None
        assert _sts(cluster, namespace, "bypassed-app")["metadata"]["generation"] == 1
    finally:
        webhook.register()
        webhook.wait_effective(active=True)
    wait_for("the controller to bring the StatefulSet in sync",
             lambda: init_container(_template(_sts(cluster, namespace, "bypassed-app"))[0]) is not None,
             timeout=60, on_timeout=lambda: "\n".join(_failures_logged(webhook, namespace)))
    assert_injected(*_template(_sts(cluster, namespace, "bypassed-app")))
    wait_for("the out-of-sync gauge to drop", lambda: webhook.metric(OUT_OF_SYNC) <= out_of_sync_before,
             timeout=CONTROLLER_TIMEOUT)


def test_webhook_down_controller_retries_and_converges(cluster: ControlPlane, webhook: Webhook,
                                                       second_replica: Webhook, namespace: str):
    app = cluster.create(kasprapp("patient", {"packages": ["kasprdemo==1.0"]}), namespace=namespace)
    cluster.create(operator_statefulset("patient", app["metadata"]["uid"], replicas=1), namespace=namespace)
    first = _hash(cluster, namespace, "patient-app")
    assert first
    try:
        # The registered webhook without its rollout trigger, so the edit below stays pending...
        webhook.stop()
        webhook.start(extra_args=["--controller-rollout=false"])
        _packages(cluster, namespace, "patient", ["kasprdemo==2.0"])
        # ...and then down: with failurePolicy Fail, no owned StatefulSet can be updated.
        webhook.stop()
        # No grace for an unreachable webhook: this replica warns at once (the default waits 60 s).
        second_replica.start(extra_args=[*second_replica.extra_args, "--unreachable-grace=0s"])
        wait_for("the second replica's controller to fail and back off",
                 lambda: second_replica.metric(RECONCILES, part="rollout", outcome="failed") >= 2,
                 timeout=CONTROLLER_TIMEOUT)
        assert second_replica.metric(OUT_OF_SYNC) == 1
        event = _wait_event(cluster, namespace, "patient", "StatefulSetOutOfSync")
        assert "failed calling webhook" in event["note"], event
        assert _hash(cluster, namespace, "patient-app") == first
    finally:
        webhook.stop()
        webhook.start(extra_args=[])
    # The backoff is short at first (1 s, 2 s, 4 s, ...), so the retry comes soon.
    second = wait_for("the controller to converge once the webhook is back",
                      lambda: (lambda h: h if h not in (None, first) else None)(_hash(cluster, namespace, "patient-app")),
                      timeout=60, on_timeout=lambda: "\n".join(_failures_logged(second_replica, namespace)[-5:]))
    assert_injected(*_template(_sts(cluster, namespace, "patient-app")))
    wait_for("the gauge to clear", lambda: second_replica.metric(OUT_OF_SYNC) == 0, timeout=CONTROLLER_TIMEOUT)
    assert second != first


def test_two_controller_replicas_converge_without_conflicts(cluster: ControlPlane, webhook: Webhook,
                                                            second_replica: Webhook, namespace: str):
    second_replica.start()
    apps = ["twin-a", "twin-b", "twin-c"]
    uids = {}
    for name in apps:
        app = cluster.create(kasprapp(name, {"packages": ["kasprdemo==1.0"], "cache": {"enabled": True}}),
                             namespace=namespace)
        uids[name] = app["metadata"]["uid"]
        cluster.create(operator_statefulset(name, uids[name], replicas=1), namespace=namespace)
    for name in apps:
        claim = wait_for(f"the PVC of {name}", lambda name=name: _pvc(cluster, namespace, f"{name}-python-packages"),
                         timeout=CONTROLLER_TIMEOUT)
        assert _owners(claim) == [("KasprApp", uids[name])]
        fields = json.loads(cluster.kubectl(["get", "pvc", f"{name}-python-packages", "-n", namespace, "-o", "json",
                                             "--show-managed-fields"]).stdout)["metadata"]["managedFields"]
        managers = {(m["manager"], m["operation"]) for m in fields
                    if m["operation"] != "Update" or m["manager"] == "kaspr-packages-webhook"}
        assert managers == {("kaspr-packages-webhook", "Apply")}, fields
    first = {name: _hash(cluster, namespace, f"{name}-app") for name in apps}

    for name in apps:
        _packages(cluster, namespace, name, ["kasprdemo==2.0"])
    for name in apps:
        wait_for(f"{name} to roll", lambda name=name: _hash(cluster, namespace, f"{name}-app") not in (None, first[name]),
                 timeout=CONTROLLER_TIMEOUT)
    time.sleep(3)  # room for a flip-flop between the replicas, if there were one
    for name in apps:
        assert len(_revisions(cluster, namespace, f"{name}-app")) == 2, name

    for name in apps:
        _patch_app(cluster, namespace, name, [{"op": "remove", "path": "/spec/pythonPackages"}])
    for name in apps:
        wait_for(f"{name} to be stripped and its PVC deleted",
                 lambda name=name: init_container(_template(_sts(cluster, namespace, f"{name}-app"))[0]) is None
                 and _gone(_pvc(cluster, namespace, f"{name}-python-packages")),
                 timeout=CONTROLLER_TIMEOUT)

    assert second_replica.metric(RECONCILES, outcome="failed") == 0
    assert not _failures_logged(second_replica, namespace)
    assert not _failures_logged(webhook, namespace)
    assert second_replica.metric(RECONCILES, part="rollout", outcome="in_sync") > 0


# ---------------------------------------------------------------------------------------------
# PVC cache


def _rwx_storage(cluster: ControlPlane, namespace: str) -> str:
    """A storage class that allows expansion and a pre-made RWX volume for the claim to bind."""
    name = f"e2e-rwx-{namespace}"[:63]
    cluster.apply({
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": name},
        "provisioner": "kaspr.io/e2e-shared", "allowVolumeExpansion": True, "volumeBindingMode": "Immediate",
    })
    cluster.apply({
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
        "spec": {
            "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": name,
            "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": f"/tmp/{name}"},
        },
    })
    return name


def test_pvc_cache_appears_resizes_and_goes_away(cluster: ControlPlane, webhook: Webhook, namespace: str):
    storage_class = _rwx_storage(cluster, namespace)
    try:
        _pvc_lifecycle(cluster, namespace, storage_class)
    finally:
        for kind in ("persistentvolume", "storageclass"):
            cluster.kubectl(["delete", kind, storage_class, "--wait=false", "--ignore-not-found"], check=False)


def _pvc_lifecycle(cluster: ControlPlane, namespace: str, storage_class: str) -> None:
    cache = {"enabled": True, "size": "256Mi", "storageClass": storage_class}
    app = cluster.create(kasprapp("cached", {"packages": ["kasprdemo==1.0"], "cache": cache}), namespace=namespace)
    uid = app["metadata"]["uid"]
    claim = "cached-python-packages"

    created = wait_for("the cache PVC", lambda: _pvc(cluster, namespace, claim), timeout=CONTROLLER_TIMEOUT)
    labels = created["metadata"]["labels"]
    assert labels["kaspr.io/app"] == "cached"
    assert labels["kaspr.io/component"] == "python-packages"
    assert labels["app.kubernetes.io/managed-by"] == "kaspr-packages-webhook"
    assert created["spec"]["accessModes"] == ["ReadWriteMany"]
    assert created["spec"]["storageClassName"] == storage_class
    assert _request(created) == "256Mi"
    (owner,) = created["metadata"]["ownerReferences"]  # deleteClaim defaults to true
    assert (owner["kind"], owner["name"], owner["uid"], owner["blockOwnerDeletion"]) == ("KasprApp", "cached", uid, True)
    _wait_event(cluster, namespace, "cached", "PvcCreated", kind="Normal")
    # The test's provisioner is nobody's RWX driver.
    rwx = _wait_event(cluster, namespace, "cached", "StorageClassNotKnownRWX")
    assert "kaspr.io/e2e-shared" in rwx["note"], rwx

    cluster.create(operator_statefulset("cached", uid, replicas=1), namespace=namespace)
    (pod,) = cluster.wait_pods(namespace, "kaspr.io/app=cached", 1)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["kaspr-packages-cache"]["persistentVolumeClaim"]["claimName"] == claim

    # Only a bound claim may grow (the API server refuses to resize a Pending one).
    wait_for("the claim to bind", lambda: (_pvc(cluster, namespace, claim) or {}).get("status", {}).get("phase") == "Bound",
             timeout=30)
    _cache(cluster, namespace, "cached", size="512Mi")
    wait_for("the PVC request to grow", lambda: _request(_pvc(cluster, namespace, claim)) == "512Mi",
             timeout=CONTROLLER_TIMEOUT)
    _wait_event(cluster, namespace, "cached", "PvcResized", kind="Normal")

    # A claim cannot shrink or change class: reported once, the claim left as it is.
    _cache(cluster, namespace, "cached", size="256Mi")
    shrink = _wait_event(cluster, namespace, "cached", "PvcShrinkNeedsRecreate")
    assert "delete the PVC by hand" in shrink["note"], shrink
    _cache(cluster, namespace, "cached", size="512Mi", storageClass="other-class")
    _wait_event(cluster, namespace, "cached", "StorageClassChangeNeedsRecreate")
    _wait_event(cluster, namespace, "cached", "StorageClassNotFound")
    time.sleep(2)  # a few reconciles later: still one Event each, and the claim untouched
    for reason in ("PvcShrinkNeedsRecreate", "StorageClassChangeNeedsRecreate", "StorageClassNotKnownRWX"):
        assert len(_events(cluster, namespace, "cached", reason)) == 1, reason
    current = _pvc(cluster, namespace, claim)
    assert (_request(current), current["spec"]["storageClassName"]) == ("512Mi", storage_class)
    _cache(cluster, namespace, "cached", storageClass=storage_class)

    # deleteClaim decides whether the claim is garbage-collected with the app.
    _cache(cluster, namespace, "cached", deleteClaim=False)
    wait_for("the owner reference to go", lambda: _owners(_pvc(cluster, namespace, claim)) == [],
             timeout=CONTROLLER_TIMEOUT)
    _cache(cluster, namespace, "cached", deleteClaim=True)
    wait_for("the owner reference to come back",
             lambda: _owners(_pvc(cluster, namespace, claim)) == [("KasprApp", uid)], timeout=CONTROLLER_TIMEOUT)

    _cache(cluster, namespace, "cached", enabled=False)
    wait_for("the PVC to be deleted", lambda: _gone(_pvc(cluster, namespace, claim)), timeout=CONTROLLER_TIMEOUT)
    _wait_event(cluster, namespace, "cached", "PvcDeleted", kind="Normal")


def test_pvc_without_delete_claim_outlives_pvc_mode_and_the_app(cluster: ControlPlane, webhook: Webhook,
                                                                namespace: str):
    kept = cluster.create(kasprapp("kept", {"packages": ["kasprdemo==1.0"],
                                            "cache": {"enabled": True, "deleteClaim": False}}), namespace=namespace)
    collected = cluster.create(kasprapp("collected", {"packages": ["kasprdemo==1.0"], "cache": {"enabled": True}}),
                               namespace=namespace)
    kept_claim = wait_for("the kept PVC", lambda: _pvc(cluster, namespace, "kept-python-packages"),
                          timeout=CONTROLLER_TIMEOUT)
    assert _owners(kept_claim) == []
    assert "storageClassName" not in kept_claim["spec"]  # no class asked for, and no cluster default
    collected_claim = wait_for("the collected PVC", lambda: _pvc(cluster, namespace, "collected-python-packages"),
                               timeout=CONTROLLER_TIMEOUT)
    assert _owners(collected_claim) == [("KasprApp", collected["metadata"]["uid"])]
    assert kept["metadata"]["uid"] != collected["metadata"]["uid"]

    # Leaving PVC mode with deleteClaim: false leaves the claim as it is.
    _cache(cluster, namespace, "kept", enabled=False)
    time.sleep(3)
    still = _pvc(cluster, namespace, "kept-python-packages")
    assert still is not None and not still["metadata"].get("deletionTimestamp")
    assert still["metadata"]["uid"] == kept_claim["metadata"]["uid"]

    # Deleting the apps: the garbage collector takes the owned claim, the other one stays.
    cluster.kubectl(["delete", "kasprapp", "kept", "collected", "-n", namespace])
    wait_for("the owned PVC to be garbage-collected",
             lambda: _gone(_pvc(cluster, namespace, "collected-python-packages")), timeout=90)
    still = _pvc(cluster, namespace, "kept-python-packages")
    assert still is not None and not still["metadata"].get("deletionTimestamp")
