"""A private Python package index on the node address inside the test's network namespace,
where pods and the namespace's host side reach it.

pypiserver (from the test virtualenv) with HTTP basic auth from an htpasswd file, serving
wheels the tests build here; it never falls back to a public index.
"""

from __future__ import annotations

import base64
import hashlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

from e2e_cluster import NODE_IP, ControlPlane, Process, tail, wait_for

INDEX_PORT = 8765
INDEX_USER = "kaspr-reader"
# Characters that break naive URL or shell handling, on purpose.
INDEX_PASSWORD = "s3cr:t@/#?% &;$x"


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def build_wheel(directory: Path, name: str, version: str, module_source: str | None = None) -> Path:
    """A minimal pure-Python wheel exposing `<name>.__version__`."""
    dist = name.replace("-", "_")
    source = module_source or f'__version__ = "{version}"\n'
    files = {
        f"{dist}/__init__.py": source.encode(),
        f"{dist}-{version}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nSummary: e2e test package\n"
        ).encode(),
        f"{dist}-{version}.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: kaspr-e2e\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ).encode(),
    }
    record_name = f"{dist}-{version}.dist-info/RECORD"
    record = "".join(f"{path},{_record_hash(data)},{len(data)}\n" for path, data in files.items())
    record += f"{record_name},,\n"
    files[record_name] = record.encode()
    path = directory / f"{dist}-{version}-py3-none-any.whl"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for arcname, data in files.items():
            info = zipfile.ZipInfo(arcname, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    path.write_bytes(buf.getvalue())
    return path


@dataclass
class PackageIndex:
    url: str  # the simple index, e.g. http://10.244.0.1:8765/simple/
    host: str  # host:port
    username: str
    password: str
    process: Process


def start_index(cluster: ControlPlane, venv: Path, workdir: Path, port: int = INDEX_PORT,
                name: str = "pypiserver") -> PackageIndex:
    from passlib.apache import HtpasswdFile  # from the test virtualenv

    packages = workdir / "packages"
    packages.mkdir(parents=True, exist_ok=True)
    build_wheel(packages, "kasprdemo", "1.0")
    build_wheel(packages, "kasprdemo", "2.0")
    htpasswd = HtpasswdFile(str(workdir / "htpasswd"), new=True, default_scheme="apr_md5_crypt")
    htpasswd.set_password(INDEX_USER, INDEX_PASSWORD)
    htpasswd.save()
    proc = cluster.spawn(name, [
        str(venv / "bin" / "pypi-server"), "run",
        "--host", NODE_IP, "--port", str(port),
        "--passwords", str(workdir / "htpasswd"),
        "--authenticate", "download,list,update",
        "--disable-fallback",
        str(packages),
    ])
    host = f"{NODE_IP}:{port}"
    url = f"http://{host}/simple/"

    def up() -> bool:
        proc.ensure_alive()
        status, _ = cluster.http_get(url, timeout=3)
        return status == 401  # alive, and refusing anonymous reads

    wait_for("the package index", up, timeout=60, on_timeout=lambda: tail(proc.log_path))
    return PackageIndex(url=url, host=host, username=INDEX_USER, password=INDEX_PASSWORD, process=proc)
