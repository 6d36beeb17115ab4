"""A stand-in for the Kaspr operator v0.14+ (facts of v0.18.51): what it renders for
`spec.pythonPackages` on top of the StatefulSet an older release renders, and its two loops that
keep the StatefulSet as it wants it:

- every ~10 s a patch that replaces `containers[0].env`, `containers[0].volumeMounts` and
  `spec.template.spec.volumes` with its desired values;
- every 30 s a comparison of its watch fields (replicas, service account, `containers[0].image`,
  the `PACKAGES_HASH` env of `containers[0]` and of the init container `install-packages`),
  and on any difference a replacement of the whole `/spec/template` with its desired one.

Its PACKAGES_HASH algorithm is its own; any digest of the package configuration plays it here.
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field

from e2e_cluster import ControlPlane

OPERATOR_INIT = "install-packages"
HASH_ENV = "PACKAGES_HASH"
LITERAL_PYTHONPATH = "/opt/kaspr/packages:${PYTHONPATH}"


def packages_hash(python_packages: dict) -> str:
    return hashlib.sha256(json.dumps(python_packages, sort_keys=True).encode()).hexdigest()[:16]


def cache_mode(python_packages: dict) -> str:
    cache = python_packages.get("cache") or {}
    if cache.get("type") == "gcs":
        return "gcs"
    return "pvc" if cache.get("enabled") else "emptyDir"


def render(base: dict, app: str, python_packages: dict | None) -> dict:
    """The operator's StatefulSet: `base` (what a release before v0.14 renders) plus its own
    package injection when `python_packages` is set."""
    sts = copy.deepcopy(base)
    if not python_packages:
        return sts
    pod = sts["spec"]["template"]["spec"]
    main = pod["containers"][0]
    mode = cache_mode(python_packages)
    digest = packages_hash(python_packages)
    volume = f"{app}-app-packages"
    init_env = []
    if mode != "emptyDir":
        init_env.append({"name": HASH_ENV, "value": digest})
    if python_packages.get("indexUrl"):
        init_env.append({"name": "INDEX_URL", "value": python_packages["indexUrl"]})
    init_mounts = [{"name": volume, "mountPath": "/opt/kaspr/packages"}]
    if mode == "gcs":
        init_mounts.append({"name": "gcs-sa-key", "mountPath": "/var/run/secrets/gcs", "readOnly": True})
    script = ("set -e\npip install --target /opt/kaspr/packages "
              + " ".join(json.dumps(p) for p in python_packages["packages"]))
    pod["initContainers"] = [{
        "name": OPERATOR_INIT,
        "image": main["image"],
        "command": ["/bin/bash", "-c", script],
        "env": init_env,
        "volumeMounts": init_mounts,
    }] + [c for c in pod.get("initContainers") or [] if c["name"] != OPERATOR_INIT]
    # It replaces the env's PYTHONPATH with its own, a literal ${PYTHONPATH} in it.
    env = [e for e in main.get("env") or [] if e["name"] != "PYTHONPATH"]
    env.append({"name": "PYTHONPATH", "value": LITERAL_PYTHONPATH})
    if mode != "emptyDir":
        env.append({"name": HASH_ENV, "value": digest})
    main["env"] = env
    main["volumeMounts"] = (main.get("volumeMounts") or []) + [
        {"name": volume, "mountPath": "/opt/kaspr/packages", "readOnly": True}]
    if mode == "pvc":
        source = {"persistentVolumeClaim": {"claimName": f"{app}-app-python-packages"}}
    else:
        source = {"emptyDir": {}}
    pod["volumes"] = (pod.get("volumes") or []) + [{"name": volume, **source}]
    if mode == "gcs":
        secret = python_packages["cache"]["gcs"]["secretRef"]
        pod["volumes"].append({"name": "gcs-sa-key", "secret": {
            "secretName": secret["name"], "defaultMode": 0o644}})
    # Like the operator, no securityContext on its containers (it drops what the app declares).
    pod["initContainers"][0].pop("securityContext", None)
    main.pop("securityContext", None)
    return sts


def watch_fields(sts: dict) -> tuple:
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    main = pod["containers"][0]

    def hash_of(container: dict | None):
        for e in (container or {}).get("env") or []:
            if e["name"] == HASH_ENV:
                return e.get("value")
        return None

    init = next((c for c in pod.get("initContainers") or [] if c["name"] == OPERATOR_INIT), None)
    return (spec.get("replicas"), pod.get("serviceAccountName"), main.get("image"), hash_of(main), hash_of(init))


@dataclass
class OperatorLoops:
    """Both loops against one app, in a thread, until stopped; counts what it sent."""
    cluster: ControlPlane
    namespace: str
    app: str
    base: dict
    patch_every: float = 10.0
    compare_every: float = 30.0
    patches: int = 0
    replacements: int = 0
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def desired(self) -> dict:
        kasprapp = self.cluster.get_json("kasprapp", self.app, namespace=self.namespace)
        return render(self.base, self.app, kasprapp["spec"].get("pythonPackages"))

    def _patch(self, ops: list[dict]) -> None:
        self.cluster.kubectl(["patch", "statefulset", f"{self.app}-app", "-n", self.namespace, "--type=json",
                              "-p", json.dumps(ops)])

    def sync_claim(self) -> None:
        """Its PVC mode's claim: created while the mode applies, deleted when it stops."""
        kasprapp = self.cluster.get_json("kasprapp", self.app, namespace=self.namespace)
        packages = kasprapp["spec"].get("pythonPackages")
        name = f"{self.app}-app-python-packages"
        if packages and cache_mode(packages) == "pvc":
            self.cluster.kubectl(["apply", "-n", self.namespace, "-f", "-"], input=json.dumps({
                "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": name, "labels": {"kaspr.io/app": self.app,
                                                      "kaspr.io/component": "python-packages"}},
                "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "256Mi"}}},
            }))
        else:
            self.cluster.kubectl(["delete", "pvc", name, "-n", self.namespace, "--ignore-not-found",
                                  "--wait=false"])

    def ten_second_patch(self) -> None:
        self.sync_claim()
        pod = self.desired()["spec"]["template"]["spec"]
        self._patch([
            {"op": "replace", "path": "/spec/template/spec/containers/0/env", "value": pod["containers"][0]["env"]},
            {"op": "replace", "path": "/spec/template/spec/containers/0/volumeMounts",
             "value": pod["containers"][0]["volumeMounts"]},
            {"op": "replace", "path": "/spec/template/spec/volumes", "value": pod["volumes"]},
        ])
        self.patches += 1

    def thirty_second_check(self) -> None:
        desired = self.desired()
        current = self.cluster.get_json("statefulset", f"{self.app}-app", namespace=self.namespace)
        if watch_fields(current) != watch_fields(desired):
            self._patch([{"op": "replace", "path": "/spec/template", "value": desired["spec"]["template"]}])
            self.replacements += 1

    def _run(self) -> None:
        start = time.monotonic()
        next_patch, next_compare = start + self.patch_every, start + self.compare_every
        while not self._stop.wait(0.2):
            now = time.monotonic()
            try:
                if now >= next_patch:
                    next_patch += self.patch_every
                    self.ten_second_patch()
                if now >= next_compare:
                    next_compare += self.compare_every
                    self.thirty_second_check()
            except Exception as error:  # noqa: BLE001 - reported by the test
                self.errors.append(str(error))

    def start(self) -> "OperatorLoops":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
