"""The pod runner on hand-written pods: env resolution, volumes and mounts as a kubelet does."""

from __future__ import annotations

import base64
import json
import sys

from e2e_cluster import ControlPlane
from e2e_index import PackageIndex
from pod_runner import PodRunner, expand


def test_expand_follows_kubernetes_rules():
    env = {"A": "x", "B": "y$(A)"}
    assert expand("$(A)-$(B)", env.get) == "x-y$(A)"
    assert expand("$$(A)", env.get) == "$(A)"
    assert expand("$(MISSING)", env.get) == "$(MISSING)"
    assert expand("$A ${A} $", env.get) == "$A ${A} $"
    assert expand("$(A", env.get) == "$(A"


def _secret(name: str, data: dict[str, str]) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


WRITER = """
import json, os, stat, sys
out = {
    "env": {k: os.environ.get(k) for k in ("FROM_SECRET", "FROM_CM", "POD", "NS", "LABEL", "COMBINED", "ESCAPED")},
    "argv": sys.argv[1:],
    "secret": open("/etc/e2e-secret/token").read(),
    "secret_mode": oct(stat.S_IMODE(os.stat("/etc/e2e-secret/token").st_mode)),
    "sa_namespace": open("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read(),
    "has_token": len(open("/var/run/secrets/kubernetes.io/serviceaccount/token").read()) > 100,
    "host_env_leaked": "PIP_FIND_LINKS" in os.environ,
}
open("/opt/e2e/shared/out.json", "w").write(json.dumps(out))
"""

READER = """
import json, os
data = json.load(open("/opt/e2e/shared/out.json"))
try:
    open("/opt/e2e/shared/other", "w")
    data["read_only"] = False
except OSError:
    data["read_only"] = True
print(json.dumps(data))
"""


def test_runner_resolves_env_volumes_and_mounts(cluster: ControlPlane, namespace: str, pod_runner: PodRunner):
    cluster.create(_secret("creds", {"token": "t0p-secret"}), namespace=namespace)
    cluster.kubectl(["create", "configmap", "settings", "-n", namespace, "--from-literal=mode=fast"])
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "runner-check", "labels": {"role": "e2e"}},
        "spec": {
            "initContainers": [{
                "name": "writer",
                "image": "python",
                "command": ["python3", "-c", WRITER],
                "args": ["$(POD)", "$$(POD)"],
                "env": [
                    {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                    {"name": "FROM_CM", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
                    {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    {"name": "LABEL", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['role']"}}},
                    {"name": "COMBINED", "value": "$(POD).$(NS)"},
                    {"name": "ESCAPED", "value": "$$(POD)"},
                ],
                "volumeMounts": [
                    {"name": "shared", "mountPath": "/opt/e2e/shared"},
                    {"name": "secret", "mountPath": "/etc/e2e-secret", "readOnly": True},
                ],
            }],
            "containers": [{
                "name": "kaspr",
                "image": "python",
                "volumeMounts": [{"name": "shared", "mountPath": "/opt/e2e/shared", "readOnly": True}],
            }],
            "volumes": [
                {"name": "shared", "emptyDir": {}},
                {"name": "secret", "secret": {"secretName": "creds", "defaultMode": 0o400}},
            ],
        },
    }
    created = cluster.create(pod, namespace=namespace)
    # The ServiceAccount admission plugin added the projected token volume; the runner mounts it.
    assert any(v.get("projected") for v in created["spec"]["volumes"])
    result = pod_runner.run(created, main_argv=["python3", "-c", READER])
    assert not result.init_failed, result.describe()
    assert result.main is not None and result.main.exit_code == 0, result.describe()
    data = json.loads(result.main.stdout)
    assert data["env"] == {
        "FROM_SECRET": "t0p-secret",
        "FROM_CM": "fast",
        "POD": "runner-check",
        "NS": namespace,
        "LABEL": "e2e",
        "COMBINED": f"runner-check.{namespace}",
        "ESCAPED": "$(POD)",
    }
    assert data["argv"] == ["runner-check", "$(POD)"]
    assert data["secret"] == "t0p-secret"
    assert data["secret_mode"] == "0o400"
    assert data["sa_namespace"] == namespace
    assert data["has_token"] is True
    assert data["host_env_leaked"] is False
    assert data["read_only"] is True


def test_failed_init_container_stops_the_pod(cluster: ControlPlane, namespace: str, pod_runner: PodRunner):
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "fails"},
        "spec": {
            "initContainers": [{
                "name": "boom",
                "image": "python",
                "command": ["python3", "-c",
                            "import os, sys; open(os.environ['KASPR_PACKAGES_TERMINATION_LOG'], 'w').write('boom: failed');"
                            "sys.exit(3)"],
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }],
            "containers": [{"name": "kaspr", "image": "python"}],
        },
    }
    created = cluster.create(pod, namespace=namespace)
    result = pod_runner.run(created, main_argv=["python3", "-c", "print('should not run')"])
    assert result.init_failed
    assert result.init("boom").exit_code == 3
    assert result.init("boom").termination_message == "boom: failed"
    assert result.main is None


def test_index_requires_basic_auth_and_serves_the_wheel(cluster: ControlPlane, package_index: PackageIndex):
    status, _ = cluster.http_get(package_index.url + "kasprdemo/")
    assert status == 401
    script = (
        "import base64, sys, urllib.request\n"
        "req = urllib.request.Request(sys.argv[1])\n"
        "token = base64.b64encode(f'{sys.argv[2]}:{sys.argv[3]}'.encode()).decode()\n"
        "req.add_header('Authorization', 'Basic ' + token)\n"
        "print(urllib.request.urlopen(req, timeout=5).read().decode())\n"
    )
    page = cluster.netns.run([sys.executable, "-c", script, package_index.url + "kasprdemo/",
                              package_index.username, package_index.password]).stdout
    assert "kasprdemo-1.0-py3-none-any.whl" in page
