"""Benchmark (not a test): how long a Kaspr app's pod takes from creation to Ready on the real
node, without injection and with each cache mode. Run with scripts/bench-pod-startup; never
part of the test suite (pytest collects only test_*.py there).

Image mode (builds on, the set mounted as an image volume from the registry in the namespace;
needs the node's containerd 2.x) runs twice: with the image on the node, and cold: before each
round every image record of the node naming the set's manifest is removed (`ctr images rm
--sync`: the kubelet's reference and the one containerd names by the config digest), then its
blobs from the content store and its unpacked layers (snapshots named by chain id) if they are
still there (containerd fetches no layer whose snapshot it has), checked with `ctr content ls`
and `ctr snapshots ls`. Each image round counts the registry's blob downloads (crane's registry logs every request)
and the bytes they carry (the sizes in the manifest), so the cold rows show what was pulled.

For each scenario one StatefulSet is scaled 0 -> 1 repeatedly: the clock starts before the
scale call and stops when the pod's Ready condition is seen (polled every 0.1 s), then the
pod is removed before the next round. The first round of the cached modes builds the cache
and is reported separately.
"""

from __future__ import annotations

import json
import os
import statistics
import shutil
import time
from pathlib import Path
from typing import Callable

import pytest

from e2e_cluster import ControlPlane, pod_ready, wait_for
from e2e_gcs import GcsStandIn
from e2e_index import PackageIndex
from e2e_registry import Registry
from e2e_webhook import Webhook
from test_image_mode import REPOSITORY, image_app, remove_from_node, image_webhook, recorded_image, wait_image_pod  # noqa: F401 (fixture)
from test_node_pods import app_statefulset, cache_claim, credentials_secret, host_path_volume, python_packages
from e2e_objects import kasprapp

REPOSITORY_PATH = REPOSITORY.split("/", 1)[1]
ROUNDS = int(os.environ.get("KASPR_BENCH_ROUNDS", "5"))
RESULTS = Path(os.environ.get("KASPR_BENCH_RESULTS", "/tmp/kaspr-pod-startup.json"))
_results: dict[str, dict] = {}


def _start_once(cluster: ControlPlane, namespace: str, sts: str, selector: str,
                before: Callable[[], None] | None = None) -> float:
    if before is not None:
        before()
    start = time.monotonic()
    cluster.kubectl(["scale", "statefulset", sts, "-n", namespace, "--replicas=1"])
    deadline = start + 300
    while time.monotonic() < deadline:
        pods = cluster.pods(namespace, selector)
        if pods and pod_ready(pods[0]):
            elapsed = time.monotonic() - start
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"{sts} did not become Ready in 300 s")
    cluster.kubectl(["scale", "statefulset", sts, "-n", namespace, "--replicas=0"])
    wait_for(f"{sts}'s pod to go", lambda: not cluster.kubectl(
        ["get", "pods", "-n", namespace, "-l", selector, "-o", "name"]).stdout.strip(), timeout=120, interval=0.2)
    return elapsed


def _measure(name: str, cluster: ControlPlane, namespace: str, app: str, warmup: bool,
             before: Callable[[], None] | None = None, pulled: Callable[[], tuple[int, int]] | None = None,
             cold: bool = False, set_bytes: int | None = None) -> None:
    """`pulled`, when given, is called after each round and returns the blobs and bytes the
    round downloaded; `before` runs before each round (outside the clock); `cold` says every
    round starts cold; `set_bytes` is the size of the set's image (config and layers)."""
    selector = f"kaspr.io/app={app}"
    first = _start_once(cluster, namespace, f"{app}-app", selector) if warmup else None
    samples, downloads = [], []
    for _ in range(ROUNDS):
        samples.append(_start_once(cluster, namespace, f"{app}-app", selector, before))
        if pulled is not None:
            downloads.append(pulled())
    _results[name] = {
        "first": first,
        "samples": samples,
        "min": min(samples),
        "median": statistics.median(samples),
        "max": max(samples),
        "cold_every_round": cold,
        "pulled_blobs": [blobs for blobs, _ in downloads] or None,
        "pulled_bytes": [size for _, size in downloads] or None,
        "set_bytes": set_bytes,
    }
    RESULTS.write_text(json.dumps(_results, indent=2))
    print(f"\n{name}: median {statistics.median(samples):.2f}s min {min(samples):.2f}s max {max(samples):.2f}s"
          + (f" (first, building the cache: {first:.2f}s)" if first is not None else "")
          + (f" pulled per round (blobs, bytes): {downloads}" if downloads else ""))


def _deploy(cluster: ControlPlane, namespace: str, app: str, packages: dict | None, image: str, **options) -> None:
    extra = {"template": options.pop("template")} if "template" in options else {}
    created = cluster.create(kasprapp(app, packages, **extra), namespace=namespace)
    sts = app_statefulset(app, created["metadata"]["uid"], image, imports=packages is not None, **options)
    sts["spec"]["replicas"] = 0
    cluster.create(sts, namespace=namespace)


@pytest.fixture
def app_image(images) -> str:
    return images["app"].ref


def test_no_injection(cluster: ControlPlane, webhook: Webhook, namespace: str, app_image: str):
    _deploy(cluster, namespace, "plain", None, app_image)
    _measure("no injection", cluster, namespace, "plain", warmup=False)


def test_empty_dir_cold(cluster: ControlPlane, webhook: Webhook, namespace: str, package_index: PackageIndex,
                        app_image: str):
    credentials_secret(cluster, namespace, package_index)
    _deploy(cluster, namespace, "cold", python_packages(package_index, ["kasprdemo==1.0"]), app_image)
    _measure("emptyDir (installs every start)", cluster, namespace, "cold", warmup=False, cold=True)


def test_pvc_warm(cluster: ControlPlane, webhook: Webhook, namespace: str, package_index: PackageIndex,
                  app_image: str):
    cache_claim(cluster, namespace, "warm", host_path_volume(cluster, f"bench-{namespace}"))
    credentials_secret(cluster, namespace, package_index)
    _deploy(cluster, namespace, "warm", python_packages(package_index, ["kasprdemo==1.0"], cache={"enabled": True}),
            app_image)
    _measure("PVC, build present", cluster, namespace, "warm", warmup=True)


def test_gcs_hit(cluster: ControlPlane, webhook: Webhook, namespace: str, package_index: PackageIndex,
                 app_image: str, gcs: GcsStandIn):
    bucket = f"bench-{namespace}"[:63]
    gcs.create_bucket(bucket)
    credentials_secret(cluster, namespace, package_index)
    cluster.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "gcs-key"},
                    "stringData": {"sa.json": gcs.key_json}}, namespace=namespace)
    packages = python_packages(package_index, ["kasprdemo==1.0"],
                               cache={"type": "gcs", "gcs": {"bucket": bucket, "secretRef": {"name": "gcs-key"}}})
    template = {"pythonPackagesInitContainer": {"env": [{"name": "STORAGE_EMULATOR_HOST", "value": gcs.url}]}}
    _deploy(cluster, namespace, "gcsapp", packages, app_image, template=template, fs_group=1000, run_as_user=1000)
    _measure("GCS, archive present", cluster, namespace, "gcsapp", warmup=True)


# A numpy-sized set: the numpy wheel cached for the benchmarks (scripts/bench-... of the
# installer), when it is there and built for the app image's Python (3.11).
BENCH_WHEELS = Path(os.environ.get("KASPR_CACHE_DIR", Path.home() / ".cache" / "kaspr-packages-webhook")) / "bench-wheels"


def _numpy_wheel() -> Path | None:
    return next(iter(sorted(BENCH_WHEELS.glob("numpy-*-cp311-cp311-manylinux*_x86_64*.whl"))), None)


@pytest.mark.parametrize("packages", ["small", "numpy"])
def test_image_mode(cluster: ControlPlane, image_webhook: Webhook, registry: Registry, namespace: str,
                    package_index: PackageIndex, app_image: str, e2e_workdir: Path, packages: str):
    wanted = ["kasprdemo==1.0"]
    if packages == "numpy":
        wheel = _numpy_wheel()
        if wheel is None:
            pytest.skip(f"no numpy wheel for cp311 in {BENCH_WHEELS}")
        shutil.copy(wheel, e2e_workdir / "index" / "packages" / wheel.name)
        wanted.append("numpy==" + wheel.name.split("-")[1])
    app = f"img{packages}"
    image_app(cluster, namespace, package_index, app, app_image, wanted)
    cluster.kubectl(["scale", "statefulset", f"{app}-app", "-n", namespace, "--replicas=1"])
    wait_for("the set's image recorded", lambda: recorded_image(cluster, namespace, app), timeout=600, interval=2)
    reference = recorded_image(cluster, namespace, app)["reference"]
    wait_image_pod(cluster, namespace, app, reference, timeout=600)
    cluster.kubectl(["scale", "statefulset", f"{app}-app", "-n", namespace, "--replicas=0"])
    wait_for("the pod to go", lambda: not cluster.pods(namespace, f"kaspr.io/app={app}"), timeout=120, interval=0.2)
    label = "kasprdemo" if packages == "small" else f"kasprdemo + {wanted[-1]}"
    digest = reference.split("@", 1)[1]
    manifest = registry.manifest(REPOSITORY_PATH, digest)
    sizes = {b["digest"]: b["size"] for b in [manifest["config"], *manifest["layers"]]}
    snapshots = registry.chain_ids(REPOSITORY_PATH, digest)
    mark = {"offset": registry.log_offset()}

    def pulled() -> tuple[int, int]:
        # The set's blobs the registry served since the last call, and their bytes.
        gets = [blob for blob in registry.blob_gets(REPOSITORY_PATH, mark["offset"]) if blob in sizes]
        mark["offset"] = registry.log_offset()
        return len(gets), sum(sizes[blob] for blob in gets)

    _measure(f"image volume, image on the node ({label})", cluster, namespace, app, warmup=False, pulled=pulled,
             set_bytes=sum(sizes.values()))

    def forget_image() -> None:
        # Every image record naming the manifest, the set's blobs and its unpacked layers leave
        # the node (checked).
        remove_from_node(cluster, digest, list(sizes), snapshots)
        mark["offset"] = registry.log_offset()

    _measure(f"image volume, cold: image, blobs and layers removed from the node before each start ({label})",
             cluster, namespace, app, warmup=False, before=forget_image, pulled=pulled, cold=True,
             set_bytes=sum(sizes.values()))
