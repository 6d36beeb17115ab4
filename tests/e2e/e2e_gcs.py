"""A Google Cloud Storage stand-in inside the test's network namespace: fake-gcs-server (built
by scripts/build-fake-gcs from the Go module proxy) and a token endpoint that verifies the
service-account JWT (token_endpoint.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from e2e_cluster import NODE_IP, ControlPlane, E2EError, Process, run, tail, wait_for

GCS_PORT = 4443
TOKEN_PORT = 4444
CLIENT_EMAIL = "kaspr-cache@e2e-project.iam.gserviceaccount.com"
REPO = Path(__file__).resolve().parents[2]


@dataclass
class GcsStandIn:
    url: str  # for STORAGE_EMULATOR_HOST
    token_uri: str
    key_json: str  # a service-account key file's content, pointing at token_uri
    results: Path  # one JSON line per token exchange
    cluster: ControlPlane
    processes: list[Process]

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        script = (
            "import json, sys, urllib.request\n"
            "data = sys.argv[3].encode() if sys.argv[3] else None\n"
            "req = urllib.request.Request(sys.argv[2], data=data, method=sys.argv[1],"
            " headers={'Content-Type': 'application/json'})\n"
            "print(urllib.request.urlopen(req, timeout=10).read().decode() or '{}')\n"
        )
        out = self.cluster.netns.run([sys.executable, "-c", script, method, self.url + path,
                                      json.dumps(body) if body is not None else ""]).stdout
        return json.loads(out)

    def create_bucket(self, name: str) -> None:
        self._call("POST", "/storage/v1/b", {"name": name})

    def objects(self, bucket: str) -> list[str]:
        return [item["name"] for item in self._call("GET", f"/storage/v1/b/{bucket}/o").get("items", [])]

    def exchanges(self) -> list[dict]:
        if not self.results.exists():
            return []
        return [json.loads(line) for line in self.results.read_text().splitlines() if line.strip()]


def start_gcs(cluster: ControlPlane, workdir: Path) -> GcsStandIn:
    workdir.mkdir(parents=True, exist_ok=True)
    build = subprocess.run([str(REPO / "scripts" / "build-fake-gcs")], capture_output=True, text=True, timeout=3600)
    if build.returncode != 0:
        raise E2EError(f"scripts/build-fake-gcs failed:\n{build.stderr[-3000:]}")
    binary = build.stdout.strip().splitlines()[-1]
    # On the node address: pods reach it there, and so does the namespace's host side.
    url = f"http://{NODE_IP}:{GCS_PORT}"
    gcs = cluster.spawn("fake-gcs-server", [
        binary, "-scheme", "http", "-host", NODE_IP, "-port", str(GCS_PORT),
        "-backend", "memory", "-public-host", f"{NODE_IP}:{GCS_PORT}", "-log-level", "warn",
    ])

    private = workdir / "sa-private.pem"
    public = workdir / "sa-public.pem"
    run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(private)])
    run(["openssl", "pkey", "-in", str(private), "-pubout", "-out", str(public)])
    token_uri = f"http://{NODE_IP}:{TOKEN_PORT}/token"
    key_json = json.dumps({
        "type": "service_account", "project_id": "e2e-project", "private_key_id": "e2e",
        "private_key": private.read_text(), "client_email": CLIENT_EMAIL, "token_uri": token_uri,
    })
    private.unlink()  # only the Secret holds the private half from here on
    results = workdir / "token-exchanges.jsonl"
    token = cluster.spawn("token-endpoint", [
        sys.executable, str(Path(__file__).with_name("token_endpoint.py")),
        NODE_IP, str(TOKEN_PORT), str(public), CLIENT_EMAIL, str(results),
    ])
    stand_in = GcsStandIn(url, token_uri, key_json, results, cluster, [gcs, token])

    def up() -> bool:
        gcs.ensure_alive()
        token.ensure_alive()
        status, _ = cluster.http_get(f"{url}/storage/v1/b", timeout=3)
        # The token endpoint answers GET with 501 (it only takes POST): alive.
        token_status, _ = cluster.http_get(token_uri, timeout=3)
        return status == 200 and token_status == 501

    wait_for("fake-gcs-server and the token endpoint", up, timeout=60,
             on_timeout=lambda: tail(gcs.log_path) + "\n" + tail(token.log_path))
    return stand_in
