"""The harness itself: a real control plane, sealed in its network namespace."""

from __future__ import annotations

import json

from e2e_cluster import ControlPlane
from e2e_objects import plain_statefulset


def test_versions_are_the_pinned_releases(cluster: ControlPlane):
    server = json.loads(cluster.kubectl(["get", "--raw", "/version"]).stdout)
    assert server["gitVersion"].startswith("v1.34."), server
    client = json.loads(cluster.kubectl(["version", "--client", "-o", "json"]).stdout)["clientVersion"]
    assert client["gitVersion"] == server["gitVersion"], (client, server)
    helm = cluster.netns.run([str(cluster.tools.path("helm")), "version", "--short"]).stdout
    assert helm.startswith("v3."), helm
    etcd = cluster.netns.run([str(cluster.tools.path("etcd")), "--version"]).stdout
    assert "etcd Version: 3.6." in etcd, etcd


def test_namespace_has_only_loopback(cluster: ControlPlane):
    links = cluster.netns.run(["ip", "-o", "link", "show"]).stdout.strip().splitlines()
    assert len(links) == 1 and ": lo:" in links[0], links
    # No route leaves the namespace: the kernel refuses before any packet exists.
    outside = cluster.netns.run(["ip", "route", "get", "192.0.2.1"], check=False)
    assert outside.returncode != 0 and "unreachable" in outside.stderr.lower(), outside
    # The service range is local, so the `kubernetes` Service IP lands on loopback.
    local = cluster.netns.run(["ip", "route", "get", "10.96.0.1"]).stdout
    assert local.startswith("local 10.96.0.1 dev lo"), local
    svc = cluster.get_json("service", "kubernetes", namespace="default")
    assert svc["spec"]["clusterIP"] == "10.96.0.1"


def test_statefulset_controller_creates_pending_pods(cluster: ControlPlane, namespace: str):
    cluster.create(plain_statefulset("plain", replicas=2), namespace=namespace)
    pods = cluster.wait_pods(namespace, "app=plain", 2)
    assert [p["metadata"]["name"] for p in pods] == ["plain-0", "plain-1"]
    for pod in pods:
        # No scheduler or kubelet: pods stay Pending and the pod runner plays the kubelet.
        assert pod["status"]["phase"] == "Pending"
        owner = pod["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"]) == ("StatefulSet", "plain")
