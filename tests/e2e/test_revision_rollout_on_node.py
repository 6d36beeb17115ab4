"""A chart upgrade over running apps, on the real node: twenty apps injected by the chart's
rendering A keep running while `helm upgrade` brings rendering B with a rollout budget; the
apps move to B at most `budget` at a time, each exactly once, and `helm rollback` moves them
back to A under the same rules.

The chart's Deployment is the only webhook and the only controller meanwhile (the host-process
webhook is stopped and unregistered, as in test_chart_on_node.py). Each app is a KasprApp and
the operator-shaped StatefulSet of one replica whose pod installs one small package from the
private index into its emptyDir, imports it and then listens on a port that a TCP readiness
probe checks (an exec probe per second for every pod would cost the node more than the apps).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from e2e_cluster import ControlPlane, pod_ready, wait_for
from e2e_index import PackageIndex
from e2e_objects import REVISION_ANNOTATION, init_container, kasprapp, operator_statefulset
from test_chart_on_node import RELEASE, chart_only, helm, image_values  # noqa: F401 - fixtures
from test_helm_chart import CHART, RELEASE_NAMESPACE
from test_node_pods import credentials_secret, python_packages

pytestmark = pytest.mark.skipif(not (CHART / "Chart.yaml").exists(), reason=f"no chart at {CHART}")

APPS = int(os.environ.get("KASPR_E2E_ROLLOUT_APPS", "20"))
BUDGET = 3
MARK_ANNOTATION = "packages.kaspr.io/rollout-revision"
# The two renderings differ only in revision-owned content: the init container's default
# requests. They are small so that twenty pods fit the node's two CPUs.
RENDERING_A = {"revision": "e2e-a", "cpu": "10m", "memory": "32Mi"}
RENDERING_B = {"revision": "e2e-b", "cpu": "20m", "memory": "48Mi"}
PHASE_TIMEOUT = 300
PORT = 8080

# Import the package, then accept connections until SIGTERM (as PID 1, Python handles it itself).
SERVE = (
    "import signal, socket, sys\n"
    "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
    "import kasprdemo\n"
    "print('kasprdemo', kasprdemo.__version__, flush=True)\n"
    f"server = socket.create_server(('0.0.0.0', {PORT}))\n"
    "while True:\n"
    "    server.accept()[0].close()\n"
)


def rendering_values(rendering: dict) -> list[str]:
    return ["--set", f"revision={rendering['revision']}",
            "--set", f"initContainer.resources.requests.cpu={rendering['cpu']}",
            "--set", f"initContainer.resources.requests.memory={rendering['memory']}",
            "--set", "initContainer.resources.requests.ephemeral-storage=16Mi"]


def app_statefulset(app: str, owner_uid: str, image: str) -> dict:
    sts = operator_statefulset(app, owner_uid, replicas=1)
    pod = sts["spec"]["template"]["spec"]
    pod["terminationGracePeriodSeconds"] = 5
    main = pod["containers"][0]
    main.update({"image": image, "imagePullPolicy": "Never", "command": ["python3", "-c", SERVE],
                 "ports": [{"name": "ready", "containerPort": PORT}],
                 "readinessProbe": {"tcpSocket": {"port": PORT}, "periodSeconds": 1, "failureThreshold": 1}})
    return sts


def settled(sts: dict) -> bool:
    """What the controller calls finished: every replica Ready on the current template."""
    status = sts.get("status") or {}
    replicas = sts["spec"].get("replicas", 1)
    return (status.get("observedGeneration") == sts["metadata"]["generation"]
            and status.get("replicas", 0) == status.get("updatedReplicas", 0) == status.get("readyReplicas", 0)
            == replicas
            and status.get("currentRevision") == status.get("updateRevision"))


def revision_of(sts: dict) -> str | None:
    return (sts["spec"]["template"]["metadata"].get("annotations") or {}).get(REVISION_ANNOTATION)


def marked(sts: dict) -> str | None:
    return (sts["metadata"].get("annotations") or {}).get(MARK_ANNOTATION)


@dataclass
class Phase:
    """What one move of every app looked like, from samples of the StatefulSets and pods."""

    target: str
    samples: int = 0
    most_rolling: int = 0
    seconds: float = 0.0
    pod_uids: dict[str, set[str]] = field(default_factory=dict)

    def restarts(self) -> dict[str, int]:
        """New pods per app: the uids seen beyond the one running at the start."""
        return {app: len(uids) - 1 for app, uids in self.pod_uids.items()}


def snapshot(cluster: ControlPlane, namespace: str) -> tuple[dict[str, dict], list[dict]]:
    """The apps' StatefulSets and pods, read in one request."""
    items = cluster.get_json("statefulsets,pods", "-l", "kaspr.io/kind=KasprApp", namespace=namespace)["items"]
    statefulsets = {i["metadata"]["name"].removesuffix("-app"): i for i in items if i["kind"] == "StatefulSet"}
    return statefulsets, [i for i in items if i["kind"] == "Pod"]


def rolling(statefulsets: dict[str, dict], target: str) -> list[str]:
    """Apps moving now: marked, or rendered with the target revision and not yet settled."""
    return sorted(app for app, sts in statefulsets.items()
                  if marked(sts) or (revision_of(sts) == target and not settled(sts)))


def done(statefulsets: dict[str, dict], pods: list[dict], target: str) -> bool:
    live = {p["metadata"]["labels"]["kaspr.io/app"]: p for p in pods if not p["metadata"].get("deletionTimestamp")}
    return len(statefulsets) == APPS and all(
        revision_of(sts) == target and settled(sts) and not marked(sts) and app in live and pod_ready(live[app])
        and live[app]["metadata"]["labels"].get("controller-revision-hash") == sts["status"]["updateRevision"]
        for app, sts in statefulsets.items())


def watch_phase(cluster: ControlPlane, namespace: str, target: str,
                on_first_mark: Callable[[str], None] | None = None) -> Phase:
    """Sample until every app is on `target`, Ready and unmarked; bounded in time and count.
    `on_first_mark` is called once with the first app seen marked for `target`."""
    phase = Phase(target)
    start = time.monotonic()
    for _ in range(PHASE_TIMEOUT * 2):
        statefulsets, pods = snapshot(cluster, namespace)
        phase.samples += 1
        phase.most_rolling = max(phase.most_rolling, len(rolling(statefulsets, target)))
        first_marked = sorted(app for app, sts in statefulsets.items() if marked(sts) == target)
        if on_first_mark and first_marked:
            on_first_mark(first_marked[0])
            on_first_mark = None
        for pod in pods:
            phase.pod_uids.setdefault(pod["metadata"]["labels"]["kaspr.io/app"], set()).add(pod["metadata"]["uid"])
        if done(statefulsets, pods, target):
            phase.seconds = time.monotonic() - start
            return phase
        if time.monotonic() - start > PHASE_TIMEOUT:
            break
        time.sleep(0.5)
    states = {app: (revision_of(s), marked(s), settled(s)) for app, s in snapshot(cluster, namespace)[0].items()}
    raise AssertionError(f"not every app reached {target} within {PHASE_TIMEOUT}s "
                         f"(revision, mark, settled): {states}")


def controller_revisions(cluster: ControlPlane, namespace: str) -> dict[str, list[tuple[int, str]]]:
    """(revision number, name) of each app's ControllerRevisions, oldest first."""
    found: dict[str, list[tuple[int, str]]] = {}
    for item in cluster.get_json("controllerrevisions", namespace=namespace)["items"]:
        for owner in item["metadata"].get("ownerReferences") or []:
            if owner["kind"] == "StatefulSet":
                found.setdefault(owner["name"].removesuffix("-app"), []).append(
                    (item["revision"], item["metadata"]["name"]))
    return {app: sorted(revs) for app, revs in found.items()}


def warning_events(cluster: ControlPlane, namespace: str) -> list[str]:
    items = cluster.get_json("events.v1.events.k8s.io", namespace=namespace)["items"]
    return [f"{e['regarding'].get('name')}: {e.get('reason')}: {e.get('note')}" for e in items
            if e.get("type") == "Warning" and e.get("reportingController") == "kaspr-packages-webhook"]


def assert_on(cluster: ControlPlane, namespace: str, rendering: dict, phase: Phase) -> None:
    statefulsets, pods = snapshot(cluster, namespace)
    for app, sts in statefulsets.items():
        init = init_container(sts["spec"]["template"]["spec"])
        assert init is not None, app
        requests = init["resources"]["requests"]
        assert (requests["cpu"], requests["memory"]) == (rendering["cpu"], rendering["memory"]), (app, requests)
    for pod in pods:
        for status in (pod["status"].get("containerStatuses") or []) + (pod["status"].get("initContainerStatuses") or []):
            assert status.get("restartCount", 0) == 0, (pod["metadata"]["name"], status)
    # At most the budget moving at any sample, and every app rolled exactly once.
    assert phase.most_rolling <= BUDGET, phase
    assert phase.restarts() == {app: 1 for app in statefulsets}, phase.restarts()


def explain(cluster: ControlPlane, binary: Path, namespace: str, kind: str, name: str) -> str:
    """`explain` as a user runs it, with the chart's Deployment as the rendering settings."""
    proc = cluster.netns.run([str(binary), "explain", kind, name, "-n", namespace,
                              "--kubeconfig", str(cluster.admin_kubeconfig)], check=False, timeout=60)
    return f"exit {proc.returncode}\n{proc.stdout}{proc.stderr}"


def test_chart_upgrade_moves_twenty_apps_under_the_budget_and_a_rollback_moves_them_back(
    cluster: ControlPlane, helm, images, namespace: str, chart_only,  # noqa: F811 - fixtures
    package_index: PackageIndex, webhook_binary: Path,
):
    helm("install", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE, "--create-namespace",
         *image_values(images), "--set", "server.watchNamespaces={%s}" % namespace,
         *rendering_values(RENDERING_A), "--set", f"rollout.budget={BUDGET}", "--set", "rollout.deadline=4m",
         "--wait", "--timeout", "240s")
    try:
        credentials_secret(cluster, namespace, package_index)
        names = [f"app-{i:02d}" for i in range(APPS)]
        packages = python_packages(package_index, ["kasprdemo==1.0"])
        cluster.apply([kasprapp(name, packages) for name in names], namespace=namespace)
        uids = {a["metadata"]["name"]: a["metadata"]["uid"]
                for a in cluster.get_json("kasprapps", namespace=namespace)["items"]}
        wait_for("the chart's webhook to answer", lambda: _dry_run_injected(cluster, namespace, names[0], uids),
                 timeout=60, interval=1)
        start = time.monotonic()
        cluster.apply([app_statefulset(name, uids[name], images["app"].ref) for name in names], namespace=namespace)
        created = watch_phase(cluster, namespace, RENDERING_A["revision"])
        print(f"\n{APPS} apps created and Ready on {RENDERING_A['revision']} in {time.monotonic() - start:.0f}s")
        assert set(created.pod_uids) == set(names)
        first = controller_revisions(cluster, namespace)
        assert all(len(first[name]) == 1 for name in names), first

        # Upgrade to rendering B: the new replicas move the apps, at most BUDGET at a time.
        helm("upgrade", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE, "--reuse-values",
             *rendering_values(RENDERING_B))
        # What `explain` says meanwhile: the last app by name waits for the budget, the first
        # marked one is moving (checked at the end, so the figures come first).
        told = {"waiting": explain(cluster, webhook_binary, namespace, "kasprapp", names[-1])}
        upgrade = watch_phase(cluster, namespace, RENDERING_B["revision"], on_first_mark=lambda app: told.update(
            moving=explain(cluster, webhook_binary, namespace, "statefulset", f"{app}-app")))
        print(f"upgrade to {RENDERING_B['revision']}: {upgrade.seconds:.0f}s, at most {upgrade.most_rolling} "
              f"rolling at once over {upgrade.samples} samples, new pods per app {set(upgrade.restarts().values())}")
        assert_on(cluster, namespace, RENDERING_B, upgrade)
        second = controller_revisions(cluster, namespace)
        for name in names:
            # One new ControllerRevision per app: one rollout.
            assert len(second[name]) == 2 and second[name][0] == first[name][0], (name, second[name])

        # Roll the chart back to A (budget included): the apps move back under the same rules.
        helm("rollback", RELEASE, "1", "--namespace", RELEASE_NAMESPACE)
        back = watch_phase(cluster, namespace, RENDERING_A["revision"])
        print(f"rollback to {RENDERING_A['revision']}: {back.seconds:.0f}s, at most {back.most_rolling} "
              f"rolling at once over {back.samples} samples, new pods per app {set(back.restarts().values())}")
        assert_on(cluster, namespace, RENDERING_A, back)
        third = controller_revisions(cluster, namespace)
        for name in names:
            # A's template again, byte for byte: its ControllerRevision is reused (renumbered 3),
            # so the app rolled once more and no third template ever existed.
            assert [n for _, n in third[name]] == [second[name][1][1], first[name][0][1]], (name, third[name])
            assert third[name][-1][0] == 3, (name, third[name])
        assert not warning_events(cluster, namespace), warning_events(cluster, namespace)
        a, b = RENDERING_A["revision"], RENDERING_B["revision"]
        assert told["waiting"].startswith("exit 0\n") and (
            f"waiting to move from rendering revision {a} to {b} under the rollout budget: at most {BUDGET} app(s)"
            in told["waiting"]), told["waiting"]
        assert f"moving to rendering revision {b} since" in told.get("moving", ""), told
    finally:
        helm("uninstall", RELEASE, "--namespace", RELEASE_NAMESPACE, "--wait", "--timeout", "120s", check=False)


def _dry_run_injected(cluster: ControlPlane, namespace: str, name: str, uids: dict[str, str]) -> bool:
    sts = operator_statefulset(name, uids[name], replicas=1)
    proc = cluster.kubectl(["create", "--dry-run=server", "-o", "json", "-n", namespace, "-f", "-"],
                           input=json.dumps(sts), check=False, timeout=30)
    return proc.returncode == 0 and init_container(json.loads(proc.stdout)["spec"]["template"]["spec"]) is not None
