"""The OCI registry of image mode inside the test's network namespace: `crane registry serve`
(go-containerregistry, built by scripts/build-crane) on the node address, plain HTTP, storing
blobs on disk so it can be stopped and started again with its content. Build Jobs push set
images to it; the node's containerd pulls them (see `e2e_node.REGISTRY_HOST`)."""

from __future__ import annotations

import json
import subprocess
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


def start_registry(cluster: ControlPlane, repo: Path, workdir: Path) -> Registry:
    registry = Registry(cluster, crane_binary(repo), workdir)
    registry.start()
    return registry
