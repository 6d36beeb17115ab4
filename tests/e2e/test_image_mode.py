"""Image mode on the real node (docs/image-mode.md): with builds on and an image repository,
the build Job publishes the app's set as an OCI image to the registry inside the namespace, and
the app's pods mount it as a read-only image volume pulled by containerd 2.x: no init
container, no index, no registry once the image is on the node.
"""

from __future__ import annotations

import json

import pytest

from e2e_cluster import ControlPlane, E2EError, Process, pod_ready, tail, wait_for
from e2e_index import PackageIndex
from e2e_node import REGISTRY_HOST
from e2e_objects import kasprapp
from e2e_registry import Registry
from e2e_webhook import Webhook
from test_builds import lock_state
from test_node_pods import app_statefulset, credentials_secret, logs, python_packages

REPOSITORY = f"{REGISTRY_HOST}/kaspr/packages"
SITE = "/opt/kaspr/packages/site"
IMAGE_VOLUME = "kaspr-packages-image"


@pytest.fixture(scope="module")
def image_webhook(webhook: Webhook, registry: Registry):
    """The session's webhook, restarted with builds and image mode on for this module, and back
    after it."""
    previous = list(webhook.extra_args)
    webhook.stop()
    webhook.start(extra_args=[*previous, "--builds=true", "--image-repository", REPOSITORY,
                              "--image-registry-plain-http=true"])
    yield webhook
    webhook.stop()
    webhook.start(extra_args=previous)


@pytest.fixture
def app_image(images) -> str:
    return images["app"].ref


def image_app(cluster: ControlPlane, namespace: str, index: PackageIndex, app: str, image: str,
              packages: list[str]) -> None:
    credentials_secret(cluster, namespace, index)
    body = kasprapp(app, python_packages(index, packages))
    body["metadata"]["annotations"] = {"packages.kaspr.io/mode": "image"}
    created = cluster.create(body, namespace=namespace)
    cluster.create(app_statefulset(app, created["metadata"]["uid"], image), namespace=namespace)


def image_volume(pod: dict) -> dict | None:
    return next((v for v in pod["spec"].get("volumes") or [] if v["name"] == IMAGE_VOLUME), None)


def recorded_image(cluster: ControlPlane, namespace: str, app: str) -> dict | None:
    state = lock_state(cluster, namespace, app)[0]
    return (state.get("images") or {}).get(state.get("current") or "")


def wait_image_pod(cluster: ControlPlane, namespace: str, app: str, reference: str, timeout: float = 300) -> dict:
    (pod,) = cluster.wait_pods_where(
        namespace, f"kaspr.io/app={app}",
        lambda p: pod_ready(p) and (image_volume(p) or {}).get("image", {}).get("reference") == reference,
        1, what=f"Ready on image {reference}", timeout=timeout)
    return pod


def assert_runs_from_image(cluster: ControlPlane, namespace: str, pod: dict, version: str) -> None:
    name = pod["metadata"]["name"]
    assert not pod["spec"].get("initContainers"), pod["spec"].get("initContainers")
    (main,) = pod["spec"]["containers"]
    assert {"name": IMAGE_VOLUME, "mountPath": SITE, "readOnly": True} in main["volumeMounts"], main
    assert not [v for v in pod["spec"]["volumes"] if "emptyDir" in v and v["name"] != "data"], pod["spec"]["volumes"]
    env = {e["name"]: e.get("value") for e in main.get("env") or []}
    assert env.get("PYTHONPATH", "").split(":")[0] == SITE, env
    assert not any("index-credentials" in json.dumps(e) for e in main.get("env") or [])
    # The app imported the package from the read-only image volume.
    assert f"kasprdemo {version} {SITE}/kasprdemo/__init__.py" in logs(cluster, namespace, name, "kaspr")
    imported = cluster.kubectl(["exec", "-n", namespace, name, "-c", "kaspr", "--", "python3", "-c",
                                "import kasprdemo; print(kasprdemo.__version__, kasprdemo.__file__)"])
    assert imported.stdout.split() == [version, f"{SITE}/kasprdemo/__init__.py"], imported.stdout
    written = cluster.kubectl(["exec", "-n", namespace, name, "-c", "kaspr", "--", "python3", "-c",
                               f"open('{SITE}/probe', 'w')"], check=False)
    assert written.returncode != 0 and "Read-only file system" in written.stderr, written


def remove_from_node(cluster: ControlPlane, digest: str, blobs: list[str], snapshots: list[str] = ()) -> None:
    """Remove from the node every image record naming the manifest `digest` (the kubelet's
    reference and the one containerd names by the config digest; either keeps the content),
    then `blobs` from the content store and the unpacked layers `snapshots` (chain ids, bottom
    first) if they are still there: containerd fetches no layer whose snapshot it has. Fails
    when anything stays, except a layer another image on the node builds on (a distribution
    both install), so the next pod of the image must pull the rest."""
    listed = cluster.node.ctr(["images", "ls"]).stdout.splitlines()[1:]
    names = [line.split()[0] for line in listed if digest in line.split()]
    if names:
        cluster.node.ctr(["images", "rm", "--sync", *names])

    def held_blobs() -> list[str]:
        stored = cluster.node.ctr(["content", "ls", "-q"]).stdout.split()
        return [blob for blob in blobs if blob in stored]

    def snapshot_rows() -> list[list[str]]:
        # KEY PARENT KIND; a bottom layer has no parent.
        return [line.split() for line in cluster.node.ctr(["snapshots", "ls"]).stdout.splitlines()[1:] if line.strip()]

    def held_snapshots() -> list[str]:
        keys = {row[0] for row in snapshot_rows()}
        return [key for key in snapshots if key in keys]

    if held_blobs():
        cluster.node.ctr(["content", "rm", *held_blobs()])
    for key in reversed(held_snapshots()):  # children before their parents
        try:
            cluster.node.ctr(["snapshots", "rm", key])
        except E2EError:
            pass  # the parent of another image's layer (a distribution both install): checked below
    parents = {row[1] for row in snapshot_rows() if len(row) == 3}
    assert not held_blobs(), f"the node still holds blobs {held_blobs()} of {digest}"
    stuck = [key for key in held_snapshots() if key not in parents]
    assert not stuck, f"the node still holds snapshots {stuck} of {digest}"
    assert digest not in cluster.node.ctr(["images", "ls"]).stdout


def pull_failure(pod: dict) -> str | None:
    """`<reason>: <message>` of the main container waiting on an image pull, if it is."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        waiting = (status.get("state") or {}).get("waiting") or {}
        if status["name"] == "kaspr" and waiting.get("reason") in ("ErrImagePull", "ImagePullBackOff"):
            return f"{waiting['reason']}: {waiting.get('message', '')}"
    return None


def app_events(cluster: ControlPlane, namespace: str, app: str, reason: str) -> list[dict]:
    """events.k8s.io/v1 Events with `reason` about the KasprApp `app`."""
    items = cluster.get_json("events.v1.events.k8s.io", namespace=namespace)["items"]
    return [e for e in items if e.get("regarding", {}).get("kind") == "KasprApp"
            and e["regarding"].get("name") == app and e.get("reason") == reason]


def restart_index(cluster: ControlPlane, index: PackageIndex) -> None:
    """Start the stopped package index again with the same arguments."""
    old = index.process
    proc = Process(old.name, old.args, old.log_path, env=old.env)
    proc.start()
    cluster.processes.append(proc)
    index.process = proc

    def up() -> bool:
        proc.ensure_alive()
        return cluster.http_get(index.url, timeout=3)[0] == 401

    wait_for("the package index again", up, timeout=60, on_timeout=lambda: tail(proc.log_path))


def test_an_image_mode_app_runs_without_init_container_and_restarts_without_index_or_registry(
    cluster: ControlPlane, image_webhook: Webhook, registry: Registry, namespace: str, package_index: PackageIndex,
    app_image: str,
):
    app = "imageapp"
    image_app(cluster, namespace, package_index, app, app_image, ["kasprdemo==1.0"])
    # The first build publishes the set's image; the controller records it and the pods roll
    # onto it (until then they run the set through the cache mode, with a warning).
    wait_for("the set's image recorded", lambda: recorded_image(cluster, namespace, app), timeout=300, interval=2)
    image = recorded_image(cluster, namespace, app)
    assert image["reference"].startswith(REPOSITORY + "@sha256:"), image
    assert image["tag"] in registry.tags("kaspr/packages"), image
    pod = wait_image_pod(cluster, namespace, app, image["reference"])
    assert image_volume(pod)["image"] == {"reference": image["reference"], "pullPolicy": "IfNotPresent"}
    assert_runs_from_image(cluster, namespace, pod, "1.0")
    digest = image["reference"].split("@", 1)[1]
    assert digest in cluster.node.ctr(["images", "ls"]).stdout, "the image is on the node"

    # Neither the index nor the registry is needed any more: the image is on the node.
    cluster.stop_process(package_index.process)
    registry.stop()
    try:
        assert cluster.http_get(package_index.url, timeout=2)[0] == 0
        assert cluster.http_get(f"http://{registry.host}/v2/", timeout=2)[0] == 0
        cluster.kubectl(["delete", "pod", "-n", namespace, pod["metadata"]["name"], "--wait=true"], timeout=90)
        (again,) = cluster.wait_pods_where(
            namespace, f"kaspr.io/app={app}",
            lambda p: pod_ready(p) and p["metadata"]["uid"] != pod["metadata"]["uid"], 1,
            what="Ready again without index and registry", timeout=120)
        assert image_volume(again)["image"]["reference"] == image["reference"]
        assert_runs_from_image(cluster, namespace, again, "1.0")
    finally:
        registry.start()
        restart_index(cluster, package_index)


def test_a_package_change_rolls_onto_the_new_image(
    cluster: ControlPlane, image_webhook: Webhook, registry: Registry, namespace: str, package_index: PackageIndex,
    app_image: str,
):
    app = "rollimage"
    image_app(cluster, namespace, package_index, app, app_image, ["kasprdemo==1.0"])
    wait_for("the set's image recorded", lambda: recorded_image(cluster, namespace, app), timeout=300, interval=2)
    first = recorded_image(cluster, namespace, app)
    old_pod = wait_image_pod(cluster, namespace, app, first["reference"])

    cluster.kubectl(["patch", "kasprapp", app, "-n", namespace, "--type=merge", "-p",
                     json.dumps({"spec": {"pythonPackages": {"packages": ["kasprdemo==2.0"]}}})])
    wait_for("the new set's image recorded",
             lambda: (recorded_image(cluster, namespace, app) or first)["reference"] != first["reference"],
             timeout=300, interval=2)
    second = recorded_image(cluster, namespace, app)
    assert second["reference"].startswith(REPOSITORY + "@sha256:") and second["tag"] != first["tag"]
    pod = wait_image_pod(cluster, namespace, app, second["reference"])
    assert pod["metadata"]["uid"] != old_pod["metadata"]["uid"]
    assert_runs_from_image(cluster, namespace, pod, "2.0")
    # The earlier set stays in the registry for a rollback (retention keeps it).
    assert {first["tag"], second["tag"]} <= set(registry.tags("kaspr/packages"))


def test_an_image_that_cannot_be_pulled_backs_off_with_the_registrys_answer_and_one_event_names_the_set(
    cluster: ControlPlane, image_webhook: Webhook, registry: Registry, namespace: str, package_index: PackageIndex,
    app_image: str,
):
    app = "pullfail"
    reason = "PackageSetImagePullFailed"
    image_app(cluster, namespace, package_index, app, app_image, ["kasprdemo==1.0"])
    wait_for("the set's image recorded", lambda: recorded_image(cluster, namespace, app), timeout=300, interval=2)
    image = recorded_image(cluster, namespace, app)
    set_id = lock_state(cluster, namespace, app)[0]["current"]
    reference = image["reference"]
    digest = reference.split("@", 1)[1]
    wait_image_pod(cluster, namespace, app, reference)
    assert not app_events(cluster, namespace, app, reason)

    # The registry loses the image (its manifest; the layers stay) and the node forgets it, so
    # the app's next pod has to pull it and the registry answers 404.
    manifest = registry.manifest("kaspr/packages", digest)
    blobs = [b["digest"] for b in [manifest["config"], *manifest["layers"]]]
    registry.delete_manifest("kaspr/packages", digest)
    assert cluster.http_get(f"http://{registry.host}/v2/kaspr/packages/manifests/{digest}")[0] == 404
    sts = f"{app}-app"
    cluster.kubectl(["scale", "statefulset", sts, "-n", namespace, "--replicas=0"])
    wait_for("the pod to go", lambda: not cluster.pods(namespace, f"kaspr.io/app={app}"), timeout=120)
    remove_from_node(cluster, digest, blobs)
    cluster.kubectl(["scale", "statefulset", sts, "-n", namespace, "--replicas=1"])

    (pod,) = cluster.wait_pods_where(namespace, f"kaspr.io/app={app}", lambda p: pull_failure(p) is not None, 1,
                                     what="waiting on the image pull", timeout=120)
    assert image_volume(pod)["image"]["reference"] == reference
    failure = pull_failure(pod)
    assert "not found" in failure, failure
    assert not pod_ready(pod)

    def published() -> list[dict]:
        return app_events(cluster, namespace, app, reason)

    (event,) = wait_for(f"a {reason} Event on the KasprApp", published, timeout=60,
                        on_timeout=lambda: json.dumps(cluster.get_json("events.v1.events.k8s.io",
                                                                       namespace=namespace)["items"])[-3000:])
    assert event["type"] == "Warning", event
    assert event["reportingController"] == "kaspr-packages-webhook", event
    note = event["note"]
    assert note.startswith(f"pod {pod['metadata']['name']} cannot pull the image of package set {set_id} "
                           f"({reference}): kaspr: "), note
    assert "not found" in note, note

    # One Event per app and set: the kubelet's back-off and a replaced pod add none.
    cluster.kubectl(["delete", "pod", "-n", namespace, pod["metadata"]["name"], "--wait=true"], timeout=90)
    (again,) = cluster.wait_pods_where(
        namespace, f"kaspr.io/app={app}",
        lambda p: p["metadata"]["uid"] != pod["metadata"]["uid"]
        and (pull_failure(p) or "").startswith("ImagePullBackOff"), 1,
        what="the replaced pod backing off the pull", timeout=120)
    assert image_volume(again)["image"]["reference"] == reference
    events = published()
    assert len(events) == 1 and not events[0].get("series"), events
