"""Kaspr apps on the real node: the kubelet runs the injected init container in the app image,
mounts what we render (emptyDir, the cache claim, the key Secret) and starts the app, which
imports the package from the private index and turns Ready through its probe.

The index and the GCS stand-in listen on the node address; pods reach them over the pod
bridge, and nothing else.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from e2e_cluster import ControlPlane, pod_ready, wait_for
from e2e_gcs import GcsStandIn
from e2e_index import PackageIndex
from e2e_objects import INIT_CONTAINER, RESTRICTED_CONTAINER_SECURITY, kasprapp, operator_statefulset
from e2e_webhook import Webhook

# The app: import the package when asked to, then wait for SIGTERM (as PID 1, Python must
# handle it itself). Readiness: the package imports with the container's own environment.
SERVE = (
    "import os, signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
    "if os.environ.get('IMPORT_PACKAGE') == '1':\n"
    "    import kasprdemo\n"
    "    print('kasprdemo', kasprdemo.__version__, os.path.realpath(kasprdemo.__file__), flush=True)\n"
    "print('uid', os.getuid(), flush=True)\n"
    "while True:\n"
    "    time.sleep(3600)\n"
)
IMPORT_PROBE = ["python3", "-c", "import kasprdemo"]


def app_statefulset(app: str, owner_uid: str, image: str, *, replicas: int = 1, restricted: bool = False,
                    imports: bool = True, fs_group: int | None = None, run_as_user: int | None = None) -> dict:
    """The operator's StatefulSet for `app`, running a small app in the locally built image."""
    sts = operator_statefulset(app, owner_uid, replicas=replicas, restricted=restricted)
    pod = sts["spec"]["template"]["spec"]
    pod["terminationGracePeriodSeconds"] = 5
    main = pod["containers"][0]
    main["image"] = image
    main["imagePullPolicy"] = "Never"
    main["command"] = ["python3", "-c", SERVE]
    main["env"].append({"name": "IMPORT_PACKAGE", "value": "1" if imports else "0"})
    main.pop("ports", None)
    if imports:
        main["readinessProbe"] = {"exec": {"command": IMPORT_PROBE}, "periodSeconds": 1, "failureThreshold": 1}
    security = pod.setdefault("securityContext", {})
    if fs_group is not None:
        security["fsGroup"] = fs_group
    if run_as_user is not None:
        security["runAsUser"] = run_as_user
        security["runAsGroup"] = run_as_user
        main.setdefault("securityContext", {})["runAsUser"] = run_as_user
    return sts


def credentials_secret(cluster: ControlPlane, namespace: str, index: PackageIndex) -> None:
    cluster.create({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "index-credentials"},
        "stringData": {"username": index.username, "password": index.password},
    }, namespace=namespace)


def python_packages(index: PackageIndex, packages: list[str], on_failure: str = "block", **extra) -> dict:
    return {
        "packages": packages,
        "indexUrl": index.url,
        "trustedHosts": [index.host],
        "credentials": {"secretRef": {"name": "index-credentials"}},
        "installPolicy": {"retries": 0, "timeout": 120, "onFailure": on_failure},
        **extra,
    }


def deploy(cluster: ControlPlane, namespace: str, name: str, packages: dict, image: str, *,
           template: dict | None = None, **sts_options) -> dict:
    extra = {"template": template} if template else {}
    app = cluster.create(kasprapp(name, packages, **extra), namespace=namespace)
    cluster.create(app_statefulset(name, app["metadata"]["uid"], image, **sts_options), namespace=namespace)
    return app


def logs(cluster: ControlPlane, namespace: str, pod: str, container: str) -> str:
    return cluster.kubectl(["logs", "-n", namespace, pod, "-c", container], check=False).stdout


def init_status(pod: dict) -> dict:
    for status in pod.get("status", {}).get("initContainerStatuses") or []:
        if status["name"] == INIT_CONTAINER:
            return status
    return {}


def init_terminated(pod: dict) -> dict | None:
    """The init container's termination (current, or the last one while it restarts)."""
    status = init_status(pod)
    return (status.get("state") or {}).get("terminated") or (status.get("lastState") or {}).get("terminated")


@pytest.fixture
def app_image(images) -> str:
    return images["app"].ref


def test_private_index_package_imports_in_running_pods(
    cluster: ControlPlane, webhook: Webhook, namespace: str, package_index: PackageIndex, app_image: str
):
    """emptyDir mode: both replicas install from the private index and turn Ready."""
    credentials_secret(cluster, namespace, package_index)
    deploy(cluster, namespace, "shop", python_packages(package_index, ["kasprdemo==1.0"]), app_image, replicas=2)
    pods = cluster.wait_pods_ready(namespace, "kaspr.io/app=shop", 2)
    for pod in pods:
        name = pod["metadata"]["name"]
        terminated = init_terminated(pod)
        assert terminated and terminated["exitCode"] == 0, init_status(pod)
        app_log = logs(cluster, namespace, name, "kaspr")
        assert "kasprdemo 1.0 /opt/kaspr/packages/" in app_log, app_log
        for text in (app_log, logs(cluster, namespace, name, INIT_CONTAINER), terminated.get("message", "")):
            assert package_index.password not in text
    # `kubectl exec` into the running app (through the kubelet's API) sees the package too.
    out = cluster.kubectl(["exec", "-n", namespace, pods[0]["metadata"]["name"], "-c", "kaspr", "--",
                           "python3", "-c", "import kasprdemo; print(kasprdemo.__version__)"]).stdout
    assert out.strip() == "1.0"


def test_block_failure_stops_the_pod_with_our_message(
    cluster: ControlPlane, webhook: Webhook, namespace: str, package_index: PackageIndex, app_image: str
):
    credentials_secret(cluster, namespace, package_index)
    deploy(cluster, namespace, "broken", python_packages(package_index, ["kasprdemo==9.9"]), app_image)

    def failed(pod: dict) -> bool:
        terminated = init_terminated(pod)
        return bool(terminated and terminated["exitCode"] != 0)

    (pod,) = cluster.wait_pods_where(namespace, "kaspr.io/app=broken", failed, 1, timeout=120, what="failed")
    terminated = init_terminated(pod)
    message = terminated.get("message", "")
    assert message.startswith("kaspr-packages: FAILED package_not_found: "), terminated
    assert "kasprdemo==9.9" in message, message
    assert len(message.strip().splitlines()) == 1, message
    assert package_index.password not in message
    assert not pod_ready(pod)
    main = (pod["status"].get("containerStatuses") or [{}])[0]
    assert "running" not in (main.get("state") or {}), main  # the app never started
    reason = (init_status(pod).get("state") or {}).get("waiting", {}).get("reason") or terminated.get("reason")
    assert reason in ("CrashLoopBackOff", "Error", "PodInitializing"), init_status(pod)


def test_wrong_credentials_fail_as_authentication(
    cluster: ControlPlane, webhook: Webhook, namespace: str, package_index: PackageIndex, app_image: str
):
    cluster.create({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "index-credentials"},
        "stringData": {"username": package_index.username, "password": "not-the-password"},
    }, namespace=namespace)
    deploy(cluster, namespace, "badauth", python_packages(package_index, ["kasprdemo==1.0"]), app_image)

    def failed(pod: dict) -> bool:
        terminated = init_terminated(pod)
        return bool(terminated and terminated["exitCode"] != 0)

    (pod,) = cluster.wait_pods_where(namespace, "kaspr.io/app=badauth", failed, 1, timeout=120, what="failed")
    message = init_terminated(pod).get("message", "")
    assert "FAILED authentication" in message, message
    init_log = logs(cluster, namespace, pod["metadata"]["name"], INIT_CONTAINER)
    assert "not-the-password" not in message + init_log


def test_allow_failure_starts_the_app_without_the_package(
    cluster: ControlPlane, webhook: Webhook, namespace: str, package_index: PackageIndex, app_image: str
):
    credentials_secret(cluster, namespace, package_index)
    deploy(cluster, namespace, "lenient", python_packages(package_index, ["kasprdemo==9.9"], on_failure="allow"),
           app_image, imports=False)

    def running(pod: dict) -> bool:
        statuses = pod.get("status", {}).get("containerStatuses") or []
        return bool(statuses) and "running" in (statuses[0].get("state") or {})

    (pod,) = cluster.wait_pods_where(namespace, "kaspr.io/app=lenient", running, 1, timeout=120, what="running")
    terminated = init_terminated(pod)
    assert terminated and terminated["exitCode"] == 0, init_status(pod)
    assert "not_found" in terminated.get("message", ""), terminated
    name = pod["metadata"]["name"]
    probe = cluster.kubectl(["exec", "-n", namespace, name, "-c", "kaspr", "--", "python3", "-c", "import kasprdemo"],
                            check=False)
    assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, probe


def test_restricted_namespace_runs_the_app_as_non_root(
    cluster: ControlPlane, webhook: Webhook, namespace: str, package_index: PackageIndex, app_image: str
):
    """Pod Security `restricted` admits the pod and the kubelet runs it as uid 1000."""
    cluster.kubectl(["label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted"])
    credentials_secret(cluster, namespace, package_index)
    deploy(cluster, namespace, "locked", python_packages(package_index, ["kasprdemo==1.0"]), app_image,
           restricted=True)
    (pod,) = cluster.wait_pods_ready(namespace, "kaspr.io/app=locked", 1)
    assert pod["status"]["containerStatuses"][0]["ready"] is True
    app_log = logs(cluster, namespace, pod["metadata"]["name"], "kaspr")
    assert "uid 1000" in app_log and "kasprdemo 1.0" in app_log, app_log
    init = next(c for c in pod["spec"]["initContainers"] if c["name"] == INIT_CONTAINER)
    assert init["securityContext"]["runAsNonRoot"] is True
    assert RESTRICTED_CONTAINER_SECURITY["runAsUser"] == 1000


def host_path_volume(cluster: ControlPlane, name: str, owner: int = 1000, group: int | None = None,
                     mode: int = 0o755) -> str:
    """A ReadWriteMany volume on the node (a directory under the work directory), owned by
    the app's user (or group) as an export prepared for the app would be (the kubelet applies
    no fsGroup to hostPath volumes)."""
    path = cluster.workdir / "volumes" / name
    path.mkdir(parents=True)
    os.chown(path, owner, owner if group is None else group)
    os.chmod(path, mode)
    cluster.apply({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": name},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteMany"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "hostPath": {"path": str(path), "type": "Directory"},
        },
    })
    return name


def cache_claim(cluster: ControlPlane, namespace: str, app: str, volume: str) -> None:
    """The app's cache claim (as the controller would make it), bound to `volume`."""
    cluster.apply({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": f"{app}-python-packages", "labels": {"kaspr.io/app": app}},
        "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": volume,
                 "resources": {"requests": {"storage": "256Mi"}}},
    }, namespace=namespace)


def test_pvc_cache_is_shared_by_running_pods(
    cluster: ControlPlane, webhook: Webhook, namespace: str, package_index: PackageIndex, app_image: str
):
    """PVC mode on a ReadWriteMany claim bound to a pre-made volume: one build, used by both
    replicas, and a restarted pod comes back without running pip."""
    cache_claim(cluster, namespace, "warm", host_path_volume(cluster, f"cache-{namespace}"))
    credentials_secret(cluster, namespace, package_index)
    deploy(cluster, namespace, "warm", python_packages(package_index, ["kasprdemo==1.0"], cache={"enabled": True}),
           app_image, replicas=2)
    pods = cluster.wait_pods_ready(namespace, "kaspr.io/app=warm", 2)
    paths = set()
    pip_runs = 0
    for pod in pods:
        app_log = logs(cluster, namespace, pod["metadata"]["name"], "kaspr")
        line = next(line for line in app_log.splitlines() if line.startswith("kasprdemo "))
        paths.add(line.split()[2])
        pip_runs += "pip:" in logs(cluster, namespace, pod["metadata"]["name"], INIT_CONTAINER)
    assert len(paths) == 1, paths
    assert all(p.startswith("/opt/kaspr/packages-cache/") for p in paths), paths
    assert pip_runs == 1, pip_runs  # one pod built, the other used the build

    # A restarted pod finds its build on the claim: no pip run at all.
    first, old_uid = pods[0]["metadata"]["name"], pods[0]["metadata"]["uid"]
    cluster.kubectl(["delete", "pod", "-n", namespace, first, "--wait=true"], timeout=90)
    cluster.wait_pods_where(namespace, "kaspr.io/app=warm",
                            lambda p: pod_ready(p) and p["metadata"]["uid"] != old_uid, 2, what="Ready again")
    assert "pip:" not in logs(cluster, namespace, first, INIT_CONTAINER)


@pytest.mark.parametrize("fs_group", [1000, None], ids=["fsGroup", "no-fsGroup"])
def test_gcs_cache_with_non_root_app(
    cluster: ControlPlane, webhook: Webhook, namespace: str, package_index: PackageIndex, app_image: str,
    gcs: GcsStandIn, fs_group: int | None,
):
    """GCS mode, the app as uid 1000: the installer reads the key Secret as the kubelet mounts
    it, uploads the archive once, and the next pod downloads it instead of running pip."""
    bucket = f"kaspr-{namespace}"[:63]
    gcs.create_bucket(bucket)
    credentials_secret(cluster, namespace, package_index)
    cluster.create({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "gcs-key"},
        "stringData": {"sa.json": gcs.key_json},
    }, namespace=namespace)
    packages = python_packages(package_index, ["kasprdemo==1.0"],
                               cache={"type": "gcs", "gcs": {"bucket": bucket, "secretRef": {"name": "gcs-key"}}})
    template = {"pythonPackagesInitContainer": {"env": [{"name": "STORAGE_EMULATOR_HOST", "value": gcs.url}]}}
    deploy(cluster, namespace, "gcsapp", packages, app_image, template=template, fs_group=fs_group,
           run_as_user=1000)
    (first,) = cluster.wait_pods_ready(namespace, "kaspr.io/app=gcsapp", 1)
    # The key reaches the init container only, readable by whatever user it runs as.
    key_volume = {v["name"]: v for v in first["spec"]["volumes"]}["kaspr-packages-gcs-key"]["secret"]
    assert key_volume["defaultMode"] == 0o444 and [i["key"] for i in key_volume["items"]] == ["sa.json"]
    assert not any(m["name"] == "kaspr-packages-gcs-key" for m in first["spec"]["containers"][0]["volumeMounts"])
    first_log = logs(cluster, namespace, first["metadata"]["name"], INIT_CONTAINER)
    assert "pip:" in first_log, first_log
    objects = gcs.objects(bucket)
    assert len(objects) == 1 and objects[0].startswith(f"kaspr-packages/{namespace}/gcsapp/"), (objects, first_log)

    cluster.kubectl(["scale", "statefulset", "gcsapp-app", "-n", namespace, "--replicas=2"])
    pods = cluster.wait_pods_ready(namespace, "kaspr.io/app=gcsapp", 2)
    second_log = logs(cluster, namespace, pods[1]["metadata"]["name"], INIT_CONTAINER)
    assert "pip:" not in second_log, second_log  # served from the archive
    exchanges = gcs.exchanges()
    assert exchanges and all(not e["problems"] for e in exchanges), exchanges


def test_package_change_rolls_running_pods(
    cluster: ControlPlane, webhook: Webhook, namespace: str, package_index: PackageIndex, app_image: str
):
    """A KasprApp edit rolls the real pods, which come back Ready with the new version."""
    credentials_secret(cluster, namespace, package_index)
    deploy(cluster, namespace, "roll", python_packages(package_index, ["kasprdemo==1.0"]), app_image, replicas=2)
    before = cluster.wait_pods_ready(namespace, "kaspr.io/app=roll", 2)
    patch = {"spec": {"pythonPackages": {"packages": ["kasprdemo==2.0"]}}}
    cluster.kubectl(["patch", "kasprapp", "roll", "-n", namespace, "--type=merge", "-p", json.dumps(patch)])
    # The StatefulSet's template follows (the controller), and its controller replaces pods.
    sts = cluster.get_json("statefulset", "roll-app", namespace=namespace)

    def rolled() -> bool:
        current = cluster.get_json("statefulset", "roll-app", namespace=namespace)
        status = current.get("status", {})
        return (status.get("updateRevision") != sts.get("status", {}).get("currentRevision")
                and status.get("updatedReplicas") == 2 and status.get("readyReplicas") == 2
                and status.get("currentRevision") == status.get("updateRevision"))

    wait_for("the StatefulSet to roll to the new package set", rolled, timeout=240, interval=1)
    after = cluster.wait_pods_ready(namespace, "kaspr.io/app=roll", 2)
    assert {p["metadata"]["uid"] for p in after}.isdisjoint({p["metadata"]["uid"] for p in before})
    for pod in after:
        assert "kasprdemo 2.0" in logs(cluster, namespace, pod["metadata"]["name"], "kaspr")


def security(sts: dict, uid: int) -> None:
    """Run the app's pods (and so the installer) as `uid`, with fsGroup 1000 kept."""
    pod = sts["spec"]["template"]["spec"]
    pod["securityContext"].update({"runAsUser": uid, "runAsGroup": uid})
    pod["containers"][0].setdefault("securityContext", {})["runAsUser"] = uid


@pytest.mark.parametrize("first_uid, then_uid", [(0, 1000), (1000, 0)], ids=["root-then-1000", "1000-then-root"])
def test_pvc_cache_is_shared_by_pods_of_different_users(
    cluster: ControlPlane, webhook: Webhook, namespace: str, package_index: PackageIndex, app_image: str,
    first_uid: int, then_uid: int,
):
    """PVC mode, fsGroup 1000, a volume the kubelet gives no group (hostPath): the first pod
    builds, then the template switches users and the new pod uses that same build, lock files
    and lease directory without pip. Root runs without capabilities, so only modes decide."""
    if first_uid == 0:
        # What a storage admin does for a volume that ignores fsGroup (docs/caches.md).
        volume = host_path_volume(cluster, f"cache-{namespace}", owner=0, group=1000, mode=0o2775)
    else:
        # Given to the app's uid alone: its first pod opens it to the group.
        volume = host_path_volume(cluster, f"cache-{namespace}", owner=1000, mode=0o755)
    cache_claim(cluster, namespace, "users", volume)
    credentials_secret(cluster, namespace, package_index)
    app = cluster.create(kasprapp("users", python_packages(package_index, ["kasprdemo==1.0"], cache={"enabled": True})),
                         namespace=namespace)
    sts = app_statefulset("users", app["metadata"]["uid"], app_image, fs_group=1000, run_as_user=first_uid)

    # Without fsGroup, a non-root pod in PVC mode is warned at admission (a dry run here).
    bare = json.loads(json.dumps(sts))
    security(bare, 1000)
    bare["spec"]["template"]["spec"]["securityContext"].pop("fsGroup")
    dry = cluster.kubectl(["create", "-f", "-", "-n", namespace, "--dry-run=server", "-o", "name"],
                          input=json.dumps(bare))
    assert "securityContext.fsGroup: PVC cache mode runs the package installer as uid 1000" in dry.stderr, dry.stderr

    created = cluster.kubectl(["create", "-f", "-", "-n", namespace], input=json.dumps(sts))
    assert "fsGroup" not in created.stderr, created.stderr
    (first,) = cluster.wait_pods_ready(namespace, "kaspr.io/app=users", 1)
    first_log = logs(cluster, namespace, first["metadata"]["name"], INIT_CONTAINER)
    assert "published build" in first_log, first_log
    assert f"uid {first_uid}" in logs(cluster, namespace, first["metadata"]["name"], "kaspr")

    user = [{"op": "replace", "path": path, "value": then_uid} for path in (
        "/spec/template/spec/securityContext/runAsUser", "/spec/template/spec/securityContext/runAsGroup",
        "/spec/template/spec/containers/0/securityContext/runAsUser")]
    cluster.kubectl(["patch", "statefulset", "users-app", "-n", namespace, "--type=json", "-p", json.dumps(user)])
    old_uid = first["metadata"]["uid"]
    (second,) = cluster.wait_pods_where(namespace, "kaspr.io/app=users",
                                        lambda p: pod_ready(p) and p["metadata"]["uid"] != old_uid, 1,
                                        timeout=180, what="Ready as the other user")
    name = second["metadata"]["name"]
    app_log = logs(cluster, namespace, name, "kaspr")
    assert f"uid {then_uid}" in app_log, app_log
    assert "kasprdemo 1.0 /opt/kaspr/packages-cache/" in app_log, app_log
    second_log = logs(cluster, namespace, name, INIT_CONTAINER)
    assert "found in the cache; skipping pip" in second_log and "pip:" not in second_log, second_log
    message = init_terminated(second).get("message", "")
    assert message.startswith("kaspr-packages: OK ") and "cache off" not in message, message
    # Everything below the root is the group's: setgid group-writable directories.
    root = cluster.workdir / "volumes" / volume
    for dirpath, dirs, _ in os.walk(root):
        for entry in dirs:
            st = os.stat(os.path.join(dirpath, entry))
            assert st.st_gid == 1000 and st.st_mode & 0o2070 == 0o2070, (dirpath, entry, oct(st.st_mode), st.st_gid)


def test_gcs_cache_off_is_visible_in_the_pod_and_on_the_kasprapp(
    cluster: ControlPlane, webhook: Webhook, namespace: str, package_index: PackageIndex, app_image: str,
    gcs: GcsStandIn,
):
    """GCS mode as uid 1000 without fsGroup: the key is readable (no admission warning), but the
    bucket does not exist, so the upload fails. The pod starts with its packages, its
    termination message says the cache was off and why, and the KasprApp gets one Warning."""
    credentials_secret(cluster, namespace, package_index)
    cluster.create({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "gcs-key"},
        "stringData": {"sa.json": gcs.key_json},
    }, namespace=namespace)
    packages = python_packages(package_index, ["kasprdemo==1.0"], cache={
        "type": "gcs", "gcs": {"bucket": f"missing-{namespace}"[:63], "secretRef": {"name": "gcs-key"}}})
    template = {"pythonPackagesInitContainer": {"env": [{"name": "STORAGE_EMULATOR_HOST", "value": gcs.url}]}}
    app = cluster.create(kasprapp("offline", packages, template=template), namespace=namespace)
    sts = app_statefulset("offline", app["metadata"]["uid"], app_image, run_as_user=1000)
    created = cluster.kubectl(["create", "-f", "-", "-n", namespace], input=json.dumps(sts))
    assert "fsGroup" not in created.stderr, created.stderr
    (pod,) = cluster.wait_pods_ready(namespace, "kaspr.io/app=offline", 1)
    message = init_terminated(pod).get("message", "")
    assert message.startswith("kaspr-packages: OK 1 packages"), message
    assert "(cache off: upload failed: HTTP " in message, message
    assert "uid 1000" in logs(cluster, namespace, pod["metadata"]["name"], "kaspr")

    def events() -> list[dict]:
        items = cluster.get_json("events.v1.events.k8s.io", namespace=namespace)["items"]
        return [e for e in items if e.get("reason") == "PythonPackagesCacheOff"
                and e.get("regarding", {}).get("name") == "offline"]

    (event,) = wait_for("a PythonPackagesCacheOff Event on the KasprApp", lambda: events() or None, timeout=60)
    assert event["type"] == "Warning" and event["regarding"]["kind"] == "KasprApp", event
    assert "without the gcs cache (cache off: upload failed" in event["note"], event
    # A second pod with the same cause is counted, not reported again.
    cluster.kubectl(["scale", "statefulset", "offline-app", "-n", namespace, "--replicas=2"])
    pods = cluster.wait_pods_ready(namespace, "kaspr.io/app=offline", 2)
    assert all("cache off: upload failed" in init_terminated(p).get("message", "") for p in pods)
    time.sleep(3)
    assert len(events()) == 1, events()
