"""Test helpers: wheels built on the fly, loopback package indexes, and running the installer.

Everything here talks to 127.0.0.0/8 only.
"""

import base64
import contextlib
import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from pathlib import Path
from typing import Dict, Iterable, List, Optional

REPO = Path(__file__).resolve().parents[2]
INSTALLER = REPO / "src" / "installer" / "installer.py"

EXIT = {
    "ok": 0, "package_not_found": 10, "authentication": 11, "network": 12, "timeout": 13,
    "integrity": 14, "disk_full": 15, "lock_timeout": 16, "cache_error": 17,
    "invalid_config": 18, "unknown": 19,
}


# ---------------------------------------------------------------------------------- wheels

def _record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def make_wheel(outdir: Path, name: str, version: str, requires: Iterable[str] = (),
               extras: Iterable[str] = (), module_text: Optional[str] = None) -> Path:
    """Write a minimal pure-Python wheel ``name==version`` whose module records its version."""
    dist = name.replace("-", "_")
    info = "%s-%s.dist-info" % (dist, version)
    module_text = module_text or 'VERSION = "%s"\n' % version
    metadata = "Metadata-Version: 2.1\nName: %s\nVersion: %s\n" % (name, version)
    metadata += "".join("Provides-Extra: %s\n" % e for e in extras)
    metadata += "".join("Requires-Dist: %s\n" % r for r in requires)
    files = {
        "%s/__init__.py" % dist: module_text.encode(),
        "%s/METADATA" % info: metadata.encode(),
        "%s/WHEEL" % info: b"Wheel-Version: 1.0\nGenerator: kaspr-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join("%s,%s,%d\n" % (p, _record_hash(d), len(d)) for p, d in files.items())
    record += "%s/RECORD,,\n" % info
    files["%s/RECORD" % info] = record.encode()
    path = Path(outdir) / ("%s-%s-py3-none-any.whl" % (dist, version))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for p, d in files.items():
            zf.writestr(p, d)
    return path


# ---------------------------------------------------------------------------------- network

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError("nothing listens on %s:%d after %.0fs" % (host, port, seconds))


class PypiServer:
    """pypiserver from the test venv, on 127.0.0.1, every action behind HTTP basic auth."""

    def __init__(self, packages: Path, htpasswd: Path, log: Path):
        self.port = free_port()
        bindir = Path(sys.executable).parent
        self.proc = subprocess.Popen(
            [str(bindir / "pypi-server"), "run", "-i", "127.0.0.1", "-p", str(self.port),
             "-a", "download,list,update", "-P", str(htpasswd), "--disable-fallback",
             "--backend", "simple-dir", str(packages)],
            stdout=open(log, "wb"), stderr=subprocess.STDOUT,
        )
        try:
            wait_for_port("127.0.0.1", self.port)
        except TimeoutError:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d/simple/" % self.port

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


class StaticIndex:
    """A PEP 503 index served from a dict of wheels, recording every request's headers.

    ``bad_hash`` lists projects whose links carry a wrong #sha256 fragment; ``token`` makes
    wheels also available under /t/<token>/<file> (and 404 under any other token).
    """

    def __init__(self, wheels: Dict[str, List[Path]], host: str = "127.0.0.2",
                 bad_hash: Iterable[str] = (), token: Optional[str] = None):
        self.wheels = wheels
        self.bad_hash = set(bad_hash)
        self.token = token
        self.requests: List[Dict[str, str]] = []
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                index.requests.append({"path": self.path, "authorization": self.headers.get("Authorization")})
                body, status, ctype = index.respond(self.path)
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.host, self.port = host, self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return "http://%s:%d/simple/" % (self.host, self.port)

    def file_url(self, path: Path, token: Optional[str] = None) -> str:
        prefix = "/t/%s" % token if token else "/files"
        return "http://%s:%d%s/%s" % (self.host, self.port, prefix, path.name)

    def respond(self, path: str):
        parts = [p for p in path.split("?")[0].split("/") if p]
        if len(parts) == 2 and parts[0] == "simple":
            project = parts[1]
            files = self.wheels.get(project)
            if not files:
                return b"not found", 404, "text/plain"
            links = []
            for f in files:
                digest = hashlib.sha256(f.read_bytes()).hexdigest()
                if project in self.bad_hash:
                    digest = "0" * 64
                links.append('<a href="/files/%s#sha256=%s">%s</a><br>' % (f.name, digest, f.name))
            return ("<html><body>%s</body></html>" % "".join(links)).encode(), 200, "text/html"
        if len(parts) == 2 and parts[0] == "files" or (len(parts) == 3 and parts[0] == "t" and parts[1] == self.token):
            for files in self.wheels.values():
                for f in files:
                    if f.name == parts[-1]:
                        return f.read_bytes(), 200, "application/octet-stream"
        return b"not found", 404, "text/plain"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class BlackHole:
    """Accepts TCP connections (the kernel completes the handshake) and never answers."""

    def __init__(self, host: str = "127.0.0.1"):
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = "http://%s:%d/simple/" % (host, self.port)

    def stop(self) -> None:
        self.sock.close()


def closed_port_url() -> str:
    """An index URL on 127.0.0.1 where nothing listens (connection refused)."""
    return "http://127.0.0.1:%d/simple/" % free_port()


# ---------------------------------------------------------------------------------- installer

class Run:
    def __init__(self, returncode: int, stdout: str, termination: str, duration: float):
        self.returncode = returncode
        self.stdout = stdout
        self.termination = termination
        self.duration = duration

    def lines(self, needle: str) -> List[str]:
        return [line for line in self.stdout.splitlines() if needle in line]

    def __repr__(self):
        return "Run(rc=%d)\n--- stdout ---\n%s\n--- termination ---\n%s" % (
            self.returncode, self.stdout, self.termination)


def base_env(home: Path) -> Dict[str, str]:
    """A clean environment for the installer: no user pip config, no real network index.

    PIP_INDEX_URL points at a closed loopback port so a config without indexUrl can never
    reach a public index. pip's own retries are off to keep failure tests fast.
    """
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PIP_CONFIG_FILE": "/dev/null",
        "PIP_INDEX_URL": closed_port_url(),
        "PIP_RETRIES": "0",
        "PIP_TIMEOUT": "5",
        "KASPR_PACKAGES_BACKOFF_BASE": "0.05",
        "HOSTNAME": "test-pod-0",
    }


def config(target: Path, index_url: Optional[str], packages: List[str], **extra) -> dict:
    cfg = {
        "version": 1, "mode": "emptyDir", "app": "my-app", "namespace": "default",
        "installKey": "0123456789abcdef", "packages": packages,
        "retries": 0, "timeoutSeconds": 60, "onFailure": "block", "target": str(target),
    }
    if index_url:
        cfg["indexUrl"] = index_url
    cfg.update(extra)
    return cfg


class User:
    """Who a process runs as, the way a container does: uid, primary gid, supplementary groups
    (fsGroup, supplementalGroups), and never any capability, even as uid 0 (the injected init
    container drops them all)."""

    def __init__(self, uid: int, gid: int, groups: Iterable[int] = ()):
        self.uid, self.gid, self.groups = uid, gid, list(groups)

    def argv(self) -> List[str]:
        groups = ["--groups", ",".join(map(str, self.groups))] if self.groups else ["--clear-groups"]
        return (["setpriv", "--reuid", str(self.uid), "--regid", str(self.gid)] + groups
                + ["--inh-caps=-all", "--bounding-set=-all", "--"])

    def __repr__(self):
        return "User(uid=%d, gid=%d, groups=%s)" % (self.uid, self.gid, self.groups)


def dash_c_program() -> str:
    """The program as ``python3 -c`` takes it in pods: compressed into a one-line loader, as
    the webhook ships it (the source itself is longer than one argument may be, 128 KiB)."""
    packed = base64.b64encode(zlib.compress(INSTALLER.read_bytes(), 9)).decode()
    return "import base64,zlib;exec(compile(zlib.decompress(base64.b64decode('%s')),'kaspr-packages-installer','exec'))" % packed


def start_installer(python: str, cfg, env: Dict[str, str], termination: Path,
                    use_dash_c: bool = False, user: Optional[User] = None) -> subprocess.Popen:
    env = dict(env)
    env["KASPR_PACKAGES_CONFIG"] = cfg if isinstance(cfg, str) else json.dumps(cfg)
    env["KASPR_PACKAGES_TERMINATION_LOG"] = str(termination)
    argv = [python, "-c", dash_c_program()] if use_dash_c or user else [python, str(INSTALLER)]
    if user is not None:
        argv = user.argv() + argv
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def run_installer(python: str, cfg, env: Dict[str, str], termination: Path,
                  timeout: float = 180, use_dash_c: bool = False, user: Optional[User] = None) -> Run:
    started = time.monotonic()
    proc = start_installer(python, cfg, env, termination, use_dash_c, user)
    out, _ = proc.communicate(timeout=timeout)
    term = termination.read_text() if termination.exists() else ""
    return Run(proc.returncode, out.decode("utf-8", "replace"), term, time.monotonic() - started)


def import_from_site(python: str, target: Path, code: str) -> str:
    """Run ``code`` with ``<target>/site`` first on PYTHONPATH, as the main container does."""
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(target / "site"), "PYTHONNOUSERSITE": "1"}
    out = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def all_files_text(root: Path) -> bytes:
    """Every regular file's bytes under ``root`` (symlinks not followed), concatenated."""
    chunks = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                with open(path, "rb") as handle:
                    chunks.append(handle.read())
    return b"\n".join(chunks)


def process_cmdlines() -> List[str]:
    """The argv of every process visible in /proc, NUL separators turned into spaces."""
    result = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as handle:
                result.append(handle.read().replace(b"\0", b" ").decode("utf-8", "replace"))
        except OSError:
            continue
    return result
