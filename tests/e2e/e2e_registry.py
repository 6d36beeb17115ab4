"""The OCI registry of image mode inside the test's network namespace: `crane registry serve`
(go-containerregistry, built by scripts/build-crane) on the node address, plain HTTP, storing
blobs on disk so it can be stopped and started again with its content. Build Jobs push set
images to it; the node's containerd pulls them (see `e2e_node.REGISTRY_HOST`)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from e2e_cluster import ControlPlane, Process, tail, wait_for
from e2e_node import REGISTRY_HOST


def crane_binary(repo: Path) -> Path:
    proc = subprocess.run([str(repo / "scripts" / "build-crane")], capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/build-crane failed:\n{proc.stderr[-4000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


@dataclass
class Registry:
    cluster: ControlPlane
    crane: Path
    workdir: Path
    host: str = REGISTRY_HOST
    process: Process | None = None

    def start(self) -> None:
        """Serve (no-op when running); the content on disk survives a stop."""
        if self.process is not None and self.process.alive():
            return
        (self.workdir / "blobs").mkdir(parents=True, exist_ok=True)
        self.process = self.cluster.spawn("registry", [
            str(self.crane), "registry", "serve", "--address", self.host, "--disk", str(self.workdir / "blobs"),
        ])

        def up() -> bool:
            self.process.ensure_alive()
            status, _ = self.cluster.http_get(f"http://{self.host}/v2/", timeout=3)
            return status == 200

        wait_for("the image registry", up, timeout=60, on_timeout=lambda: tail(self.process.log_path))

    def stop(self) -> None:
        self.cluster.stop_process(self.process)
        self.process = None

    def tags(self, repository: str) -> list[str]:
        """The repository's tags, asked from inside the namespace."""
        status, body = self.cluster.http_get(f"http://{self.host}/v2/{repository}/tags/list", timeout=5)
        if status == 404:
            return []
        assert status == 200, (status, body)
        return sorted(json.loads(body).get("tags") or [])

    def manifest(self, repository: str, digest: str) -> dict:
        """The image manifest stored under `digest`."""
        status, body = self.cluster.http_get(f"http://{self.host}/v2/{repository}/manifests/{digest}", timeout=5)
        assert status == 200, (status, body)
        return json.loads(body)

    def chain_ids(self, repository: str, digest: str) -> list[str]:
        """The snapshot names a runtime unpacks the image under `digest` to: the OCI chain ids of
        its config's `rootfs.diff_ids`, bottom layer first."""
        config = self.manifest(repository, digest)["config"]["digest"]
        status, body = self.cluster.http_get(f"http://{self.host}/v2/{repository}/blobs/{config}", timeout=5)
        assert status == 200, (status, body)
        chain: list[str] = []
        for diff_id in json.loads(body)["rootfs"]["diff_ids"]:
            step = diff_id if not chain else "sha256:" + hashlib.sha256(f"{chain[-1]} {diff_id}".encode()).hexdigest()
            chain.append(step)
        return chain

    def delete_manifest(self, repository: str, digest: str) -> None:
        """Delete the manifest stored under `digest` (its tag and blobs stay), asked from inside
        the namespace: pulls by that digest then get the registry's 404."""
        url = f"http://{self.host}/v2/{repository}/manifests/{digest}"
        script = ("import sys, urllib.request\n"
                  "r = urllib.request.urlopen(urllib.request.Request(sys.argv[1], method='DELETE'), timeout=5)\n"
                  "print(r.status)\n")
        proc = self.cluster.netns.run([sys.executable, "-c", script, url], check=False, timeout=20)
        assert proc.returncode == 0 and proc.stdout.strip() == "202", (proc.stdout, proc.stderr)

    def log_offset(self) -> int:
        """Where the serving process's request log ends now (see `blob_gets`)."""
        return self.process.log_path.stat().st_size

    def blob_gets(self, repository: str, offset: int) -> list[str]:
        """Digests of the blobs of `repository` fetched (`GET`) since `offset` of the request log,
        one entry per request (crane's registry logs every request as `METHOD URL`)."""
        with open(self.process.log_path, "rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
        marker = f"GET /v2/{repository}/blobs/"
        return [line.split(marker, 1)[1].split()[0].split("?")[0] for line in text.splitlines() if marker in line]


def start_registry(cluster: ControlPlane, repo: Path, workdir: Path) -> Registry:
    registry = Registry(cluster, crane_binary(repo), workdir)
    registry.start()
    return registry
