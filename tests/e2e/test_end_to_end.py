"""End to end: KasprApp → operator-style StatefulSet → pods from the real
controller-manager → the pod runner plays the kubelet → the package imports in the app.

The package comes from a private index on loopback that requires basic auth; the credentials
reach the init container only through the Secret the KasprApp names.
"""

from __future__ import annotations

import json

import pytest

from e2e_cluster import ControlPlane
from e2e_gcs import GcsStandIn
from e2e_index import PackageIndex
from e2e_objects import INIT_CONTAINER, container, env_value, init_container, kasprapp, operator_statefulset
from e2e_webhook import Webhook
from pod_runner import PodRunner

CHECK_IMPORT = ["python3", "-c", "import kasprdemo; print(kasprdemo.__version__)"]


def _credentials_secret(cluster: ControlPlane, namespace: str, index: PackageIndex) -> None:
    cluster.create({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "index-credentials"},
        "stringData": {"username": index.username, "password": index.password},
    }, namespace=namespace)


def _python_packages(index: PackageIndex, packages: list[str], on_failure: str = "block") -> dict:
    return {
        "packages": packages,
        "indexUrl": index.url,
        "trustedHosts": [index.host],
        "credentials": {"secretRef": {"name": "index-credentials"}},
        "installPolicy": {"retries": 0, "timeout": 120, "onFailure": on_failure},
    }


def _deploy(cluster: ControlPlane, namespace: str, name: str, python_packages: dict, replicas: int,
            restricted: bool = False) -> list[dict]:
    app = cluster.create(kasprapp(name, python_packages), namespace=namespace)
    cluster.create(operator_statefulset(name, app["metadata"]["uid"], replicas=replicas, restricted=restricted),
                   namespace=namespace)
    return cluster.wait_pods(namespace, f"kaspr.io/app={name}", replicas)


def _assert_secret_never_shown(index: PackageIndex, *texts: str) -> None:
    for text in texts:
        assert index.password not in text


def test_package_from_private_index_imports_in_the_app(
    cluster: ControlPlane, webhook: Webhook, namespace: str, package_index: PackageIndex, pod_runner: PodRunner
):
    _credentials_secret(cluster, namespace, package_index)
    pods = _deploy(cluster, namespace, "shop", _python_packages(package_index, ["kasprdemo==1.0"]), replicas=2)

    for pod in pods:
        init = init_container(pod["spec"])
        assert init is not None
        # Credentials travel only as Secret references, never as plain values.
        for var in ("KASPR_PYPI_USERNAME", "KASPR_PYPI_PASSWORD"):
            entry = env_value(init, var)
            assert entry and entry["valueFrom"]["secretKeyRef"]["name"] == "index-credentials", entry
        assert env_value(container(pod["spec"], "kaspr"), "KASPR_PYPI_PASSWORD") is None
        _assert_secret_never_shown(package_index, json.dumps(pod))

        result = pod_runner.run(pod, main_argv=CHECK_IMPORT)
        assert not result.init_failed, result.describe()
        assert [r.name for r in result.init_containers] == [INIT_CONTAINER]
        assert result.main is not None and result.main.exit_code == 0, result.describe()
        assert result.main.stdout.strip() == "1.0", result.describe()
        installer = result.init(INIT_CONTAINER)
        assert installer.termination_message, result.describe()
        _assert_secret_never_shown(package_index, installer.stdout, installer.stderr, installer.termination_message)
        # The app's own PYTHONPATH entry is still there, after ours.
        assert result.main.env["PYTHONPATH"] == "/opt/kaspr/packages/site:/app/lib"


@pytest.mark.parametrize("on_failure", ["block", "allow"])
def test_install_failure_policy(
    cluster: ControlPlane, webhook: Webhook, namespace: str, package_index: PackageIndex, pod_runner: PodRunner,
    on_failure: str,
):
    _credentials_secret(cluster, namespace, package_index)
    python_packages = _python_packages(package_index, ["kasprmissing==9.9"], on_failure=on_failure)
    (pod,) = _deploy(cluster, namespace, f"missing-{on_failure}", python_packages, replicas=1)

    app_check = ["python3", "-c",
                 "import importlib.util; print('app started'); print(importlib.util.find_spec('kasprmissing'))"]
    result = pod_runner.run(pod, main_argv=app_check)
    installer = result.init(INIT_CONTAINER)
    _assert_secret_never_shown(package_index, installer.stdout, installer.stderr, installer.termination_message)
    assert "package_not_found" in installer.termination_message, result.describe()
    if on_failure == "block":
        assert installer.exit_code != 0, result.describe()
        assert result.main is None  # the app never starts
    else:
        assert installer.exit_code == 0, result.describe()
        assert result.main is not None and result.main.exit_code == 0, result.describe()
        assert result.main.stdout.splitlines() == ["app started", "None"], result.describe()


def test_wrong_credentials_fail_as_authentication(
    cluster: ControlPlane, webhook: Webhook, namespace: str, package_index: PackageIndex, pod_runner: PodRunner
):
    cluster.create({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "index-credentials"},
        "stringData": {"username": package_index.username, "password": "not-the-password"},
    }, namespace=namespace)
    (pod,) = _deploy(cluster, namespace, "badauth", _python_packages(package_index, ["kasprdemo==1.0"]), replicas=1)
    result = pod_runner.run(pod, main_argv=CHECK_IMPORT)
    installer = result.init(INIT_CONTAINER)
    assert installer.exit_code != 0, result.describe()
    assert "authentication" in installer.termination_message, result.describe()
    assert "not-the-password" not in installer.stdout + installer.stderr + installer.termination_message


def test_restricted_app_installs_and_imports_as_non_root(
    cluster: ControlPlane, webhook: Webhook, namespace: str, package_index: PackageIndex,
    nonroot_pod_runner: PodRunner,
):
    """Pod Security `restricted` admits the pod, and it still works as the non-root user it runs as."""
    cluster.kubectl(["label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted"])
    _credentials_secret(cluster, namespace, package_index)
    (pod,) = _deploy(cluster, namespace, "locked", _python_packages(package_index, ["kasprdemo==1.0"]),
                     replicas=1, restricted=True)
    check = ["python3", "-c", "import os, kasprdemo; print(os.getuid(), kasprdemo.__version__)"]
    result = nonroot_pod_runner.run(pod, main_argv=check)
    assert not result.init_failed, result.describe()
    assert result.main is not None and result.main.stdout.split() == ["1000", "1.0"], result.describe()


def test_pvc_cache_build_is_shared_between_pods(
    cluster: ControlPlane, webhook: Webhook, namespace: str, package_index: PackageIndex, pod_runner: PodRunner
):
    """PVC mode: the first pod builds into the shared claim, the next one uses that build as is."""
    _credentials_secret(cluster, namespace, package_index)
    python_packages = {**_python_packages(package_index, ["kasprdemo==1.0"]), "cache": {"enabled": True}}
    # The claim the controller keeps; applied here so this test needs only the webhook.
    cluster.apply({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "warm-python-packages", "labels": {"kaspr.io/app": "warm"}},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "256Mi"}}},
    }, namespace=namespace)
    pods = _deploy(cluster, namespace, "warm", python_packages, replicas=2)
    for pod in pods:
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["kaspr-packages-cache"]["persistentVolumeClaim"]["claimName"] == "warm-python-packages"
        main_mounts = {m["name"]: m for m in container(pod["spec"], "kaspr")["volumeMounts"]}
        assert main_mounts["kaspr-packages-cache"]["readOnly"] is True

    where = ["python3", "-c", "import os, kasprdemo; print(kasprdemo.__version__, os.path.realpath(kasprdemo.__file__))"]
    first, second = (pod_runner.run(pod, main_argv=where) for pod in pods)
    for result in (first, second):
        assert not result.init_failed, result.describe()
        assert result.main is not None and result.main.exit_code == 0, result.describe()
    version, path = first.main.stdout.split()
    assert version == "1.0"
    assert path.startswith("/opt/kaspr/packages-cache/"), path  # the build lives in the claim
    assert second.main.stdout.split() == [version, path], (first.describe(), second.describe())
    assert "pip:" in first.init(INIT_CONTAINER).stdout, first.describe()
    assert "pip:" not in second.init(INIT_CONTAINER).stdout, second.describe()  # no pip run at all


def test_gcs_cache_archive_shared_between_pods(
    cluster: ControlPlane, webhook: Webhook, namespace: str, package_index: PackageIndex, pod_runner: PodRunner,
    gcs: GcsStandIn,
):
    """GCS mode with a key Secret: the first pod installs and uploads, the next downloads."""
    bucket = f"kaspr-{namespace}"[:63]
    gcs.create_bucket(bucket)
    _credentials_secret(cluster, namespace, package_index)
    cluster.create({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "gcs-key"},
        "stringData": {"sa.json": gcs.key_json, "unrelated": "must not be mounted"},
    }, namespace=namespace)
    python_packages = {
        **_python_packages(package_index, ["kasprdemo==1.0"]),
        "cache": {"type": "gcs", "gcs": {"bucket": bucket, "secretRef": {"name": "gcs-key"}}},
    }
    # Users point the init container at a GCS-compatible store the documented way.
    template = {"pythonPackagesInitContainer": {"env": [{"name": "STORAGE_EMULATOR_HOST", "value": gcs.url}]}}
    app = cluster.create(kasprapp("gcsapp", python_packages, template=template), namespace=namespace)
    cluster.create(operator_statefulset("gcsapp", app["metadata"]["uid"], replicas=2), namespace=namespace)
    pods = cluster.wait_pods(namespace, "kaspr.io/app=gcsapp", 2)

    init = init_container(pods[0]["spec"])
    key_volume = {v["name"]: v for v in pods[0]["spec"]["volumes"]}["kaspr-packages-gcs-key"]["secret"]
    assert key_volume["defaultMode"] == 0o444
    assert [item["key"] for item in key_volume["items"]] == ["sa.json"]
    assert any(m["name"] == "kaspr-packages-gcs-key" and m.get("readOnly") for m in init["volumeMounts"])
    assert not any(m["name"] == "kaspr-packages-gcs-key" for m in container(pods[0]["spec"], "kaspr")["volumeMounts"])

    first, second = (pod_runner.run(pod, main_argv=CHECK_IMPORT) for pod in pods)
    for result in (first, second):
        assert not result.init_failed, result.describe()
        assert result.main is not None and result.main.stdout.strip() == "1.0", result.describe()
    objects = gcs.objects(bucket)
    assert len(objects) == 1, objects
    assert objects[0].startswith(f"kaspr-packages/{namespace}/gcsapp/"), objects
    assert "pip:" in first.init(INIT_CONTAINER).stdout, first.describe()
    assert "pip:" not in second.init(INIT_CONTAINER).stdout, second.describe()  # served from the archive
    exchanges = gcs.exchanges()
    assert exchanges and all(not e["problems"] for e in exchanges), exchanges
