"""The chart without a cluster: `helm template` renders of every value (Kubernetes 1.37), the
`helm test` Pod, the monitoring objects, the schema, and the README's values table.

helm comes from the pinned tools the end-to-end suite builds (scripts/build-k8s-tools):
scripts/test-chart passes it as KASPR_HELM (building it when needed), and a missing KASPR_HELM
is an error. Run by hand without it, the newest cached
${KASPR_CACHE_DIR:-~/.cache/kaspr-packages-webhook}/k8s/1.37-*/bin/helm is used, and the
render tests are skipped, saying so, when there is none.
"""
import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kaspr-packages-webhook"
KUBE_VERSION = "v1.37.2"
NAMESPACE = "kaspr-system"
EVERYTHING = Path(__file__).with_name("values-everything.yaml")
ALERTS = {
    "KasprPackagesWebhookCertificateExpiresSoon",
    "KasprPackagesWebhookAppsOutOfSync",
    "KasprPackagesWebhookAdmissionErrors",
    "KasprPackagesWebhookDenialsRising",
    "KasprPackagesWebhookSlow",
    "KasprPackagesWebhookReconcileFailures",
    "KasprPackagesWebhookRevisionMoveFailed",
}


def _helm() -> Path | None:
    chosen = os.environ.get("KASPR_HELM")
    if chosen:
        if not os.access(chosen, os.X_OK):
            raise RuntimeError(f"KASPR_HELM={chosen} is not an executable helm")
        return Path(chosen)
    cache = Path(os.environ.get("KASPR_CACHE_DIR", Path.home() / ".cache" / "kaspr-packages-webhook"))
    found = sorted((cache / "k8s").glob("1.37-*/bin/helm"))
    return found[-1] if found else None


HELM = _helm()
needs_helm = pytest.mark.skipif(
    HELM is None, reason="no helm under ~/.cache/kaspr-packages-webhook/k8s/1.37-*/bin (scripts/build-k8s-tools builds it)")


def render(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(HELM), "template", "r", str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION, *args],
        capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def objects(*args: str) -> list[dict]:
    return [o for o in yaml.safe_load_all(render(*args).stdout) if o]


def one(objs: list[dict], kind: str, name_suffix: str = "") -> dict:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, (kind, name_suffix, [o["metadata"]["name"] for o in found])
    return found[0]


def test_pod(objs: list[dict]) -> dict:
    return one(objs, "Pod", "-self-test")


test_pod.__test__ = False


# --- helm test -------------------------------------------------------------------------------

@needs_helm
def test_the_test_pod_runs_self_test_through_the_service_hardened_like_the_deployment():
    objs = objects()
    pod = test_pod(objs)
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    spec = pod["spec"]
    container = spec["containers"][0]
    assert container["args"] == [
        "self-test",
        f"--url=https://r-kaspr-packages-webhook.{NAMESPACE}.svc:443",
        "--ca-file=/etc/kaspr-packages-webhook/ca/ca.crt",
        f"--namespace={NAMESPACE}",
    ]
    deployment = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert container["image"] == deployment["containers"][0]["image"]
    assert container["securityContext"] == deployment["containers"][0]["securityContext"]
    assert spec["securityContext"] == deployment["securityContext"]
    assert spec["restartPolicy"] == "Never" and spec["automountServiceAccountToken"] is False
    assert spec["activeDeadlineSeconds"] <= 300
    # Only the CA of the certificate Secret, never its key.
    volume = spec["volumes"][0]["secret"]
    assert volume["secretName"] == "r-kaspr-packages-webhook-tls"
    assert volume["items"] == [{"key": "ca-bundle.crt", "path": "ca.crt"}]
    # Neither the Deployment's ReplicaSets nor the Service may select the test Pod.
    labels = pod["metadata"]["labels"]
    for selector in (one(objs, "Deployment")["spec"]["selector"]["matchLabels"], one(objs, "Service")["spec"]["selector"]):
        assert not selector.items() <= labels.items(), selector


@needs_helm
def test_the_test_pod_takes_the_ca_of_each_certificate_mode():
    pod = test_pod(objects("-f", str(CHART / "ci" / "cert-manager-values.yaml")))
    assert pod["spec"]["volumes"][0]["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]

    objs = objects("-f", str(CHART / "ci" / "provided-values.yaml"))
    ca = one(objs, "ConfigMap", "-self-test-ca")
    assert ca["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert ca["data"]["ca.crt"].startswith("-----BEGIN CERTIFICATE-----")
    assert test_pod(objs)["spec"]["volumes"][0]["configMap"]["name"] == ca["metadata"]["name"]
    # A base64 caBundle is decoded to PEM.
    provided = yaml.safe_load((CHART / "ci" / "provided-values.yaml").read_text())
    pem = provided["certificates"]["provided"]["caBundle"].strip()
    encoded = base64.b64encode(pem.encode()).decode()
    objs = objects("-f", str(CHART / "ci" / "provided-values.yaml"), "--set", f"certificates.provided.caBundle={encoded}")
    assert one(objs, "ConfigMap", "-self-test-ca")["data"]["ca.crt"].strip() == pem


@needs_helm
def test_the_test_pod_follows_the_url_the_watched_namespaces_and_its_own_values():
    pod = test_pod(objects("--set", "webhook.url=https://hook.example.com:8443/",
                           "--set", "server.watchNamespaces={apps,data}"))
    args = pod["spec"]["containers"][0]["args"]
    assert "--url=https://hook.example.com:8443" in args
    assert "--namespace=apps" in args
    pod = test_pod(objects("-f", str(EVERYTHING)))
    container = pod["spec"]["containers"][0]
    assert container["args"][-2:] == ["--namespace=apps", "--app=my-app"]
    assert container["resources"]["limits"] == {"memory": "32Mi"}
    assert "runAsUser" not in pod["spec"]["securityContext"]


@needs_helm
def test_no_test_pod_with_a_client_ca_or_when_switched_off():
    pem = yaml.safe_load((CHART / "ci" / "provided-values.yaml").read_text())["certificates"]["provided"]["caBundle"]
    for args in (["--set-string", f"webhook.clientCA={pem}"], ["--set", "tests.enabled=false"]):
        assert not [o for o in objects(*args) if o["kind"] == "Pod"], args


@needs_helm
def test_a_network_policy_admits_the_test_pod_to_the_webhook_port():
    objs = objects("--set", "networkPolicy.enabled=true",
                   "--set", "networkPolicy.webhookFrom[0].ipBlock.cidr=10.0.0.0/8")
    peers = one(objs, "NetworkPolicy")["spec"]["ingress"][0]["from"]
    selectors = [p["podSelector"]["matchLabels"] for p in peers if "podSelector" in p]
    labels = test_pod(objs)["metadata"]["labels"]
    assert selectors and all(s.items() <= labels.items() for s in selectors)


# --- values for every cluster ------------------------------------------------------------------

@needs_helm
def test_defaults_keep_the_hardened_security_contexts():
    spec = one(objects(), "Deployment")["spec"]["template"]["spec"]
    assert spec["securityContext"] == {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                                       "fsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}}
    container = spec["containers"][0]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
    assert "env" not in container
    assert container["livenessProbe"] == {"httpGet": {"path": "/livez", "port": "probes"},
                                          "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 6}
    assert container["readinessProbe"] == {"httpGet": {"path": "/readyz", "port": "probes"},
                                           "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 3}


@needs_helm
@pytest.mark.parametrize("value", ["respect", "takeover"])
def test_the_operator_packages_default_reaches_the_webhook(value):
    args = one(objects("--set", f"operatorPackages={value}"), "Deployment")["spec"]["template"]["spec"][
        "containers"][0]["args"]
    assert f"--operator-packages={value}" in args, args


@needs_helm
def test_image_mode_values_reach_the_webhook_only_with_a_repository():
    def args(*values: str) -> list[str]:
        return one(objects(*values), "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]

    assert not [a for a in args() if a.startswith("--image-")]
    assert not [a for a in args("--set", "imageMode.pushSecret=push") if a.startswith("--image-")]
    rendered = args("--set", "imageMode.repository=registry.example:5000/kaspr/packages",
                    "--set", "imageMode.pushSecret=registry-push", "--set", "imageMode.pullSecret=registry-pull",
                    "--set", "imageMode.nodesSupportImageVolumes=false", "--set", "imageMode.plainHttp=true")
    assert [a for a in rendered if a.startswith("--image-")] == [
        "--image-repository=registry.example:5000/kaspr/packages", "--image-push-secret=registry-push",
        "--image-pull-secret=registry-pull", "--image-volumes-on-nodes=false", "--image-registry-plain-http=true"]
    # The push credentials stay with the build Jobs: the webhook's own pod mounts no Secret of them.
    deployment = one(objects("--set", "imageMode.repository=r.example/p", "--set", "imageMode.pushSecret=registry-push"),
                     "Deployment")
    assert "registry-push" not in json.dumps(deployment["spec"]["template"]["spec"].get("volumes", []))


@needs_helm
def test_the_revision_is_passed_only_when_named():
    def args(*values):
        return one(objects(*values), "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]

    assert not [a for a in args() if a.startswith("--revision")], args()
    assert "--revision=canary-2" in args("--set", "revision=canary-2")


@needs_helm
@pytest.mark.parametrize("value", ["auto", "pip", "uv"])
def test_the_install_tool_default_reaches_the_webhook(value):
    args = one(objects("--set", f"installTool={value}"), "Deployment")["spec"]["template"]["spec"][
        "containers"][0]["args"]
    assert f"--install-tool={value}" in args, args


@needs_helm
def test_every_new_value_is_rendered():
    objs = objects("-f", str(EVERYTHING))
    spec = one(objs, "Deployment")["spec"]["template"]["spec"]
    # OpenShift: the SCC assigns user, group and fsGroup.
    assert spec["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    container = spec["containers"][0]
    assert container["securityContext"]["runAsUser"] == 1000680000
    assert container["args"][-1] == "--header-timeout=3s"
    assert container["env"] == [{"name": "RUST_BACKTRACE", "value": "1"}]
    assert {"name": "extra-ca", "configMap": {"name": "extra-ca"}} in spec["volumes"]
    assert {"name": "extra-ca", "mountPath": "/etc/extra-ca", "readOnly": True} in container["volumeMounts"]
    assert container["livenessProbe"] == {"httpGet": {"path": "/livez", "port": "probes"}, "initialDelaySeconds": 5,
                                          "periodSeconds": 20, "timeoutSeconds": 3, "failureThreshold": 4}
    assert container["readinessProbe"]["periodSeconds"] == 7
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "probes"}


@needs_helm
@pytest.mark.parametrize("args, message", [
    (["--set", "unknownValue=1"], "unknownValue"),
    (["--set", "extraArgs[0]=header-timeout=3s"], "extraArgs"),
    (["--set", "probes.liveness.httpGet.path=/"], "httpGet"),
    (["--set", "metrics.prometheusRule.disabled[0]=NoSuchAlert"], "disabled"),
    (["--set", "metrics.prometheusRule.latencyTimeoutRatio=2"], "latencyTimeoutRatio"),
    (["--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.service=false"], "metrics.service"),
    (["--set", "operatorPackages=replace"], "operatorPackages"),
    (["--set", "imageMode.repository=https://registry.example/p"], "imageMode"),
    (["--set", "imageMode.pullSecret=Pull_Secret"], "imageMode"),
    (["--set", "revision=Canary/2"], "revision"),
    (["--set", "installTool=poetry"], "installTool"),
])
def test_unusable_values_are_refused_by_name(args, message):
    proc = render(*args, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


# --- monitoring ------------------------------------------------------------------------------

@needs_helm
def test_monitoring_objects_are_off_by_default():
    kinds = {o["kind"] for o in objects()}
    assert not kinds & {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    assert not [o for o in objects() if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboard")]


@needs_helm
def test_monitors_scrape_the_metrics_port_of_the_webhook_pods():
    objs = objects("-f", str(EVERYTHING))
    selector = one(objs, "Deployment")["spec"]["selector"]["matchLabels"]
    service_monitor = one(objs, "ServiceMonitor")
    assert service_monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert service_monitor["spec"]["selector"]["matchLabels"] == selector
    assert service_monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "scheme": "http", "interval": "15s", "scrapeTimeout": "5s"}]
    assert "metrics" in [p["name"] for p in one(objs, "Service")["spec"]["ports"]]
    pod_monitor = one(objs, "PodMonitor")
    assert pod_monitor["spec"]["selector"]["matchLabels"] == selector
    assert pod_monitor["spec"]["podMetricsEndpoints"] == [{"port": "probes", "path": "/metrics", "scheme": "http"}]


@needs_helm
def test_the_alerts_render_with_their_thresholds_and_labels():
    rules = one(objects("--set", "metrics.prometheusRule.enabled=true"), "PrometheusRule")
    alerts = {r["alert"]: r for r in rules["spec"]["groups"][0]["rules"]}
    assert alerts.keys() == ALERTS
    for rule in alerts.values():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert "kaspr_packages_webhook_" in rule["expr"]
    assert alerts["KasprPackagesWebhookSlow"]["expr"].endswith("> 5")  # 0.5 of 10 s
    assert alerts["KasprPackagesWebhookCertificateExpiresSoon"]["expr"].endswith("< 604800")

    rules = one(objects("-f", str(EVERYTHING)), "PrometheusRule")
    alerts = {r["alert"]: r for r in rules["spec"]["groups"][0]["rules"]}
    assert alerts.keys() == ALERTS - {"KasprPackagesWebhookDenialsRising"}
    assert rules["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert all(r["labels"]["team"] == "platform" for r in alerts.values())
    assert alerts["KasprPackagesWebhookSlow"]["expr"].endswith("> 8")
    assert alerts["KasprPackagesWebhookCertificateExpiresSoon"]["expr"].endswith(f"< {10 * 86400}")


@needs_helm
def test_the_dashboard_is_a_labelled_configmap_with_the_chart_file():
    objs = objects("-f", str(EVERYTHING))
    dashboard = one(objs, "ConfigMap", "-dashboard")
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "Kaspr"}
    (key, text), = dashboard["data"].items()
    assert key.endswith(".json")
    assert json.loads(text) == json.loads((CHART / "files" / "dashboard.json").read_text())
    default = one(objects("--set", "metrics.dashboard.enabled=true"), "ConfigMap", "-dashboard")
    assert default["metadata"]["namespace"] == NAMESPACE
    assert default["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_the_dashboard_is_valid_grafana_json():
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    assert dashboard["uid"] == "kaspr-packages-webhook"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys()
        assert all(t["expr"] for t in panel["targets"])


# --- Chart.yaml, README, schema -------------------------------------------------------------

def test_artifact_hub_annotations_name_the_released_image():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    annotations = chart["annotations"]
    images = yaml.safe_load(annotations["artifacthub.io/images"])
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert images == [{"name": "kaspr-packages-webhook",
                       "image": f"{values['image']['repository']}:{chart['appVersion']}"}]
    assert all(link["url"].startswith("https://") for link in yaml.safe_load(annotations["artifacthub.io/links"]))
    assert annotations["artifacthub.io/license"] == "Apache-2.0"


def test_the_readme_values_table_is_current():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "chart-readme"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def _leaves(values: dict, prefix: str = ""):
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _leaves(value, path + ".")
        else:
            yield path


def _schema_has(schema: dict, path: str) -> bool:
    node = schema
    for key in path.split("."):
        properties = node.get("properties", {})
        if key in properties:
            node = properties[key]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        elif node.get("additionalProperties") is False or "properties" in node:
            return False
        else:
            return True  # a free-form object (affinity, resources maps)
    return True


def test_every_value_is_in_the_schema_and_described_in_the_readme():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    missing = [p for p in _leaves(values) if not _schema_has(schema, p)]
    assert not missing, f"not in values.schema.json: {missing}"
    readme = (CHART / "README.md").read_text()
    table = readme.split("<!-- values:start -->")[1].split("<!-- values:end -->")[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert rows
    undocumented = [r.split("`")[1] for r in rows if r.rstrip().endswith("|  |")]
    assert not undocumented, f"values without a `# --` comment in values.yaml: {undocumented}"
    listed = {r.split("`")[1] for r in rows}
    for leaf in _leaves(values):
        assert any(leaf == key or leaf.startswith(key + ".") for key in listed), leaf
