"""An OCI registry on loopback for image-mode tests: ``crane registry serve`` (built by
scripts/build-crane) behind a small proxy that demands basic or bearer auth, counts the
bytes each push uploads and can refuse deletes."""

import base64
import http.client
import http.server
import json
import os
import secrets
import subprocess
import threading
import urllib.parse
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from helpers import REPO, free_port, wait_for_port


def crane_binary() -> str:
    return subprocess.run([str(REPO / "scripts" / "build-crane")], check=True, capture_output=True,
                          text=True, timeout=1800).stdout.strip()


class AuthRegistry:
    """``auth`` is "basic" (RFC 7617 against ``users``) or "bearer" (a token endpoint at
    /token that takes the same basic credentials and issues random tokens)."""

    def __init__(self, work: Path, users: Dict[str, str], auth: str = "basic", refuse_deletes: bool = False):
        self.crane_path = crane_binary()
        (work / "blobs").mkdir(exist_ok=True)
        self.backend_port = free_port()
        self.proc = subprocess.Popen(
            [self.crane_path, "registry", "serve", "--address", "127.0.0.1:%d" % self.backend_port,
             "--disk", str(work / "blobs")],
            stdout=open(work / "registry.log", "wb"), stderr=subprocess.STDOUT)
        wait_for_port("127.0.0.1", self.backend_port)
        self.users = dict(users)
        self.auth = auth
        # Like registries with deletion turned off: DELETE answers 405 UNSUPPORTED.
        self.refuse_deletes = refuse_deletes
        self.tokens: set = set()
        self.uploaded = 0  # body bytes of blob uploads accepted
        self.requests: List[Tuple[str, str, Optional[str]]] = []
        registry = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _user_ok(self, header: Optional[str]) -> bool:
                if not header or not header.startswith("Basic "):
                    return False
                try:
                    user, _, password = base64.b64decode(header[6:]).decode().partition(":")
                except (ValueError, UnicodeDecodeError):
                    return False
                return registry.users.get(user) == password

            def _reply(self, status: int, body: bytes = b"", headers: Optional[Dict[str, str]] = None):
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _authorized(self) -> bool:
                header = self.headers.get("Authorization")
                if registry.auth == "basic":
                    return self._user_ok(header)
                return bool(header and header.startswith("Bearer ") and header[7:] in registry.tokens)

            def _challenge(self) -> Dict[str, str]:
                if registry.auth == "basic":
                    return {"WWW-Authenticate": 'Basic realm="kaspr-test"'}
                return {"WWW-Authenticate": 'Bearer realm="http://127.0.0.1:%d/token",service="kaspr-test"'
                        % registry.port}

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                registry.requests.append((self.command, self.path.split("?")[0], self.headers.get("Authorization")))
                if self.path.startswith("/token"):
                    if not self._user_ok(self.headers.get("Authorization")):
                        return self._reply(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}')
                    token = secrets.token_hex(16)
                    registry.tokens.add(token)
                    return self._reply(200, json.dumps({"token": token}).encode(),
                                       {"Content-Type": "application/json"})
                if not self._authorized():
                    return self._reply(401, b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}',
                                       self._challenge())
                if self.command == "DELETE" and registry.refuse_deletes:
                    return self._reply(405, b'{"errors":[{"code":"UNSUPPORTED","message":"deletes are disabled"}]}')
                conn = http.client.HTTPConnection("127.0.0.1", registry.backend_port, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("authorization", "host")}
                    conn.request(self.command, self.path, body=body if body or length else None, headers=headers)
                    answer = conn.getresponse()
                    data = answer.read()
                finally:
                    conn.close()
                if self.command == "PUT" and "/blobs/uploads/" in self.path and answer.status == 201:
                    registry.uploaded += len(body)
                out = {k: v for k, v in answer.getheaders()
                       if k.lower() not in ("content-length", "transfer-encoding", "connection")}
                if "Location" in out:  # keep clients on the proxy
                    out["Location"] = out["Location"].replace("127.0.0.1:%d" % registry.backend_port,
                                                              "127.0.0.1:%d" % registry.port)
                self._reply(answer.status, data, out)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.host = "127.0.0.1:%d" % self.port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def docker_config(self, path: Path, user: str, password: str) -> Path:
        """A ``.dockerconfigjson`` as a Secret volume holds it."""
        auth = base64.b64encode(("%s:%s" % (user, password)).encode()).decode()
        path.write_text(json.dumps({"auths": {self.host: {"auth": auth}}}))
        return path

    def crane(self, docker_config_dir: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        env = {"PATH": os.environ.get("PATH", ""), "DOCKER_CONFIG": str(docker_config_dir),
               "HOME": str(docker_config_dir)}
        return subprocess.run([self.crane_path] + ["--insecure"] + list(args), env=env, capture_output=True,
                              timeout=timeout)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def image_line(stdout: str) -> dict:
    for line in stdout.splitlines():
        if line.startswith("kaspr-packages: IMAGE "):
            return json.loads(line[len("kaspr-packages: IMAGE "):])
    raise AssertionError("no IMAGE line in:\n" + stdout)


def layer_digests(image: dict) -> Dict[str, str]:
    return {title: digest for title, digest, _ in image["layers"]}


def quote(value: str) -> str:
    return urllib.parse.quote(value, safe="")
