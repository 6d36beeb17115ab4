"""The Helm chart against the real API server (SPEC §10, §11): lint, every rendered manifest
accepted by a server-side dry run, then `helm install`, `upgrade` and `uninstall`.

No kubelet runs, so the chart's pods stay Pending; what is proven is that the API server accepts
every object and that helm manages the release's whole life.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from e2e_cluster import ControlPlane, wait_for

REPO = Path(__file__).resolve().parents[2]
CHART = Path(os.environ.get("KASPR_E2E_CHART", REPO / "charts" / "kaspr-packages-webhook"))
RELEASE = "e2e-chart"
RELEASE_NAMESPACE = "kaspr-packages-system"

pytestmark = pytest.mark.skipif(not (CHART / "Chart.yaml").exists(), reason=f"no chart at {CHART}")


class Helm:
    def __init__(self, cluster: ControlPlane, home: Path):
        self.cluster = cluster
        home.mkdir(parents=True, exist_ok=True)
        # helm keeps its state in these; never in the invoking user's home.
        self.env = [f"HELM_{kind}_HOME={home / kind.lower()}" for kind in ("CACHE", "CONFIG", "DATA")]

    def __call__(self, *args: str, check: bool = True):
        return self.cluster.netns.run(
            ["env", *self.env, str(self.cluster.tools.path("helm")),
             "--kubeconfig", str(self.cluster.admin_kubeconfig), *args],
            check=check, timeout=180,
        )


def _objects(manifest: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(manifest) if doc]


def _exists(cluster: ControlPlane, obj: dict) -> bool:
    kind = obj["kind"]
    group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
    resource = f"{kind}.{group}" if group else kind
    namespace = obj["metadata"].get("namespace") or RELEASE_NAMESPACE
    proc = cluster.kubectl(["get", resource, obj["metadata"]["name"], "-n", namespace, "--ignore-not-found",
                            "-o", "name"], check=False)
    return proc.returncode == 0 and proc.stdout.strip() != ""


def test_chart_lints_installs_upgrades_and_uninstalls(cluster: ControlPlane, e2e_workdir: Path):
    helm = Helm(cluster, e2e_workdir / "helm")
    helm("lint", "--strict", str(CHART))

    rendered = helm("template", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE).stdout
    objects = _objects(rendered)
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "ServiceAccount", "MutatingWebhookConfiguration",
            "ValidatingWebhookConfiguration"} <= kinds, kinds
    if cluster.kubectl(["get", "namespace", RELEASE_NAMESPACE], check=False).returncode != 0:
        cluster.kubectl(["create", "namespace", RELEASE_NAMESPACE])
    # Every rendered manifest must pass the API server's own validation.
    cluster.kubectl(["apply", "--dry-run=server", "-n", RELEASE_NAMESPACE, "-f", "-"], input=rendered)

    try:
        helm("install", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE)
        installed = _objects(helm("get", "manifest", RELEASE, "--namespace", RELEASE_NAMESPACE).stdout)
        missing = [f"{o['kind']}/{o['metadata']['name']}" for o in installed if not _exists(cluster, o)]
        assert not missing, missing

        helm("upgrade", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE, "--reuse-values")
        status = json.loads(helm("status", RELEASE, "--namespace", RELEASE_NAMESPACE, "-o", "json").stdout)
        assert status["version"] == 2 and status["info"]["status"] == "deployed", status["info"]

        helm("uninstall", RELEASE, "--namespace", RELEASE_NAMESPACE, "--wait", "--timeout", "60s")
        wait_for("the release's objects to be gone",
                 lambda: not any(_exists(cluster, o) for o in installed), timeout=60)
        assert json.loads(helm("list", "--namespace", RELEASE_NAMESPACE, "-o", "json").stdout) == []
    finally:
        # Whatever happened, leave no webhook registration behind for the other tests.
        helm("uninstall", RELEASE, "--namespace", RELEASE_NAMESPACE, check=False)
        for obj in objects:
            if obj["kind"] in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
                cluster.kubectl(["delete", obj["kind"].lower(), obj["metadata"]["name"], "--ignore-not-found"],
                                check=False)
