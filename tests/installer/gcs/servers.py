"""fake-gcs-server, an OAuth token endpoint that verifies RS256 JWTs, a metadata server."""

import importlib.util
import http.server
import json
import os
import subprocess
import threading
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional

from helpers import REPO, free_port, wait_for_port

# The JWT bearer verifier of tests/e2e/token_endpoint.py (a standalone script there).
_spec = importlib.util.spec_from_file_location("kaspr_token_endpoint", REPO / "tests" / "e2e" / "token_endpoint.py")
_JWT = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_JWT)

class FakeGcs:
    """fake-gcs-server (built by scripts/build-fake-gcs) on 127.0.0.1, in-memory backend."""

    def __init__(self, log: Path):
        binary = subprocess.run([str(REPO / "scripts" / "build-fake-gcs")], check=True,
                                capture_output=True, text=True, timeout=1800).stdout.strip()
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.proc = subprocess.Popen(
            [binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
             "-backend", "memory", "-public-host", "127.0.0.1:%d" % self.port, "-log-level", "warn"],
            stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        wait_for_port("127.0.0.1", self.port)

    def create_bucket(self, name: str) -> None:
        self._call("POST", "/storage/v1/b", json.dumps({"name": name}).encode(), {"Content-Type": "application/json"})

    def put(self, bucket: str, name: str, data: bytes) -> None:
        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        self._call("POST", "/upload/storage/v1/b/%s/o?%s" % (bucket, query), data)

    def get(self, bucket: str, name: str) -> Optional[bytes]:
        try:
            return self._call("GET", "/storage/v1/b/%s/o/%s?alt=media" % (bucket, urllib.parse.quote(name, safe="")))
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def list(self, bucket: str) -> List[str]:
        data = json.loads(self._call("GET", "/storage/v1/b/%s/o" % bucket))
        return [item["name"] for item in data.get("items", [])]

    def _call(self, method, path, body=None, headers=None) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.read()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


class _Server:
    """A ThreadingHTTPServer on loopback whose handler calls ``self.handle``."""

    def __init__(self, host: str = "127.0.0.1"):
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                owner._dispatch(self, b"")

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                owner._dispatch(self, self.rfile.read(length))

        self.server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.port = self.server.server_address[1]
        self.url = "http://%s:%d" % (host, self.port)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _dispatch(self, handler, body):
        status, payload = self.handle(handler.command, handler.path, dict(handler.headers), body)
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


class TokenEndpoint(_Server):
    """OAuth token endpoint: verifies the RS256 JWT with the public key (openssl) and its claims."""

    TOKEN = "ya29.test-access-token-0123456789"

    def __init__(self, public_key: Path, client_email: str):
        self.public_key = public_key
        self.client_email = client_email
        self.results: List[Dict] = []
        super().__init__()

    @property
    def token_uri(self) -> str:
        return self.url + "/token"

    def handle(self, method, path, headers, body):
        form = urllib.parse.parse_qs(body.decode())
        problems = self.check(form)
        self.results.append({"problems": problems})
        if problems:
            return 400, {"error": "invalid_grant", "error_description": "; ".join(problems)}
        return 200, {"access_token": self.TOKEN, "expires_in": 3600, "token_type": "Bearer"}

    def check(self, form) -> List[str]:
        # The same verifier as the end-to-end tests' token endpoint: one implementation.
        return _JWT.verify(form, str(self.public_key), self.client_email, self.token_uri)


class MetadataServer(_Server):
    """The GKE metadata server's token path, answering only with Metadata-Flavor: Google."""

    TOKEN = "ya29.workload-identity-token-abcdef"

    def __init__(self):
        self.requests: List[Dict] = []
        super().__init__()

    def handle(self, method, path, headers, body):
        self.requests.append({"path": path, "flavor": headers.get("Metadata-Flavor")})
        if path != "/computeMetadata/v1/instance/service-accounts/default/token":
            return 404, {"error": "not found"}
        if headers.get("Metadata-Flavor") != "Google":
            return 403, {"error": "missing Metadata-Flavor"}
        return 200, {"access_token": self.TOKEN, "expires_in": 3599, "token_type": "Bearer"}


class FixedStatus(_Server):
    """Answers every request with one HTTP status (a GCS endpoint that denies or fails)."""

    def __init__(self, status: int):
        self.status = status
        self.requests: List[str] = []
        super().__init__()

    def handle(self, method, path, headers, body):
        self.requests.append("%s %s" % (method, path))
        return self.status, {"error": {"code": self.status, "message": "stand-in"}}


def make_keypair(directory: Path):
    """An RSA key pair from openssl: (private key PEM text, path of the public key)."""
    key = directory / "private.pem"
    pub = directory / "public.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(key)],
                   check=True, capture_output=True, timeout=60)
    subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout", "-out", str(pub)],
                   check=True, capture_output=True, timeout=60)
    private = key.read_text()
    key.unlink()  # from here on only the key file holds the private half
    return private, pub


def write_key_file(directory: Path, private_pem: str, token_uri: str, email: str) -> Path:
    """A service-account key JSON as Google issues it (the fields the installer reads)."""
    sa = directory / "sa.json"
    sa.write_text(json.dumps({
        "type": "service_account", "project_id": "test-project", "client_email": email,
        "private_key_id": "0123", "private_key": private_pem, "token_uri": token_uri,
    }))
    return sa
