"""Builders for the objects the scenarios create: KasprApps and StatefulSets in the shape the
Kaspr operator renders (`<app>-app`, labels `kaspr.io/kind`/`kaspr.io/app`, container `kaspr`,
owned by the KasprApp)."""

from __future__ import annotations

import copy

KASPR_IMAGE = "registry.example/kaspr/kaspr:0.1"

# What the webhook adds.
INIT_CONTAINER = "kaspr-packages"
PACKAGES_VOLUME = "kaspr-packages"
PACKAGES_MOUNT = "/opt/kaspr/packages"
SITE_DIR = "/opt/kaspr/packages/site"
TEMPLATE_HASH_ANNOTATION = "packages.kaspr.io/template-hash"
INSTALL_KEY_ANNOTATION = "packages.kaspr.io/install-key"
INJECTED_ANNOTATION = "packages.kaspr.io/injected"
REVISION_ANNOTATION = "packages.kaspr.io/revision"
CONFIG_HASH_ANNOTATION = "packages.kaspr.io/config-hash"

RESTRICTED_CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def kasprapp(name: str, python_packages: dict | None, **spec_extra) -> dict:
    spec: dict = {"replicas": 1, "bootstrapServers": "kafka:9092", **spec_extra}
    if python_packages is not None:
        spec["pythonPackages"] = python_packages
    return {
        "apiVersion": "kaspr.io/v1alpha1",
        "kind": "KasprApp",
        "metadata": {"name": name},
        "spec": spec,
    }


def operator_statefulset(
    app: str,
    owner_uid: str | None,
    *,
    replicas: int = 3,
    restricted: bool = False,
    extra_env: list[dict] | None = None,
) -> dict:
    """The StatefulSet the Kaspr operator renders for `app` (owner reference when owner_uid)."""
    labels = {"kaspr.io/kind": "KasprApp", "kaspr.io/app": app, "app.kubernetes.io/instance": app}
    container: dict = {
        "name": "kaspr",
        "image": KASPR_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python3", "-m", "kaspr", "worker"],
        "env": [
            {"name": "KASPR_APP_NAME", "value": app},
            {"name": "PYTHONPATH", "value": "/app/lib"},
            *(extra_env or []),
        ],
        "ports": [{"name": "http", "containerPort": 6066}],
        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/kaspr"}],
    }
    pod_spec: dict = {
        "containers": [container],
        "volumes": [{"name": "data", "emptyDir": {}}],
        "terminationGracePeriodSeconds": 30,
    }
    if restricted:
        container["securityContext"] = copy.deepcopy(RESTRICTED_CONTAINER_SECURITY)
        pod_spec["securityContext"] = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    metadata: dict = {"name": f"{app}-app", "labels": dict(labels)}
    if owner_uid is not None:
        metadata["ownerReferences"] = [{
            "apiVersion": "kaspr.io/v1alpha1",
            "kind": "KasprApp",
            "name": app,
            "uid": owner_uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }]
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": metadata,
        "spec": {
            "replicas": replicas,
            "serviceName": f"{app}-app",
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {"kaspr.io/app": app, "kaspr.io/kind": "KasprApp"}},
            "template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec},
        },
    }


def plain_statefulset(name: str, replicas: int = 1) -> dict:
    """A StatefulSet that has nothing to do with Kaspr."""
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "serviceName": name,
            # No kubelet makes pods Ready, so OrderedReady would stop after the first pod.
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "web", "image": "registry.example/web:1"}]},
            },
        },
    }


def container(pod_spec: dict, name: str) -> dict:
    for c in pod_spec.get("containers", []):
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name} in {[c['name'] for c in pod_spec.get('containers', [])]}")


def init_container(pod_spec: dict, name: str = INIT_CONTAINER) -> dict | None:
    for c in pod_spec.get("initContainers") or []:
        if c["name"] == name:
            return c
    return None


def env_value(c: dict, name: str) -> dict | None:
    for e in c.get("env") or []:
        if e["name"] == name:
            return e
    return None


def assert_injected(pod_spec: dict, annotations: dict, *, image: str = KASPR_IMAGE) -> dict:
    """Check the injection on a pod (template) spec; returns the init container."""
    init = init_container(pod_spec)
    assert init is not None, f"no {INIT_CONTAINER} init container in {pod_spec.get('initContainers')}"
    assert init["image"] == image
    assert init["command"][0] == "python3", init["command"]
    config = env_value(init, "KASPR_PACKAGES_CONFIG")
    assert config is not None and "value" in config, "KASPR_PACKAGES_CONFIG missing on the init container"
    volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
    assert volumes.get(PACKAGES_VOLUME, {}).get("emptyDir") is not None, volumes.get(PACKAGES_VOLUME)
    init_mounts = {m["mountPath"]: m for m in init.get("volumeMounts") or []}
    assert init_mounts[PACKAGES_MOUNT]["name"] == PACKAGES_VOLUME
    assert not init_mounts[PACKAGES_MOUNT].get("readOnly", False)
    main = container(pod_spec, "kaspr")
    mounts = {m["mountPath"]: m for m in main.get("volumeMounts") or []}
    assert PACKAGES_MOUNT in mounts, f"main container lacks {PACKAGES_MOUNT}: {mounts}"
    assert mounts[PACKAGES_MOUNT]["readOnly"] is True
    pythonpath = env_value(main, "PYTHONPATH")
    assert pythonpath is not None and pythonpath.get("value", "").split(":")[0] == SITE_DIR, pythonpath
    assert "${" not in pythonpath["value"]
    assert init.get("terminationMessagePolicy") == "FallbackToLogsOnError"
    sc = init.get("securityContext") or {}
    assert sc.get("allowPrivilegeEscalation") is False, sc
    assert "ALL" in (sc.get("capabilities") or {}).get("drop", []), sc
    for key in (TEMPLATE_HASH_ANNOTATION, INSTALL_KEY_ANNOTATION, INJECTED_ANNOTATION):
        assert annotations.get(key), f"annotation {key} missing: {annotations}"
    return init


def assert_not_injected(pod_spec: dict, annotations: dict | None) -> None:
    assert init_container(pod_spec) is None, pod_spec.get("initContainers")
    assert PACKAGES_VOLUME not in {v["name"] for v in pod_spec.get("volumes") or []}
    for key in (TEMPLATE_HASH_ANNOTATION, INJECTED_ANNOTATION):
        assert key not in (annotations or {}), annotations
