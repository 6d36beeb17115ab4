"""The harness itself: a real control plane and node, sealed in their network namespace."""

from __future__ import annotations

import json

import pytest

from e2e_cluster import BRIDGE, BRIDGE_MAC, NODE_IP, ControlPlane, E2EError, Process
from e2e_node import NODE_NAME, Node
from e2e_objects import plain_statefulset


def pinned_versions(cluster: ControlPlane) -> dict[str, str]:
    """What scripts/build-k8s-tools built, read from the tool set's record."""
    record = (cluster.tools.bin_dir.parent / "complete").read_text().split("\n")
    return dict(line.split(" ", 1) for line in record if line.strip())


def test_versions_are_the_pinned_releases(cluster: ControlPlane):
    pins = pinned_versions(cluster)
    kube = pins["kubernetes"]
    server = json.loads(cluster.kubectl(["get", "--raw", "/version"]).stdout)
    assert server["gitVersion"] == kube, (server, pins)
    client = json.loads(cluster.kubectl(["version", "--client", "-o", "json"]).stdout)["clientVersion"]
    assert client["gitVersion"] == kube, (client, pins)
    node = cluster.get_json("node", NODE_NAME)["status"]["nodeInfo"]
    assert node["kubeletVersion"] == kube, node
    assert node["containerRuntimeVersion"].startswith("containerd://"), node
    for tool in ("kube-scheduler", "kube-proxy"):
        out = cluster.netns.run([str(cluster.tools.path(tool)), "--version"]).stdout
        assert out.strip() == f"Kubernetes {kube}", (tool, out)
    helm = cluster.netns.run([str(cluster.tools.path("helm")), "version", "--short"]).stdout
    assert helm.startswith(pins["helm"] + "+") or helm.strip() == pins["helm"], (helm, pins)
    etcd = cluster.netns.run([str(cluster.tools.path("etcd")), "--version"]).stdout
    assert f"etcd Version: {pins['etcd'].removeprefix('v')}\n" in etcd, (etcd, pins)


def test_namespace_has_no_way_out(cluster: ControlPlane):
    # Loopback, the pod bridge and the pods' veths, nothing else.
    links = cluster.netns.links()
    assert "lo" in links and "cni0" in links, links
    others = [name for name in links if name not in ("lo", "cni0") and not name.startswith("veth")]
    assert not others, links
    # No default route, so no route leaves the namespace: the kernel refuses before any
    # packet exists, for public and private-range addresses alike.
    routes = cluster.netns.run(["ip", "route", "show"]).stdout
    assert "default" not in routes, routes
    for outside in ("192.0.2.1", "8.8.8.8", "10.0.0.1", "172.16.0.1", "192.168.0.1"):
        probe = cluster.netns.run(["ip", "route", "get", outside], check=False)
        assert probe.returncode != 0 and "unreachable" in probe.stderr.lower(), (outside, probe)
    # The pod network and the node address stay on the bridge; the service range is local.
    assert cluster.netns.run(["ip", "route", "get", "10.244.0.7"]).stdout.split()[2] == "cni0"
    local = cluster.netns.run(["ip", "route", "get", "10.96.0.1"]).stdout
    assert local.startswith("local 10.96.0.1 dev lo"), local
    svc = cluster.get_json("service", "kubernetes", namespace="default")
    assert svc["spec"]["clusterIP"] == "10.96.0.1"
    endpoints = cluster.get_json("endpointslices", "-l", "kubernetes.io/service-name=kubernetes",
                                 namespace="default")["items"]
    addresses = [a for s in endpoints for e in s.get("endpoints", []) for a in e["addresses"]]
    assert addresses == [NODE_IP], addresses


def test_the_pod_bridge_keeps_its_address_while_pods_come_and_go(cluster: ControlPlane):
    def bridge_mac() -> str:
        return json.loads(cluster.netns.run(["ip", "-j", "link", "show", BRIDGE]).stdout)[0]["address"]

    assert bridge_mac() == BRIDGE_MAC
    # 3 is NET_ADDR_SET: the address was given, not inherited from a port.
    assign = cluster.netns.run(["cat", f"/sys/class/net/{BRIDGE}/addr_assign_type"]).stdout.strip()
    assert assign == "3", assign
    # A port whose MAC sorts below the bridge's joins and leaves, as a pod's veth does: a bridge
    # with an inherited MAC would take the port's and keep changing.
    veth, peer = "vethkeepmac", "vethkeepmacp"
    cluster.netns.run(["ip", "link", "add", veth, "address", "02:00:00:00:00:01", "type", "veth",
                       "peer", "name", peer])
    try:
        cluster.netns.run(["ip", "link", "set", veth, "master", BRIDGE, "up"])
        assert bridge_mac() == BRIDGE_MAC
    finally:
        cluster.netns.run(["ip", "link", "del", veth], check=False)
    assert bridge_mac() == BRIDGE_MAC


def test_statefulset_pods_are_scheduled_on_the_node(cluster: ControlPlane, namespace: str):
    cluster.create(plain_statefulset("plain", replicas=2), namespace=namespace)
    pods = cluster.wait_pods(namespace, "app=plain", 2)
    assert [p["metadata"]["name"] for p in pods] == ["plain-0", "plain-1"]
    for pod in pods:
        owner = pod["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"]) == ("StatefulSet", "plain")
    # The scheduler binds them to the one node (their image cannot be pulled: nothing can).
    bound = cluster.wait_pods_where(namespace, "app=plain", lambda p: p["spec"].get("nodeName") == NODE_NAME, 2)
    assert len(bound) == 2


def test_a_kubelet_refusing_cgroup_v1_stops_the_suite_with_one_sentence(tmp_path):
    """Should a future kubelet drop cgroup v1, the suite says so at once instead of waiting."""
    log = tmp_path / "kubelet.log"
    log.write_text('E1202 kubelet.go:1] "cgroup v1 detected" deprecated\n'
                   'E1202 server.go:2] "Failed to run kubelet" err="failed to run Kubelet: kubelet is configured '
                   'to not run on a host using cgroup v1. cgroup v1 support is unsupported"\n')
    kubelet = Process("kubelet", ["false"], log)
    kubelet.start()
    kubelet.popen.wait(timeout=10)
    node = Node.__new__(Node)
    node.kubelet = kubelet
    with pytest.raises(E2EError, match="refused to start on this machine's cgroup v1 hierarchy"):
        node._kubelet_refused_cgroups()
    # A kubelet that stopped for another reason is reported as such, not as cgroup trouble.
    log.write_text('E1202 kubelet.go:1] "cgroup v1 detected" deprecated\nexit for another reason\n')
    node._kubelet_refused_cgroups()
