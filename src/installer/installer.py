"""kaspr-packages installer: installs a Kaspr app's extra Python packages in its init container.

The webhook embeds this program and runs it as ``python3 -c <program>`` in an init container
that uses the app's own image, so the packages are installed with the image's Python and pip
for exactly the ABI the app will run with. It uses the standard library only (Python >= 3.9).

Input
    ``KASPR_PACKAGES_CONFIG``   one JSON object (see ``load_config``)
    ``KASPR_PYPI_USERNAME``     index credentials, read only when the config says
    ``KASPR_PYPI_PASSWORD``     ``"credentials": true``
    ``KASPR_PACKAGES_TERMINATION_LOG``  path for the one-line summary (default
                                ``/dev/termination-log``)

Output
    Line-oriented logs on stdout, one summary line in the termination log, and after success
    ``<target>/site``: a symlink to the directory that holds the installed packages; with a
    ``PACKAGES_HASH`` in the environment (a taken-over Kaspr operator), also the operator's
    status marker ``<target>/.installed-<hash>``.

Modes
    emptyDir  install into the pod's own volume on every start.
    pvc       share immutable builds between pods through a ReadWriteMany volume.
    gcs       keep a tar.gz of each build in a Google Cloud Storage bucket.
    With ``build`` in the config (a build Job) the installer resolves, writes a PEP 751 lock,
    installs from it and publishes the set; with ``restore`` (the app's pods) it restores a
    built set, or installs exactly the locked set with hash checking.

Exit codes are fixed (see ``EXIT_CODES``); with ``onFailure: allow`` a failure exits 0 and
the app starts without its packages.
"""

import base64
import errno
import fcntl
import hashlib
import io
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from typing import Dict, List, Optional, Tuple

PREFIX = "kaspr-packages:"

EXIT_CODES = {
    "package_not_found": 10,
    "authentication": 11,
    "network": 12,
    "timeout": 13,
    "integrity": 14,
    "disk_full": 15,
    "lock_timeout": 16,
    "cache_error": 17,
    "invalid_config": 18,
    "unknown": 19,
}

DEFAULT_TERMINATION_LOG = "/dev/termination-log"
BACKOFF_BASE_SECONDS = 2.0
BACKOFF_CAP_SECONDS = 30.0
# pip >= 22.2 can resolve without installing (--dry-run --report); older pips fall back to a
# plain install that cannot tell which dependencies the image already provides.
MIN_PIP_FOR_RESOLVE = (22, 2)
BUILD_MARKER = ".kaspr-build.json"
# Environment of the pip child: variables that would move or reshape the install are dropped,
# so the image's pip configuration cannot turn --target into a --user or --prefix install.
PIP_ENV_DROPPED = (
    "PIP_TARGET", "PIP_USER", "PIP_PREFIX", "PIP_ROOT", "PIP_REQUIRE_VIRTUALENV",
    "PIP_NO_DEPS", "PIP_DRY_RUN", "PIP_REPORT", "PIP_UPGRADE", "PIP_IGNORE_INSTALLED",
    "PIP_NO_INDEX", "PIP_NO_BUILD_ISOLATION", "PIP_REQUIREMENT", "PIP_CONSTRAINT",
    "PIP_BREAK_SYSTEM_PACKAGES", "PIP_EDITABLE", "PIP_SRC",
    # The run's own temporary cache lets the install step reuse what the resolve step fetched.
    "PIP_NO_CACHE_DIR", "PIP_CACHE_DIR",
    "KASPR_PYPI_USERNAME", "KASPR_PYPI_PASSWORD", "KASPR_PACKAGES_CONFIG",
)


class InstallError(Exception):
    """A failure with one of the fixed categories and a one-line, secret-free message."""

    def __init__(self, category: str, message: str, retryable: bool = True):
        super().__init__(message)
        assert category in EXIT_CODES, category
        self.category = category
        self.message = message
        self.retryable = retryable


def log(message: str) -> None:
    """Print one log line; stdout is the container log."""
    print("%s %s" % (PREFIX, message), flush=True)


def one_line(text: str, limit: int = 600) -> str:
    """Collapse whitespace so a message fits the one-line log and termination-log format."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

class Config:
    """The validated content of ``KASPR_PACKAGES_CONFIG``."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


INSTALL_KEY_RE = re.compile(r"^[0-9a-f]{16}$")
NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")
VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# This program's own variables: never expanded into a requirement, whatever the config says.
RESERVED_ENV = ("KASPR_PACKAGES_CONFIG", "KASPR_PYPI_USERNAME", "KASPR_PYPI_PASSWORD",
                "KASPR_PACKAGES_POD_UID")


def _fail_config(field: str, problem: str) -> InstallError:
    return InstallError("invalid_config", "%s: %s" % (field, problem), retryable=False)


def _show(value) -> str:
    """A short JSON rendering of a bad config value for error messages."""
    text = json.dumps(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _require(obj: dict, key: str, kind, field: Optional[str] = None):
    field = field or key
    if key not in obj:
        raise _fail_config(field, "is required")
    return _typed(obj[key], kind, field)


def _typed(value, kind, field: str):
    # bool is a subclass of int; a JSON true is never a valid number here.
    if isinstance(value, bool) and kind is not bool:
        raise _fail_config(field, "expected %s, got %s" % (_kind_name(kind), _show(value)))
    if not isinstance(value, kind):
        raise _fail_config(field, "expected %s, got %s" % (_kind_name(kind), _show(value)))
    return value


def _kind_name(kind) -> str:
    names = {str: "a string", bool: "a boolean", list: "a list", dict: "an object", int: "an integer"}
    if isinstance(kind, tuple):
        return "a number"
    return names.get(kind, str(kind))


def _check_index_url(url, field: str) -> str:
    _typed(url, str, field)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _fail_config(field, "%s is not an http:// or https:// URL with a host" % _show(url))
    if any(ch.isspace() for ch in url):
        raise _fail_config(field, "%s contains whitespace" % _show(url))
    return url


def _check_package(pkg, field: str) -> str:
    _typed(pkg, str, field)
    text = pkg.strip()
    if not text:
        raise _fail_config(field, "is empty")
    if len(text) > 1000:
        raise _fail_config(field, "is longer than 1000 characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise _fail_config(field, "%s contains control characters" % _show(text))
    # Requirements reach pip through a requirements file, where a leading "-" is an option and
    # " #" starts a comment; neither may come from a package string.
    if text.startswith("-") or re.search(r"\s-", text) or re.search(r"\s#", text):
        raise _fail_config(field, "%s is not a requirement (options are not accepted)" % _show(text))
    if "\\" in text:
        raise _fail_config(field, "%s contains '\\', which joins lines in a requirements file" % _show(text))
    return text


def load_config(environ: Dict[str, str]) -> Config:
    """Parse and validate ``KASPR_PACKAGES_CONFIG``; unknown keys are ignored."""
    raw = environ.get("KASPR_PACKAGES_CONFIG")
    if raw is None or not raw.strip():
        raise InstallError("invalid_config", "KASPR_PACKAGES_CONFIG is not set", retryable=False)
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise InstallError(
            "invalid_config", "KASPR_PACKAGES_CONFIG is not valid JSON: %s" % exc, retryable=False
        )
    if not isinstance(data, dict):
        raise InstallError(
            "invalid_config", "KASPR_PACKAGES_CONFIG must be a JSON object", retryable=False
        )

    version = _require(data, "version", int)
    if version != 1:
        raise _fail_config("version", "unsupported value %s (this installer reads version 1)" % _show(version))
    mode = _require(data, "mode", str)
    if mode not in ("emptyDir", "pvc", "gcs"):
        raise _fail_config("mode", "%s is not one of emptyDir, pvc, gcs" % _show(mode))
    app = _require(data, "app", str)
    namespace = _require(data, "namespace", str)
    for field, value in (("app", app), ("namespace", namespace)):
        if not NAME_RE.match(value):
            raise _fail_config(field, "%s is not a valid Kubernetes name" % _show(value))
    install_key = _require(data, "installKey", str)
    if not INSTALL_KEY_RE.match(install_key):
        raise _fail_config("installKey", "%s is not 16 lowercase hex characters" % _show(install_key))

    packages = _require(data, "packages", list)
    if not 1 <= len(packages) <= 200:
        raise _fail_config("packages", "must list 1 to 200 entries, got %d" % len(packages))
    packages = [_check_package(p, "packages[%d]" % i) for i, p in enumerate(packages)]

    index_url = data.get("indexUrl")
    if index_url is not None:
        index_url = _check_index_url(index_url, "indexUrl")
    extra = _typed(data.get("extraIndexUrls") or [], list, "extraIndexUrls")
    extra = [_check_index_url(u, "extraIndexUrls[%d]" % i) for i, u in enumerate(extra)]
    trusted = _typed(data.get("trustedHosts") or [], list, "trustedHosts")
    for i, host in enumerate(trusted):
        _typed(host, str, "trustedHosts[%d]" % i)
        if not host or any(ch.isspace() for ch in host) or "/" in host:
            raise _fail_config("trustedHosts[%d]" % i, "%s is not a host or host:port" % _show(host))
    credentials = _typed(data.get("credentials", False), bool, "credentials")
    expand_env = _typed(data.get("expandEnv") or [], list, "expandEnv")
    for i, name in enumerate(expand_env):
        _typed(name, str, "expandEnv[%d]" % i)

    retries = _typed(data.get("retries", 3), int, "retries")
    if not 0 <= retries <= 20:
        raise _fail_config("retries", "%s is not in 0..20" % _show(retries))
    timeout = _typed(data.get("timeoutSeconds", 600), (int, float), "timeoutSeconds")
    if not 0 < timeout <= 86400:
        raise _fail_config("timeoutSeconds", "%s is not in (0, 86400]" % _show(timeout))
    on_failure = _typed(data.get("onFailure", "block"), str, "onFailure")
    if on_failure not in ("block", "allow"):
        raise _fail_config("onFailure", "%s is not block or allow" % _show(on_failure))

    target = _require(data, "target", str)
    if not os.path.isabs(target):
        raise _fail_config("target", "%s is not an absolute path" % _show(target))

    cache_dir = None
    gcs = None
    if mode == "pvc":
        cache_dir = _require(data, "cacheDir", str)
        if not os.path.isabs(cache_dir):
            raise _fail_config("cacheDir", "%s is not an absolute path" % _show(cache_dir))
    if mode == "gcs":
        gcs = _load_gcs(_require(data, "gcs", dict))

    install_tool = _typed(data.get("installTool", "pip"), str, "installTool")
    if install_tool not in ("auto", "pip", "uv"):
        raise _fail_config("installTool", "%s is not one of auto, pip, uv" % _show(install_tool))

    build, restore = load_set_mode(data)
    return Config(install_tool=install_tool,
        build=build, restore=restore,
        mode=mode, app=app, namespace=namespace, install_key=install_key, packages=packages,
        index_url=index_url, extra_index_urls=extra, trusted_hosts=trusted,
        credentials=credentials, retries=retries, timeout=float(timeout), on_failure=on_failure,
        target=target, cache_dir=cache_dir, gcs=gcs, expand_env=expand_env,
    )


def _load_gcs(obj: dict) -> Config:
    bucket = _require(obj, "bucket", str, "gcs.bucket")
    if not re.match(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$", bucket):
        raise _fail_config("gcs.bucket", "%s is not a valid bucket name" % _show(bucket))
    prefix = _typed(obj.get("prefix", "kaspr-packages/"), str, "gcs.prefix")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    max_size = _typed(obj.get("maxArchiveSize", 1 << 30), int, "gcs.maxArchiveSize")
    if max_size < 0:
        raise _fail_config("gcs.maxArchiveSize", "%s is negative" % _show(max_size))
    key_file = obj.get("keyFile")
    if key_file is not None:
        _typed(key_file, str, "gcs.keyFile")
    return Config(bucket=bucket, prefix=prefix, max_archive_size=max_size, key_file=key_file)


def early_on_failure(environ: Dict[str, str]) -> str:
    """Best-effort onFailure for a config that failed validation elsewhere."""
    try:
        value = json.loads(environ.get("KASPR_PACKAGES_CONFIG") or "{}").get("onFailure")
    except (ValueError, AttributeError):
        return "block"
    return "allow" if value == "allow" else "block"


# --------------------------------------------------------------------------------------------
# Secrets: expansion of ${VAR}, credentials, redaction
# --------------------------------------------------------------------------------------------

class Redactor:
    """Replaces every known secret (raw and percent-encoded) in text with ``***``."""

    def __init__(self):
        self._needles: List[str] = []

    def add(self, secret: Optional[str]) -> None:
        if not secret:
            return
        forms = {
            secret,
            urllib.parse.quote(secret, safe=""),
            urllib.parse.quote(secret),
            urllib.parse.quote_plus(secret),
        }
        # Longest first, so a secret that contains another is removed whole.
        self._needles = sorted(set(self._needles) | forms, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for needle in self._needles:
            if needle in text:
                text = text.replace(needle, "***")
        return text


def expand_packages(
    packages: List[str], environ: Dict[str, str], redactor: Redactor, allowed: List[str]
) -> List[str]:
    """Expand ``${VAR}`` from the environment, only for the variables the app declared
    (``allowed``) and never this program's own; each value becomes a secret for the redactor."""
    expanded = []
    for i, pkg in enumerate(packages):
        def substitute(match, field="packages[%d]" % i):
            name = match.group(1)
            if name in RESERVED_ENV or name not in allowed:
                raise _fail_config(field, "${%s} is not a variable declared for expansion" % name)
            if name not in environ:
                raise _fail_config(field, "environment variable %s is not set" % name)
            value = environ[name]
            if any(ord(ch) < 32 or ord(ch) == 127 for ch in value) or re.search(r"\s[-#]", value):
                raise _fail_config(field, "the value of %s contains characters not allowed in a requirement" % name)
            redactor.add(value)
            return value
        expanded.append(VAR_RE.sub(substitute, pkg))
    return expanded


def same_host(url_a: str, url_b: str) -> bool:
    """True when both URLs name the same host (credentials are scoped to a host, as netrc is)."""
    a, b = urllib.parse.urlsplit(url_a), urllib.parse.urlsplit(url_b)
    return bool(a.hostname) and (a.hostname or "").lower() == (b.hostname or "").lower()


def netrc_entry(host: str, username: str, password: str) -> Optional[str]:
    """A netrc ``machine`` line for pip (requests reads the file named by NETRC), or None when
    this Python's netrc parser cannot represent the values.

    netrc keeps credentials out of every URL, so they never reach argv (pip passes index URLs
    to the pip it starts for build dependencies) and work with any character ('/' in a
    user name breaks pip's handling of credentials inside URLs). Python >= 3.11 reads quoted
    tokens with backslash escapes; older parsers split on whitespace and keep quotes.
    """
    if sys.version_info >= (3, 11):
        def quote(value):
            return '"%s"' % "".join("\\" + ch for ch in value)
        return "machine %s login %s password %s\n" % (host, quote(username), quote(password))
    if any(ch.isspace() or ch in "\"'\\#" for ch in username + password) or not password:
        return None
    return "machine %s login %s password %s\n" % (host, username, password)


class IndexSettings:
    """How pip reaches the indexes: PIP_* variables plus, with credentials, a netrc text."""

    def __init__(self, env: Dict[str, str], netrc: Optional[str], credentials: Optional[Tuple[str, str]]):
        self.env = env
        self.netrc = netrc
        self.credentials = credentials


def index_settings(cfg: Config, environ: Dict[str, str], redactor: Redactor) -> IndexSettings:
    """The pip child's index configuration, with credentials only for the ``indexUrl`` host.

    Credentials go to pip only through a private netrc file keyed by that host (so extra
    indexes on the same host get them and no other host does). Where this Python's netrc
    parser cannot hold them (before 3.11: whitespace, quotes, backslash, '#', an empty
    password), there is no safe way: in the index URL they would reach the command line of the
    pip that builds an sdist's dependencies, so the run stops with ``invalid_config``.
    """
    env: Dict[str, str] = {}
    credentials = None
    if cfg.credentials:
        username = environ.get("KASPR_PYPI_USERNAME")
        password = environ.get("KASPR_PYPI_PASSWORD")
        if not username:
            raise _fail_config("credentials", "KASPR_PYPI_USERNAME is not set or empty")
        if password is None:
            raise _fail_config("credentials", "KASPR_PYPI_PASSWORD is not set")
        redactor.add(username)
        redactor.add(password)
        if cfg.index_url:
            credentials = (username, password)
        else:
            log("warning: credentials are configured but there is no indexUrl; they are not used")
    netrc = None
    if credentials:
        host = urllib.parse.urlsplit(cfg.index_url).hostname
        netrc = netrc_entry(host, *credentials)
        if netrc is None:
            raise _fail_config(
                "credentials",
                "Python %d.%d cannot pass this username or password to pip safely (it contains "
                "whitespace, a quote, a backslash or '#', or the password is empty); in a URL it "
                "would reach a process's command line. Use an image with Python 3.11 or newer, "
                "or credentials without those characters" % sys.version_info[:2])

    if cfg.index_url:
        env["PIP_INDEX_URL"] = cfg.index_url
    if cfg.extra_index_urls:
        env["PIP_EXTRA_INDEX_URL"] = " ".join(cfg.extra_index_urls)
    if cfg.trusted_hosts:
        env["PIP_TRUSTED_HOST"] = " ".join(cfg.trusted_hosts)
    return IndexSettings(env, netrc, credentials)


def describe_url(url: str) -> str:
    """``url`` without userinfo, for logs."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))


def describe_indexes(cfg: Config) -> str:
    """Index URLs for the log, without any userinfo."""
    urls = [describe_url(cfg.index_url)] if cfg.index_url else ["pip default"]
    urls += [describe_url(u) for u in cfg.extra_index_urls]
    return ", ".join(urls)


# --------------------------------------------------------------------------------------------
# Facts about this Python
# --------------------------------------------------------------------------------------------

def python_tag() -> str:
    """``<impl>-<major><minor><abiflags>-<platform>-<libc>``, e.g. ``cpython-311-linux-x86_64-glibc2.36``.

    Builds are only shared between identical tags: a different interpreter version, ABI,
    platform or C library (which decides the manylinux wheels pip picks) gets its own build.
    """
    impl = sys.implementation.name
    version = "%d%d%s" % (sys.version_info[0], sys.version_info[1], getattr(sys, "abiflags", ""))
    plat = sysconfig.get_platform().replace(".", "_")
    tag = "%s-%s-%s" % (impl, version, plat)
    return tag + libc_suffix()


def build_fingerprint(installed: Dict[str, str], packages: List[str], expanded: List[str]) -> str:
    """8 hex characters that tell builds of one install key apart: the image's installed
    distributions (the resolver leaves out what the image provides, so another image may need
    another set) and, when ``${VAR}`` values were expanded, a digest of the expanded strings.
    The C library is already part of the Python tag. Values themselves never appear."""
    digest = hashlib.sha256()
    for name in sorted(installed):
        digest.update(("%s==%s\n" % (name, installed[name])).encode())
    if expanded != packages:
        digest.update(b"expanded\n")
        for line in expanded:
            digest.update(hashlib.sha256(line.encode()).digest())
    return digest.hexdigest()[:8]


def build_tag(image: Dict[str, str], packages: List[str], expanded: List[str]) -> str:
    """The identity of a build beside its install key: a build is reused only by the same
    Python, platform and C library, image content and expanded values."""
    return "%s-%s" % (python_tag(), build_fingerprint(image, packages, expanded))


def libc_suffix() -> str:
    if not sys.platform.startswith("linux"):
        return ""
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError, AttributeError):
        glibc = ""
    if glibc.startswith("glibc "):
        return "-glibc" + glibc.split()[1]
    for directory in ("/lib", "/usr/lib"):
        try:
            if any(n.startswith("ld-musl-") for n in os.listdir(directory)):
                return "-musl"
        except OSError:
            pass
    lib, ver = platform.libc_ver()
    return "-%s%s" % (lib, ver) if lib else ""


def pip_version() -> Optional[Tuple[int, ...]]:
    """The version of the pip this Python would run, or None when pip is missing."""
    try:
        from importlib import metadata
        text = metadata.version("pip")
    except Exception:  # noqa: BLE001 - any failure means "no usable pip metadata"
        return None
    numbers = []
    for part in text.split(".")[:3]:
        digits = re.match(r"\d+", part)
        if not digits:
            break
        numbers.append(int(digits.group(0)))
    return tuple(numbers)


def installed_distributions() -> Dict[str, str]:
    """Normalised name -> version of every distribution the running Python can import."""
    from importlib import metadata
    found: Dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"] if dist.metadata else None
        if name:
            found.setdefault(normalize(name), dist.version)
    return found


def normalize(name: str) -> str:
    """PEP 503 name normalisation."""
    return re.sub(r"[-_.]+", "-", name).lower()


# --------------------------------------------------------------------------------------------
# Running pip
# --------------------------------------------------------------------------------------------

class PipResult:
    def __init__(self, returncode: int, lines: List[str], report: str, seconds: float):
        self.returncode = returncode
        self.lines = lines
        self.report = report
        self.seconds = seconds


def run_pip(
    args: List[str], stdin_text: str, env: Dict[str, str], deadline: float,
    redactor: Redactor, want_report: bool = False, program: Optional[List[str]] = None,
) -> PipResult:
    """Run ``python -m pip <args>`` in its own session, relaying redacted output.

    ``stdin_text`` is the requirements file (pip reads it from /dev/stdin), so requirement
    strings and expanded secrets never appear in argv or on disk. With ``want_report`` pip
    writes its JSON report to a pipe whose path is passed as ``{report}`` in ``args``.
    At ``deadline`` the whole process group (pip, its build backends, git, ...) is killed.
    """
    report_r = report_w = None
    if want_report:
        report_r, report_w = os.pipe()
        args = [a.replace("{report}", "/dev/fd/%d" % report_w) for a in args]
    argv = (program or [sys.executable, "-m", "pip"]) + args
    label = "uv" if program else "pip"
    started = time.monotonic()
    remaining = deadline - started
    if remaining <= 0:
        raise InstallError("timeout", "attempt exceeded its time limit before %s started" % label)
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=env, start_new_session=True, pass_fds=(report_w,) if want_report else (),
        )
    except OSError as exc:
        if report_r is not None:
            os.close(report_r)  # report_w is closed below
        raise classify_os_error(exc, "could not start %s" % label)
    finally:
        if report_w is not None:
            os.close(report_w)

    lines: List[str] = []
    report_chunks: List[bytes] = []
    threads = [
        threading.Thread(target=_feed, args=(proc.stdin, stdin_text), daemon=True),
        threading.Thread(target=_relay, args=(proc.stdout, lines, redactor, label), daemon=True),
    ]
    if report_r is not None:
        threads.append(threading.Thread(target=_collect, args=(report_r, report_chunks), daemon=True))
    for thread in threads:
        thread.start()
    timed_out = False
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_group(proc)
    finally:
        if proc.poll() is None:  # interrupted by a signal: never leave pip behind
            kill_group(proc)
    for thread in threads:
        # A grandchild that left the process group could hold the pipes open; never wait on it.
        thread.join(timeout=5)
    if timed_out:
        raise InstallError("timeout", "%s did not finish within the attempt's time limit; its process group was killed" % label)
    return PipResult(proc.returncode, lines, b"".join(report_chunks).decode("utf-8", "replace"),
                     time.monotonic() - started)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL pip's whole process group (it leads its own session) and reap pip."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _feed(pipe, text: str) -> None:
    try:
        pipe.write(text.encode("utf-8"))
    except (BrokenPipeError, OSError):
        pass
    finally:
        try:
            pipe.close()
        except OSError:
            pass


def _relay(pipe, lines: List[str], redactor: Redactor, label: str = "pip") -> None:
    for raw in iter(pipe.readline, b""):
        line = redactor(raw.decode("utf-8", "replace").rstrip())
        lines.append(line)
        if line.strip():
            print("  %s: %s" % (label, line), flush=True)
    pipe.close()


def _collect(fd: int, chunks: List[bytes]) -> None:
    with os.fdopen(fd, "rb") as pipe:
        for chunk in iter(lambda: pipe.read(65536), b""):
            chunks.append(chunk)


# Failure categories recognised in pip's output, checked in this order. Hash errors come from
# pip's own HashError messages only; a package name that contains "hash" is not one.
CATEGORY_PATTERNS = [
    ("integrity", re.compile(
        r"THESE PACKAGES DO NOT MATCH THE HASHES|Hashes are required in --require-hashes mode"
        r"|HashMismatch|Can't verify hashes for these|Hash mismatch for|hashes are required")),
    ("disk_full", re.compile(r"No space left on device|\[Errno 28\]|Disk quota exceeded|\[Errno 122\]")),
    ("authentication", re.compile(
        r"\b401 Client Error|\b403 Client Error|HTTP error 40[13]\b|401 Error, Credentials not correct"
        r"|\b40[13] (Unauthorized|Forbidden)\b|Authentication failed|could not read Username"
        r"|Permission denied \(publickey")),
    ("network", re.compile(
        r"NewConnectionError|Connection refused|ConnectTimeoutError|ReadTimeoutError|Read timed out"
        r"|Max retries exceeded|Name or service not known|Temporary failure in name resolution"
        r"|No route to host|Network is unreachable|SSLError|ProxyError|RemoteDisconnected"
        r"|ConnectionResetError|Connection reset by peer|IncompleteRead|Could not resolve host"
        r"|\b50[0-4] Server Error|HTTP error 50[0-4]\b")),
    ("package_not_found", re.compile(
        r"No matching distribution found for|Could not find a version that satisfies the requirement"
        r"|\b404 Client Error|HTTP error 404\b|ResolutionImpossible|Cannot install .* because these package versions have conflicting dependencies"
        r"|did not match any file\(s\) known to git|Repository not found"
        r"|No solution found when resolving|was not found in the package registry|there is no version of")),
]


def classify(lines: List[str]) -> str:
    """The failure category of a failed pip run, from its output."""
    text = "\n".join(lines)
    for category, pattern in CATEGORY_PATTERNS:
        if pattern.search(text):
            return category
    return "unknown"


def failure_summary(lines: List[str]) -> str:
    """The most telling line of pip's output: its first ERROR line, else its last line."""
    for line in lines:
        if line.startswith("ERROR:"):
            return one_line(line[len("ERROR:"):], 300)
    for number, line in enumerate(lines):
        if line.startswith("error:") or line.lstrip().startswith("\u00d7"):  # uv
            return one_line(" ".join(l.strip() for l in lines[number:number + 4]), 300)
    for line in reversed(lines):
        if line.strip():
            return one_line(line, 300)
    return "pip failed without output"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Never follow redirects: urllib would resend our Authorization header to another host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def probe_index(url: str, auth: Optional[Tuple[str, str]], insecure: bool, timeout: float):
    """GET ``url`` once; returns the HTTP status, or the connection error's text."""
    import ssl
    request = urllib.request.Request(url, headers={"Accept": "text/html"})
    if auth is not None:
        token = base64.b64encode(("%s:%s" % auth).encode("utf-8")).decode("ascii")
        request.add_header("Authorization", "Basic " + token)
    handlers: list = [_NoRedirect()]
    if insecure:
        handlers.append(urllib.request.HTTPSHandler(context=ssl._create_unverified_context()))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(request, timeout=timeout) as response:
            response.read(1)
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return str(getattr(exc, "reason", exc))


def diagnose_not_found(ctx: "Context", lines: List[str], deadline: float) -> Optional[InstallError]:
    """pip reports an index it could not read (401, connection refused) only as "no matching
    distribution" at its default verbosity. Ask each configured index for the missing project
    ourselves to tell authentication and network failures apart from a real miss. Credentials
    go only where pip would send them (the indexUrl host)."""
    match = re.search(r"No matching distribution found for ([A-Za-z0-9][A-Za-z0-9._-]*)", "\n".join(lines))
    if not match or not (ctx.cfg.index_url or ctx.cfg.extra_index_urls):
        return None
    project = normalize(match.group(1))
    indexes = ([ctx.cfg.index_url] if ctx.cfg.index_url else []) + ctx.cfg.extra_index_urls
    for index in indexes:
        remaining = deadline - time.monotonic()
        if remaining <= 1:
            return None
        auth = None
        if ctx.credentials and ctx.cfg.index_url and same_host(index, ctx.cfg.index_url):
            auth = ctx.credentials
        host = urllib.parse.urlsplit(index)
        insecure = host.hostname in ctx.cfg.trusted_hosts or host.netloc.rsplit("@", 1)[-1] in ctx.cfg.trusted_hosts
        status = probe_index(index.rstrip("/") + "/" + project + "/", auth, insecure, min(10.0, remaining))
        shown = describe_url(index)
        if status in (401, 403):
            return InstallError("authentication", "index %s answered HTTP %d for %s" % (shown, status, project))
        if isinstance(status, str):
            return InstallError("network", "index %s is unreachable: %s" % (shown, ctx.redactor(status)))
        if status >= 500:
            return InstallError("network", "index %s answered HTTP %d for %s" % (shown, status, project))
    return None


def classify_os_error(exc: OSError, what: str) -> InstallError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InstallError("disk_full", "%s: %s" % (what, exc.strerror))
    return InstallError("unknown", "%s: %s" % (what, exc))


def pip_failure(result: PipResult, step: str, tool: str = "pip") -> InstallError:
    category = classify(result.lines)
    return InstallError(category, "%s %s exited with %d: %s" % (tool, step, result.returncode, failure_summary(result.lines)))


# --------------------------------------------------------------------------------------------
# Resolving and installing
# --------------------------------------------------------------------------------------------

class Plan:
    """What one attempt installs: pinned requirement lines plus what they are, for the log."""

    def __init__(self, lines: List[str], names: List[str], overrides: List[str]):
        self.lines = lines
        self.names = names
        self.overrides = overrides


NAMED_URL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\s*(\[[^\]]*\])?\s*@\s*(\S.*)$")


SCP_LIKE_RE = re.compile(r"^git@([^:/\s]+):(.+)$")


def pip_requirement(requirement: str) -> str:
    """The line pip is given for a (validated, expanded) requirement.

    pip knows git over SSH only as ``git+ssh://``; the accepted ``ssh://host/path`` and
    scp-like ``git@host:path`` forms mean the same repository and are rewritten to it (pip
    would otherwise read ``git@host:path`` as a distribution named ``git``).
    """
    url = requirement_url(requirement)
    if url is None:
        return requirement
    scp = SCP_LIKE_RE.match(url)
    if scp:
        pip_url = "git+ssh://git@%s/%s" % (scp.group(1), scp.group(2))
    elif url.lower().startswith("ssh://"):
        pip_url = "git+" + url
    else:
        return requirement
    return requirement.replace(url, pip_url, 1)


def requirement_url(requirement: str) -> Optional[str]:
    """The URL of a direct reference (``name @ url``, a bare URL, ``git@host:path``), else None."""
    head = requirement.split(";", 1)[0].strip()
    match = NAMED_URL_RE.match(head)
    if match and ("://" in match.group(2) or match.group(2).startswith("git@")):
        return match.group(2).strip()
    if "://" in head or head.startswith("git@"):
        return head
    return None


def url_identity(url: str) -> str:
    """A URL reduced to what identifies a source: no VCS prefix, userinfo, revision, fragment."""
    url = url.split("#", 1)[0]
    if url.startswith("git@"):  # scp-like git@host:path
        host, _, path = url[4:].partition(":")
        url = "ssh://%s/%s" % (host, path)
    scheme, _, rest = url.partition("://")
    scheme = scheme.split("+")[-1]
    parts = urllib.parse.urlsplit("%s://%s" % (scheme, rest))
    host = parts.netloc.rsplit("@", 1)[-1].lower()
    path = parts.path
    if "@" in path:  # VCS revision: x.git@v1
        path = path.rsplit("@", 1)[0]
    return "%s://%s%s" % (parts.scheme, host, path.rstrip("/"))


def plan_from_report(
    report_text: str, expanded: List[str], installed: Dict[str, str]
) -> Plan:
    """Turn pip's dry-run report into the exact set to install with ``--no-deps``.

    Index distributions are pinned by version. Direct references reuse the requirement the
    user wrote (pip's report strips userinfo from URLs, which private VCS URLs need).
    """
    try:
        report = json.loads(report_text)
        items = report["install"]
    except (ValueError, KeyError, TypeError):
        raise InstallError("unknown", "pip's dry-run report could not be read")
    direct_by_identity = {}
    for req in expanded:
        url = requirement_url(req)
        if url is not None:
            direct_by_identity.setdefault(url_identity(url), req)
    lines, names, overrides = [], [], []
    for item in items:
        meta = item.get("metadata") or {}
        name, version = meta.get("name"), meta.get("version")
        if not name or not version:
            raise InstallError("unknown", "pip's dry-run report lists a distribution without name or version")
        key = normalize(name)
        if key in installed and installed[key] != version:
            overrides.append("%s %s -> %s" % (name, installed[key], version))
        names.append("%s %s" % (name, version))
        lines.append(pinned_line(item, name, version, direct_by_identity))
    return Plan(lines, names, overrides)


def pinned_line(item: dict, name: str, version: str, direct_by_identity: Dict[str, str]) -> str:
    if not item.get("is_direct"):
        return "%s==%s" % (name, version)
    info = item.get("download_info") or {}
    url = info.get("url", "")
    vcs = info.get("vcs_info")
    own = direct_by_identity.get(url_identity(url))
    if own is not None:
        return own
    if vcs:
        line = "%s @ %s+%s@%s" % (name, vcs["vcs"], url, vcs.get("commit_id") or vcs.get("requested_revision") or "")
        line = line.rstrip("@")
    else:
        line = "%s @ %s" % (name, url)
    if info.get("subdirectory"):
        line += "#subdirectory=" + info["subdirectory"]
    return line


def write_private(path: str, text: str) -> str:
    """Write ``text`` to a new file only its owner can read (removed with the work dir)."""
    if os.path.lexists(path):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


def pip_base_args(cache_dir: str) -> List[str]:
    return [
        "install", "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
        "--cache-dir", cache_dir,
    ]


def pip_child_env(index_env: Dict[str, str], work: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PIP_ENV_DROPPED}
    env.update(index_env)
    env["PIP_NO_INPUT"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_ROOT_USER_ACTION"] = "ignore"
    env["PYTHONUNBUFFERED"] = "1"
    # The image's root filesystem may be read-only: keep pip's temporary files in the volume.
    env["TMPDIR"] = work
    return env


def install_attempt(ctx: "Context", dest: str, deadline: float) -> Plan:
    """One attempt: resolve against the running Python, then install exactly that set."""
    work = ctx.work_dir
    cache = os.path.join(work, "pip-cache")
    env = pip_child_env(ctx.index.env, work)
    if ctx.index.netrc is not None:
        env["NETRC"] = write_private(os.path.join(work, "netrc"), ctx.index.netrc)
    base = pip_base_args(cache)
    requirements = "".join(pip_requirement(line) + "\n" for line in ctx.expanded)
    version = ctx.pip_version
    if version < MIN_PIP_FOR_RESOLVE:
        log("warning: pip %s cannot resolve without installing; installing the full dependency set"
            % ".".join(map(str, version)))
        result = run_pip(base + ["--target", dest, "-r", "/dev/stdin"], requirements, env, deadline, ctx.redactor)
        if result.returncode != 0:
            raise pip_failure(result, "install")
        return Plan(list(ctx.expanded), [], [])

    log("resolving against the image's Python (pip %s)" % ".".join(map(str, version)))
    result = run_pip(
        base + ["--dry-run", "--report", "{report}", "-r", "/dev/stdin"],
        requirements, env, deadline, ctx.redactor, want_report=True,
    )
    if result.returncode != 0:
        error = pip_failure(result, "resolve")
        if error.category == "package_not_found":
            error = diagnose_not_found(ctx, result.lines, deadline) or error
        raise error
    log("pip resolve took %.2fs" % result.seconds)
    plan = plan_from_report(result.report, ctx.expanded, ctx.installed)
    for override in plan.overrides:
        log("override: " + override)
    if not plan.lines:
        log("every requirement is already satisfied by the image; nothing to install")
        return plan
    log("installing %d distributions: %s" % (len(plan.names), ", ".join(plan.names)))
    pinned = "".join(line + "\n" for line in plan.lines)
    result = run_pip(
        base + ["--no-deps", "--no-warn-script-location", "--target", dest, "-r", "/dev/stdin"],
        pinned, env, deadline, ctx.redactor,
    )
    if result.returncode != 0:
        raise pip_failure(result, "install")
    log("pip install took %.2fs" % result.seconds)
    return plan


def backoff_delay(failed_attempts: int, environ: Dict[str, str]) -> float:
    """Exponential backoff: base, 2*base, 4*base, ... capped at 30 s (base 2 s by default)."""
    try:
        base = float(environ.get("KASPR_PACKAGES_BACKOFF_BASE", BACKOFF_BASE_SECONDS))
    except ValueError:
        base = BACKOFF_BASE_SECONDS
    return min(BACKOFF_CAP_SECONDS, max(0.0, base) * (2 ** (failed_attempts - 1)))


def install_with_retries(ctx: "Context", dest: str) -> Plan:
    """Install into ``dest`` with 1 + retries attempts, each bounded by the timeout."""
    attempts = 1 + ctx.cfg.retries
    for attempt in range(1, attempts + 1):
        reset_dir(dest)
        started = time.monotonic()
        log("attempt %d/%d (timeout %gs)" % (attempt, attempts, ctx.cfg.timeout))
        try:
            plan = install_attempt(ctx, dest, started + ctx.cfg.timeout)
            scrub_secrets(dest, ctx.redactor)
            log("attempt %d/%d succeeded in %.1fs" % (attempt, attempts, time.monotonic() - started))
            return plan
        except InstallError as exc:
            log("attempt %d/%d failed after %.1fs: %s: %s"
                % (attempt, attempts, time.monotonic() - started, exc.category, ctx.redactor(exc.message)))
            if attempt == attempts or not exc.retryable:
                raise
            delay = backoff_delay(attempt, ctx.environ)
            log("retrying in %.1fs" % delay)
            time.sleep(delay)
        except OSError as exc:
            raise classify_os_error(exc, "installing")
    raise InstallError("unknown", "no attempt was made")


def scrub_secrets(dest: str, redactor: Redactor) -> None:
    """Remove expanded secrets from pip's metadata (PEP 610 direct_url.json records URLs)."""
    if not os.path.isdir(dest):
        return
    for entry in os.listdir(dest):
        if not entry.endswith(".dist-info"):
            continue
        path = os.path.join(dest, entry, "direct_url.json")
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        clean = redactor(text)
        if clean != text:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(clean)


def reset_dir(path: str) -> None:
    remove_tree(path)
    os.makedirs(path)


def remove_tree(path: str) -> None:
    if os.path.islink(path):
        os.unlink(path)
    elif os.path.exists(path):
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Builds and publication
# --------------------------------------------------------------------------------------------

def write_marker(build: str, ctx: "Context", plan: Plan) -> None:
    """Record what a build contains; a build without this file is never used."""
    marker = {
        "installKey": ctx.cfg.install_key,
        "pythonTag": ctx.tag,
        "packages": ctx.cfg.packages,  # unexpanded: never a secret
        "distributions": plan.names,
        "overrides": plan.overrides,
        "created": int(time.time()),
    }
    path = os.path.join(build, BUILD_MARKER)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(marker, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(path + ".tmp", path)


def read_marker(build: str) -> Optional[dict]:
    try:
        with open(os.path.join(build, BUILD_MARKER), encoding="utf-8") as handle:
            data = json.load(handle)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def build_is_complete(build: str, ctx: "Context") -> bool:
    marker = read_marker(build)
    return bool(marker) and marker.get("installKey") == ctx.cfg.install_key and marker.get("pythonTag") == ctx.tag


def link_site(target: str, build: str) -> None:
    """Point ``<target>/site`` at ``build`` atomically (a new symlink renamed over the old)."""
    site = os.path.join(target, "site")
    tmp_link = os.path.join(target, ".site.%d.tmp" % os.getpid())
    if os.path.lexists(tmp_link):
        os.unlink(tmp_link)
    if os.path.isdir(site) and not os.path.islink(site):
        shutil.rmtree(site)  # a plain directory left by something else: replace it
    os.symlink(build, tmp_link)
    os.replace(tmp_link, site)


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Context:
    """Everything one run needs, computed once."""

    def __init__(self, cfg: Config, environ: Dict[str, str]):
        self.cfg = cfg
        self.environ = environ
        self.redactor = Redactor()
        self.expanded = expand_packages(cfg.packages, environ, self.redactor, cfg.expand_env)
        self.index = index_settings(cfg, environ, self.redactor)
        self.credentials = self.index.credentials
        self.work_dir = os.path.join(cfg.target, ".work")
        version = pip_version()
        if version is None:
            raise InstallError("unknown", "pip is not installed for %s (python3 -m pip is required)" % sys.executable, retryable=False)
        self.pip_version = version
        image = installed_distributions()
        self.installed = image if version >= MIN_PIP_FOR_RESOLVE else {}
        self.tag = build_tag(image, cfg.packages, self.expanded)
        # The group the app's pods share the PVC cache through (set in PVC mode).
        self.cache_group: Optional[int] = None
        # Why the cache was not used this time, when it was not: (cause, detail).
        self.degraded: Optional[Tuple[str, str]] = None
        # The uv program the installs from a lock use (None: pip), once decided.
        self.uv: Optional[str] = None
        self.uv_decided = False


def degrade(ctx: Context, cause: str, detail: str) -> None:
    """Note that this install does without its cache. The first cause is the one reported
    (``OK ... (cache off: <cause>: <detail>)``); every one is logged."""
    detail = one_line(ctx.redactor(detail), 300)
    log("warning: cache off: %s: %s" % (cause, detail))
    if ctx.degraded is None:
        ctx.degraded = (cause, detail)


def prepare_target(target: str) -> None:
    try:
        os.makedirs(target, exist_ok=True)
    except OSError as exc:
        raise classify_os_error(exc, "cannot create target %s" % target)


def run_empty_dir(ctx: Context) -> Plan:
    """Install into the pod's own volume; reuse a complete build left by an earlier run of this
    init container in the same pod (the volume survives init-container restarts)."""
    target = ctx.cfg.target
    builds = os.path.join(target, ".builds")
    final = os.path.join(builds, "%s-%s" % (ctx.cfg.install_key, ctx.tag))
    if build_is_complete(final, ctx):
        log("build already present in this pod's volume; skipping pip")
        link_site(target, final)
        return Plan([], (read_marker(final) or {}).get("distributions", []), [])
    os.makedirs(builds, exist_ok=True)
    tmp = os.path.join(builds, ".tmp-%d" % os.getpid())
    plan = install_with_retries(ctx, tmp)
    write_marker(tmp, ctx, plan)
    publish_pod_build(target, tmp, final)
    return plan


def publish_pod_build(target: str, tmp: str, final: str) -> None:
    """Move a finished build into place in the pod's volume and point ``site`` at it."""
    remove_tree(final)
    os.rename(tmp, final)
    link_site(target, final)
    builds = os.path.dirname(final)
    for entry in os.listdir(builds):  # earlier keys' builds and killed runs' leftovers
        if os.path.join(builds, entry) != final:
            remove_tree(os.path.join(builds, entry))


# --------------------------------------------------------------------------------------------
# PVC mode
# --------------------------------------------------------------------------------------------

def env_seconds(environ: Dict[str, str], name: str, default: float) -> float:
    try:
        return float(environ[name])
    except (KeyError, ValueError):
        return default


def lock_wait_limit(ctx: Context) -> float:
    """How long to wait for another pod's build: its worst case (all attempts and backoffs)
    plus a minute, unless KASPR_PACKAGES_LOCK_TIMEOUT says otherwise."""
    attempts = 1 + ctx.cfg.retries
    worst = attempts * ctx.cfg.timeout + sum(backoff_delay(i, ctx.environ) for i in range(1, attempts))
    return env_seconds(ctx.environ, "KASPR_PACKAGES_LOCK_TIMEOUT", worst + 60.0)


class FileLock:
    """An exclusive or shared ``flock`` with a bounded wait. Lock files are never deleted.

    Every pod of the app opens the same lock file, whatever its uid: it is created
    group-readable and -writable (see ``open_shared_lock``), because on NFS an exclusive flock
    needs a file opened for writing."""

    def __init__(self, path: str, shared: bool = False, group: Optional[int] = None):
        self.path = path
        self.shared = shared
        self.group = group
        self.fd: Optional[int] = None

    def acquire(self, wait_seconds: float) -> bool:
        self.fd = open_shared_lock(self.path, self.group)
        mode = (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        deadline = time.monotonic() + wait_seconds
        delay = 0.05
        while True:
            try:
                fcntl.flock(self.fd, mode)
                return True
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() >= deadline:
                os.close(self.fd)
                self.fd = None
                return False
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 1.0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


# --------------------------------------------------------------------------------------------
# One cache for every pod of the app, whatever its uid
#
# Pods of one app may run as different uids (a root pod, then non-root ones after a template
# change) that share a group (fsGroup or a supplemental group). Everything this program writes
# into the cache is therefore group-owned by that group and group-writable: directories 2775
# (setgid, so what is created inside inherits the group), files at least group-readable, lock
# files 0664. Nothing a pod needs to change belongs to it alone: leases and use stamps are
# replaced by rename (a write to their group-writable directory), never rewritten in place.
# --------------------------------------------------------------------------------------------

SHARED_DIR_BITS = 0o2770
SHARED_FILE_MODE = 0o664


def my_groups() -> set:
    return set(os.getgroups()) | {os.getegid()}


def identity() -> str:
    """Who this process is, for messages: ``uid 1000 gid 1000 (groups 1000,2000)``."""
    groups = ",".join(str(g) for g in sorted(set(os.getgroups())))
    return "uid %d gid %d (groups %s)" % (os.geteuid(), os.getegid(), groups or "none")


def describe_owner(path: str) -> str:
    """``owned by uid 0 gid 0 with mode 0755`` for the path, or for its nearest existing parent."""
    probe = path
    while True:
        try:
            st = os.stat(probe)
            break
        except OSError:
            parent = os.path.dirname(probe)
            if parent == probe:
                return "%s cannot be examined" % path
            probe = parent
    import stat as stat_module
    return "%s is owned by uid %d gid %d with mode %04o" % (
        probe, st.st_uid, st.st_gid, stat_module.S_IMODE(st.st_mode))


def cache_access_error(path: str, exc: OSError) -> InstallError:
    """The cache_error for a cache this pod may not write: who we are, what we found, what to do."""
    if exc.errno == errno.EROFS:
        hint = "the volume is mounted read-only"
    else:
        hint = ("give the cache root to this uid, or to a group the pod has (its fsGroup) with "
                "mode 2775, e.g. chgrp <fsGroup> and chmod 2775 on the volume root")
    where = exc.filename if isinstance(exc.filename, str) else path
    return InstallError("cache_error", "cannot use cache directory %s: %s: %s: this pod runs as %s and %s; %s"
                        % (path, where, exc.strerror or exc, identity(), describe_owner(where), hint),
                        retryable=False)


def cache_group(cache_root: str) -> int:
    """The group the app's pods share the cache through: the cache root's group when this pod
    has it (the kubelet's fsGroup ownership, or an admin's chgrp), else this pod's only
    supplemental group (its fsGroup), else its primary group."""
    mine = my_groups()
    try:
        root_gid = os.stat(cache_root).st_gid
    except OSError:
        root_gid = None
    if root_gid is not None and root_gid in mine:
        return root_gid
    extra = set(os.getgroups()) - {os.getegid()}
    if len(extra) == 1:
        return extra.pop()
    return os.getegid()


def share_path(path: str, group: Optional[int], directory: bool, st=None, fd: Optional[int] = None,
               bits: Optional[int] = None) -> None:
    """Give ``path`` (if it is ours) to the shared group and add the shared mode bits
    (directories: setgid and group rwx; files: ``bits``, group read by default). Entries of
    other users are left as they are: only their owner may change them."""
    import stat as stat_module
    try:
        st = st or os.lstat(path)
        if st.st_uid != os.geteuid() or stat_module.S_ISLNK(st.st_mode):
            return
        regroup = group is not None and st.st_gid != group and group in my_groups()
        if regroup:
            os.fchown(fd, -1, group) if fd is not None else os.chown(path, -1, group)
        mode = stat_module.S_IMODE(st.st_mode)
        wanted = mode | (SHARED_DIR_BITS if directory else (0o040 if bits is None else bits))
        # chown may clear the setgid bit: set the mode after it.
        if wanted != mode or regroup:
            os.fchmod(fd, wanted) if fd is not None else os.chmod(path, wanted)
    except OSError as exc:
        log("warning: cannot share %s with the app's group: %s" % (path, exc.strerror or exc))


def make_shared_dir(path: str, group: Optional[int]) -> None:
    """mkdir -p whose new directories are setgid, group-writable and of the shared group."""
    parent = os.path.dirname(path)
    if parent and parent != path and not os.path.isdir(parent):
        make_shared_dir(parent, group)
    try:
        os.mkdir(path)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
    share_path(path, group, directory=True)


def share_tree(root: str, group: Optional[int]) -> None:
    """Before publishing a build: every directory 2775-ish and every file group-readable, all
    of the shared group, so any pod of the app can read it and prune it later."""
    share_path(root, group, directory=True)
    for dirpath, dirs, files in os.walk(root):
        for name in dirs:
            share_path(os.path.join(dirpath, name), group, directory=True)
        for name in files:
            share_path(os.path.join(dirpath, name), group, directory=False)


def open_shared_lock(path: str, group: Optional[int]) -> int:
    """Open a lock file for reading and writing, creating it 0664 in the shared group. A lock
    file left 0644 by another uid (an older release) is opened read-only, which flock accepts
    on local filesystems."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, SHARED_FILE_MODE)
    except PermissionError:
        if not os.path.exists(path):
            raise
        log("warning: lock file %s is not writable for this pod (%s); using it read-only"
            % (path, describe_owner(path)))
        return os.open(path, os.O_RDONLY)
    share_path(path, group, directory=False, st=os.fstat(fd), fd=fd, bits=0o060)
    return fd


def write_shared_file(path: str, text: str, group: Optional[int]) -> None:
    """Replace ``path`` atomically with a new group-writable file of ours: replacing needs
    write access to the directory only, never to a file another uid wrote."""
    tmp = "%s.%d.tmp" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, SHARED_FILE_MODE)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    share_path(tmp, group, directory=False)
    os.replace(tmp, path)


def pod_name(environ: Dict[str, str]) -> str:
    name = environ.get("HOSTNAME") or socket.gethostname() or "pod"
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def lease_file_name(environ: Dict[str, str]) -> str:
    """One lease per pod: named by the pod's uid (downward API) beside its name, so two pods
    that share a hostname never overwrite each other's lease; by the name alone without it."""
    uid = re.sub(r"[^A-Za-z0-9-]", "_", environ.get("KASPR_PACKAGES_POD_UID") or "")
    return "%s.%s.json" % (pod_name(environ), uid) if uid else pod_name(environ) + ".json"


def write_lease(ctx: Context, build_rel: str) -> None:
    """Record that this pod uses ``build_rel`` (``<key>/<tag>``): one lease file per pod,
    replaced atomically, so a restarted container drops its pod's reference to its previous
    build."""
    leases = os.path.join(ctx.cfg.cache_dir, "leases")
    make_shared_dir(leases, ctx.cache_group)
    path = os.path.join(leases, lease_file_name(ctx.environ))
    # Milliseconds: a pod's lease written in the same second as an older one of its name must
    # still read as the newer one, or the replaced pod's build would never expire.
    write_shared_file(path, json.dumps({"build": build_rel, "time": round(time.time(), 3), "pod": pod_name(ctx.environ),
                                        "uid": ctx.environ.get("KASPR_PACKAGES_POD_UID") or ""}), ctx.cache_group)
    # Last-use time of the build, for the pruning grace period (its mtime), beside the build:
    # ``<key>/<tag>.used`` or, for a package set, ``sets/<set>/<tag>.used``.
    used = os.path.join(ctx.cfg.cache_dir, os.path.dirname(build_rel), "%s.used" % ctx.tag)
    write_shared_file(used, "", ctx.cache_group)


class CacheUnavailable(Exception):
    """The shared cache cannot be used this time (a lock held too long); the pod installs
    into its own volume instead."""

    def __init__(self, cause: str, detail: str):
        super().__init__(detail)
        self.cause = cause
        self.detail = detail


def use_build(ctx: Context, build: str) -> bool:
    """Under a shared prune lock: if ``build`` is complete, lease it and link it. Pruning takes
    the same lock exclusively, so a build cannot vanish between the check and the lease."""
    lock = FileLock(os.path.join(ctx.cfg.cache_dir, ".prune.lock"), shared=True, group=ctx.cache_group)
    if not lock.acquire(60.0):
        raise CacheUnavailable("lock timeout", "the cache's prune lock was held for more than 60s")
    try:
        if not build_is_complete(build, ctx):
            return False
        write_lease(ctx, os.path.relpath(build, ctx.cfg.cache_dir))
        link_site(ctx.cfg.target, build)
        return True
    finally:
        lock.release()


def run_pvc(ctx: Context) -> Plan:
    """Use the shared build for (install key, python tag), building it first when missing.
    When the build lock is held past the builder's worst case, the pod installs into its own
    volume instead and says so (``cache off: lock timeout``)."""
    cache = ctx.cfg.cache_dir
    # What pip and this program create is group-writable; the explicit modes below hold
    # whatever umask the image sets.
    os.umask(0o002)
    try:
        ctx.cache_group = cache_group(cache)
        if os.path.isdir(cache):
            share_path(cache, ctx.cache_group, directory=True)
        return pvc_install(ctx)
    except CacheUnavailable as exc:
        degrade(ctx, exc.cause, exc.detail)
        return run_empty_dir(ctx)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise cache_access_error(cache, exc)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise classify_os_error(exc, "writing the cache")
        raise InstallError("cache_error", "cannot use cache directory %s: %s" % (cache, exc.strerror or exc),
                           retryable=False)


def pvc_install(ctx: Context) -> Plan:
    cache = ctx.cfg.cache_dir
    key_dir = os.path.join(cache, ctx.cfg.install_key)
    build = os.path.join(key_dir, ctx.tag)
    make_shared_dir(key_dir, ctx.cache_group)
    if use_build(ctx, build):
        log("build %s/%s found in the cache; skipping pip" % (ctx.cfg.install_key, ctx.tag))
        return Plan([], (read_marker(build) or {}).get("distributions", []), [])

    lock = FileLock(os.path.join(key_dir, ".%s.lock" % ctx.tag), group=ctx.cache_group)
    wait = lock_wait_limit(ctx)
    log("build missing; waiting up to %.0fs for the build lock" % wait)
    waited = time.monotonic()
    if not lock.acquire(wait):
        raise CacheUnavailable("lock timeout", "another pod held the build lock for %s/%s for more than %.0fs"
                               % (ctx.cfg.install_key, ctx.tag, wait))
    try:
        if use_build(ctx, build):
            log("build published by another pod after %.1fs; skipping pip" % (time.monotonic() - waited))
            return Plan([], (read_marker(build) or {}).get("distributions", []), [])
        # We hold the lock: any temporary build of this tag is a leftover of a killed pod.
        for entry in os.listdir(key_dir):
            if entry.startswith(".tmp-%s-" % ctx.tag):
                log("removing unfinished build %s left by an interrupted pod" % entry)
                remove_tree(os.path.join(key_dir, entry))
        tmp = os.path.join(key_dir, ".tmp-%s-%s-%d" % (ctx.tag, pod_name(ctx.environ), os.getpid()))
        plan = install_with_retries(ctx, tmp)
        write_marker(tmp, ctx, plan)
        share_tree(tmp, ctx.cache_group)
        fsync_dir(tmp)
        os.rename(tmp, build)  # publication: atomic on one filesystem
        fsync_dir(key_dir)
        log("published build %s/%s" % (ctx.cfg.install_key, ctx.tag))
    finally:
        lock.release()
    if not use_build(ctx, build):
        raise InstallError("cache_error", "the build just published at %s is not readable" % build, retryable=False)
    prune_cache(ctx)
    return plan


def live_lease_builds(leases: str, grace: float) -> set:
    """The builds the leases reference. A lease whose pod name has a newer lease of another pod
    (a StatefulSet never runs two pods of one name, so its pod is gone) expires once it is
    older than ``grace``, and its file is removed. The newest lease of each name stays."""
    found = []
    for entry in os.listdir(leases) if os.path.isdir(leases) else []:
        if not entry.endswith(".json"):
            continue
        path = os.path.join(leases, entry)
        try:
            with open(path, encoding="utf-8") as handle:
                lease = json.load(handle)
            written = float(lease.get("time") or os.stat(path).st_mtime)
            pod = lease.get("pod") or entry[: -len(".json")]
            found.append((pod, written, lease.get("build"), path))
        except (OSError, ValueError, AttributeError, TypeError):
            continue
    newest: Dict[str, float] = {}
    for pod, written, _, _ in found:
        newest[pod] = max(written, newest.get(pod, written))
    now = time.time()
    referenced = set()
    for pod, written, build, path in found:
        if written < newest[pod] and now - written > grace:
            try:
                os.unlink(path)
                log("expired the lease of a replaced pod %s" % os.path.basename(path))
            except OSError:
                pass
            continue
        referenced.add(build)
    return referenced


def prune_cache(ctx: Context) -> None:
    """Remove builds no pod references any more, after a grace period, keeping the two most
    recently used builds of each python tag. Failures only log: pruning never fails a pod."""
    grace = env_seconds(ctx.environ, "KASPR_PACKAGES_PRUNE_GRACE_SECONDS", 24 * 3600.0)
    cache = ctx.cfg.cache_dir
    lock = FileLock(os.path.join(cache, ".prune.lock"), group=ctx.cache_group)
    try:
        if not lock.acquire(0):
            return  # another pod is pruning
    except OSError:
        return
    doomed = []
    try:
        referenced = live_lease_builds(os.path.join(cache, "leases"), grace)
        by_tag: Dict[str, List[Tuple[float, str]]] = {}
        for key in os.listdir(cache):
            key_dir = os.path.join(cache, key)
            if not INSTALL_KEY_RE.match(key) or not os.path.isdir(key_dir):
                continue
            for tag in os.listdir(key_dir):
                if tag.startswith(".") or not os.path.isdir(os.path.join(key_dir, tag)):
                    continue
                used = os.path.join(key_dir, tag + ".used")
                try:
                    last = os.stat(used).st_mtime
                except OSError:
                    last = os.stat(os.path.join(key_dir, tag)).st_mtime
                by_tag.setdefault(tag, []).append((last, "%s/%s" % (key, tag)))
        now = time.time()
        for tag, builds in by_tag.items():
            builds.sort(reverse=True)
            for last, rel in builds[2:]:
                if rel not in referenced and now - last > grace:
                    doomed.append(rel)
        for rel in doomed:
            # Rename under the lock (fast, atomic); delete after releasing it.
            trash = os.path.join(cache, ".trash-%s-%d" % (rel.replace("/", "-"), os.getpid()))
            os.rename(os.path.join(cache, rel), trash)
    except OSError as exc:
        log("warning: pruning the cache failed: %s" % exc)
    finally:
        lock.release()
    for entry in os.listdir(cache):
        if entry.startswith(".trash-"):
            remove_tree(os.path.join(cache, entry))
    for rel in doomed:
        log("pruned unused build %s" % rel)


# --------------------------------------------------------------------------------------------
# GCS mode
# --------------------------------------------------------------------------------------------

GCS_SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"
GCS_DEFAULT_ENDPOINT = "https://storage.googleapis.com"
METADATA_DEFAULT_HOST = "http://metadata.google.internal"


class GcsError(Exception):
    """A failed GCS or token call; ``status`` is the HTTP status, or None for I/O errors;
    ``cause`` says why the cache is off when it is not the call itself (the key, the token)."""

    def __init__(self, message: str, status: Optional[int] = None, cause: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.cause = cause


class _DeadlineReader:
    """A file that refuses to be read past a deadline, so a streamed upload cannot hang."""

    def __init__(self, handle, deadline: float):
        self.handle = handle
        self.deadline = deadline

    def read(self, size: int = -1) -> bytes:
        if time.monotonic() > self.deadline:
            raise GcsError("upload did not finish in time")
        return self.handle.read(size)


def http_call(method: str, url: str, timeout: float, headers: Optional[Dict[str, str]] = None,
              body=None, sink=None, deadline: Optional[float] = None) -> Tuple[int, bytes]:
    """One HTTP request with connect/read timeouts, an overall ``deadline`` (monotonic seconds)
    and no redirects. ``body`` may be bytes or an open file (streamed; give Content-Length).
    With ``sink``, the response body is streamed into it instead of being returned. Raises
    GcsError on any failure."""
    deadline = deadline if deadline is not None else time.monotonic() + 10 * timeout
    if body is not None and not isinstance(body, bytes):
        body = _DeadlineReader(body, deadline)
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    opener = urllib.request.build_opener(_NoRedirect())

    def chunks(response):
        # Ends: each read returns data or b"" at the end, and the deadline bounds the whole.
        for chunk in iter(lambda: response.read(1 << 20), b""):
            if time.monotonic() > deadline:
                raise GcsError("%s %s did not finish in time" % (method, url.split("?", 1)[0]))
            yield chunk

    try:
        with opener.open(request, timeout=timeout) as response:
            if sink is None:
                return response.status, b"".join(chunks(response))
            for chunk in chunks(response):
                sink.write(chunk)
            return response.status, b""
    except urllib.error.HTTPError as exc:
        detail = exc.read(300).decode("utf-8", "replace") if exc.fp else ""
        raise GcsError("HTTP %d %s" % (exc.code, one_line(detail, 200)), exc.code)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise GcsError(str(getattr(exc, "reason", exc)) or type(exc).__name__)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def sign_rs256(private_key_pem: str, data: bytes, work: str) -> bytes:
    """RS256 signature with the openssl CLI. The key lives only in a private temp file that is
    removed as soon as openssl has read it; the data goes through stdin."""
    key_dir = tempfile.mkdtemp(prefix="gcs-key-", dir=work)
    key_path = write_private(os.path.join(key_dir, "key.pem"), private_key_pem)
    try:
        proc = subprocess.run(["openssl", "dgst", "-sha256", "-sign", key_path], input=data,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GcsError("openssl could not sign the token request: %s" % exc)
    finally:
        remove_tree(key_dir)
    if proc.returncode != 0 or not proc.stdout:
        raise GcsError("openssl could not sign the token request: %s" % one_line(proc.stderr.decode("utf-8", "replace"), 200))
    return proc.stdout


def token_from_key_file(path: str, work: str, timeout: float) -> str:
    """OAuth access token for a service-account key: a self-signed JWT exchanged at token_uri."""
    try:
        with open(path, encoding="utf-8") as handle:
            key = json.load(handle)
    except OSError as exc:
        raise GcsError("service-account key file %s cannot be read: %s: this pod runs as %s and %s"
                       % (path, exc.strerror or exc, identity(), describe_owner(path)), cause="key unreadable")
    except ValueError as exc:
        raise GcsError("service-account key file %s is not JSON: %s" % (path, type(exc).__name__),
                       cause="key unusable")
    try:
        email, private_key = key["client_email"], key["private_key"]
        token_uri = key.get("token_uri") or "https://oauth2.googleapis.com/token"
    except (KeyError, TypeError, AttributeError) as exc:
        raise GcsError("service-account key file %s is unusable: %s" % (path, type(exc).__name__),
                       cause="key unusable")
    now = int(time.time())
    header = b64url(json.dumps({"alg": "RS256", "typ": "JWT"}).encode())
    claims = b64url(json.dumps({"iss": email, "scope": GCS_SCOPE, "aud": token_uri,
                                "iat": now, "exp": now + 3600}).encode())
    signing_input = ("%s.%s" % (header, claims)).encode("ascii")
    assertion = "%s.%s" % (signing_input.decode(), b64url(sign_rs256(private_key, signing_input, work)))
    body = urllib.parse.urlencode({"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                                   "assertion": assertion}).encode()
    _, data = http_call("POST", token_uri, timeout, {"Content-Type": "application/x-www-form-urlencoded"}, body)
    return _access_token(data, "token endpoint")


def token_from_metadata(environ: Dict[str, str], timeout: float) -> str:
    """Workload Identity: the pod's service-account token from the GKE metadata server."""
    host = environ.get("KASPR_PACKAGES_GCE_METADATA_HOST") or environ.get("GCE_METADATA_HOST") or METADATA_DEFAULT_HOST
    if "://" not in host:
        host = "http://" + host
    url = host.rstrip("/") + "/computeMetadata/v1/instance/service-accounts/default/token"
    _, data = http_call("GET", url, timeout, {"Metadata-Flavor": "Google"})
    return _access_token(data, "metadata server")


def _access_token(data: bytes, source: str) -> str:
    try:
        token = json.loads(data.decode("utf-8"))["access_token"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise GcsError("the %s returned no access_token" % source)
    if not isinstance(token, str) or not token:
        raise GcsError("the %s returned no access_token" % source)
    return token


class Gcs:
    """The few JSON-API calls the cache needs, against Google or STORAGE_EMULATOR_HOST."""

    def __init__(self, ctx: "Context"):
        gcs = ctx.cfg.gcs
        self.ctx = ctx
        self.bucket = gcs.bucket
        self.endpoint = (ctx.environ.get("STORAGE_EMULATOR_HOST") or GCS_DEFAULT_ENDPOINT).rstrip("/")
        self.timeout = env_seconds(ctx.environ, "KASPR_PACKAGES_GCS_TIMEOUT", 30.0)
        # Each call as a whole, on top of the per-socket timeout above.
        self.call_limit = env_seconds(ctx.environ, "KASPR_PACKAGES_GCS_DEADLINE", 600.0)
        self.object = "%s%s/%s/%s/%s.tar.gz" % (gcs.prefix, ctx.cfg.namespace, ctx.cfg.app,
                                                ctx.cfg.install_key, ctx.tag)
        self._token: Optional[str] = None
        self._token_error: Optional[GcsError] = None

    def headers(self) -> Dict[str, str]:
        if self._token_error is not None:
            raise self._token_error  # one try per run: a second would fail the same way, slowly
        if self._token is None:
            try:
                if self.ctx.cfg.gcs.key_file:
                    self._token = token_from_key_file(self.ctx.cfg.gcs.key_file, self.ctx.work_dir, self.timeout)
                else:
                    self._token = token_from_metadata(self.ctx.environ, self.timeout)
            except GcsError as exc:
                exc.cause = exc.cause or "token failed"
                self._token_error = exc
                raise
            self.ctx.redactor.add(self._token)
        return {"Authorization": "Bearer " + self._token}

    def _object_url(self, upload: bool = False) -> str:
        if upload:
            return "%s/upload/storage/v1/b/%s/o" % (self.endpoint, urllib.parse.quote(self.bucket, safe=""))
        return "%s/storage/v1/b/%s/o/%s" % (self.endpoint, urllib.parse.quote(self.bucket, safe=""),
                                             urllib.parse.quote(self.object, safe=""))

    def metadata(self) -> Optional[dict]:
        """The object's metadata, or None when it does not exist."""
        try:
            _, data = http_call("GET", self._object_url(), self.timeout, self.headers(),
                                deadline=time.monotonic() + self.call_limit)
        except GcsError as exc:
            if exc.status == 404:
                return None
            raise
        try:
            return json.loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise GcsError("object metadata is not JSON")

    def download(self, generation: str, sink, limit: int) -> None:
        """The object's content into ``sink``, refusing more than ``limit`` bytes."""
        url = self._object_url() + "?alt=media&generation=" + urllib.parse.quote(str(generation))
        http_call("GET", url, self.timeout, self.headers(), sink=_CappedSink(sink, limit),
                  deadline=time.monotonic() + self.call_limit)

    def upload_once(self, path: str, replace_generation: Optional[str] = None) -> bool:
        """Create-only upload (ifGenerationMatch=0), or the replacement of exactly one known-bad
        generation. False when another pod's write came first."""
        match = str(replace_generation) if replace_generation else "0"
        query = urllib.parse.urlencode({"uploadType": "media", "name": self.object, "ifGenerationMatch": match})
        headers = dict(self.headers(), **{"Content-Type": "application/gzip",
                                          "Content-Length": str(os.path.getsize(path))})
        try:
            # Streamed from disk: the archive may be as large as the init container's memory.
            with open(path, "rb") as body:
                http_call("POST", self._object_url(upload=True) + "?" + query, self.timeout, headers,
                          body, deadline=time.monotonic() + self.call_limit)
        except GcsError as exc:
            if exc.status == 412:
                return False
            raise
        return True


class _CappedSink:
    """A file that refuses to grow past ``limit`` bytes."""

    def __init__(self, sink, limit: int):
        self.sink = sink
        self.limit = limit
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)
        if self.written > self.limit:
            raise GcsError("the object is larger than maxArchiveSize (%d bytes)" % self.limit)
        self.sink.write(data)


def crc32c(data_file) -> int:
    """CRC32C (Castagnoli) of a file object, table-driven (the standard library has none)."""
    table = _crc32c_table()
    crc = 0xFFFFFFFF
    for chunk in iter(lambda: data_file.read(1 << 20), b""):
        for byte in chunk:
            crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


_CRC32C_TABLE: List[int] = []


def _crc32c_table() -> List[int]:
    if not _CRC32C_TABLE:
        for n in range(256):
            c = n
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
            _CRC32C_TABLE.append(c)
    return _CRC32C_TABLE


def verify_archive(path: str, meta: dict) -> None:
    """Check the download against GCS's MD5 (fast, hashlib) or else its CRC32C."""
    if meta.get("size") is not None and str(os.path.getsize(path)) != str(meta["size"]):
        raise GcsError("size %d differs from the object's %s" % (os.path.getsize(path), meta["size"]))
    with open(path, "rb") as handle:
        if meta.get("md5Hash"):
            digest = hashlib.md5()
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
            if base64.b64encode(digest.digest()).decode() != meta["md5Hash"]:
                raise GcsError("MD5 does not match the object's md5Hash")
            return
        if meta.get("crc32c"):
            expected = int.from_bytes(base64.b64decode(meta["crc32c"]), "big")
            if crc32c(handle) != expected:
                raise GcsError("CRC32C does not match the object's crc32c")
            return
    raise GcsError("the object has neither md5Hash nor crc32c to verify it")


# Extracted data may be this many times maxArchiveSize (Python packages compress 3-5x).
EXTRACT_RATIO = 8


def safe_extract(archive: str, dest: str, max_bytes: int) -> None:
    """Extract a tar.gz member by member into ``dest``, on every supported Python (tarfile's
    data filter only exists from 3.9.17/3.10.12/3.11.4). Only regular files, directories and
    relative symlinks that stay inside ``dest``; no absolute names, no ``..``, nothing written
    through a symlink, no member extracted twice, at most ``max_bytes`` of file content."""
    import stat

    root = os.path.realpath(dest)
    links = []
    total = 0

    def refuse(member: tarfile.TarInfo, why: str):
        return GcsError("archive member %r %s" % (member.name, why))

    with tarfile.open(archive, "r:gz") as tar:
        # Ends: a tar stream has finitely many members, each read once.
        for member in tar:
            parts = [p for p in member.name.split("/") if p not in ("", ".")]
            if member.name.startswith("/") or ".." in parts:
                raise refuse(member, "is absolute or uses '..'")
            if not parts:
                continue  # the archive's own "." entry
            parent = root
            for part in parts[:-1]:
                parent = os.path.join(parent, part)
                try:
                    mode = os.lstat(parent).st_mode
                except FileNotFoundError:
                    os.mkdir(parent, 0o755)
                    continue
                if not stat.S_ISDIR(mode):
                    raise refuse(member, "would be written through a link or file")
            path = os.path.join(parent, parts[-1])
            if os.path.lexists(path):
                if member.isdir() and not os.path.islink(path) and os.path.isdir(path):
                    continue
                raise refuse(member, "appears twice")
            if member.isdir():
                os.mkdir(path, 0o755)
            elif member.isfile():
                total += member.size
                if total > max_bytes:
                    raise refuse(member, "takes the content over %d bytes" % max_bytes)
                source = tar.extractfile(member)
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                fd = os.open(path, flags, 0o755 if member.mode & 0o111 else 0o644)
                with os.fdopen(fd, "wb") as target:
                    shutil.copyfileobj(source, target, 1 << 20)
            elif member.issym():
                target = member.linkname
                relative = os.path.normpath(os.path.join(os.path.dirname(os.path.join(*parts)), target))
                if os.path.isabs(target) or relative == ".." or relative.startswith(".." + os.sep):
                    raise refuse(member, "links outside the build")
                os.symlink(target, path)
                links.append((member, path))
            else:
                raise refuse(member, "is not a file, directory or symlink")
    # A later link can change where an earlier one leads: check where each leads now.
    for member, path in links:
        resolved = os.path.realpath(path)
        if not (resolved == root or resolved.startswith(root + os.sep)):
            raise refuse(member, "links outside the build")


def make_archive(build: str, path: str) -> int:
    with tarfile.open(path, "w:gz", compresslevel=6) as tar:
        for entry in sorted(os.listdir(build)):
            tar.add(os.path.join(build, entry), arcname=entry)
    return os.path.getsize(path)


class Fetch:
    """Outcome of looking in the bucket: ``hit``, or the generation of a corrupt object."""

    def __init__(self, hit: bool, bad_generation: Optional[str] = None):
        self.hit = hit
        self.bad_generation = bad_generation


def gcs_fetch(ctx: Context, gcs: Gcs, dest: str) -> Fetch:
    """Try the cached archive; a hit means ``dest`` holds a verified, complete build."""
    meta = None
    try:
        meta = gcs.metadata()
        if meta is None:
            log("cache miss: gs://%s/%s" % (gcs.bucket, gcs.object))
            return Fetch(False)
        limit = ctx.cfg.gcs.max_archive_size
        size = meta.get("size")
        if size is not None and str(size).isdigit() and int(size) > limit:
            log("cached archive is %s bytes, over maxArchiveSize %d; installing with pip" % (size, limit))
            degrade(ctx, "archive too large", "gs://%s/%s is %s bytes, over maxArchiveSize %d"
                    % (gcs.bucket, gcs.object, size, limit))
            return Fetch(False)
        archive = os.path.join(ctx.work_dir, "download.tar.gz")
        with open(archive, "wb") as sink:
            gcs.download(meta.get("generation", ""), sink, limit)
        verify_archive(archive, meta)
        reset_dir(dest)
        safe_extract(archive, dest, limit * EXTRACT_RATIO)
        os.unlink(archive)
    except GcsError as exc:
        corrupt = meta is not None and exc.status is None and "match" in str(exc)
        status = "HTTP %d" % exc.status if exc.status else "error"
        log("cache %s (%s): %s; installing with pip" % (
            "archive is corrupt" if corrupt else "unavailable", status, ctx.redactor(str(exc))))
        if not corrupt:
            cause = exc.cause or ("lookup failed" if meta is None else "download failed")
            degrade(ctx, cause, str(exc))
        return Fetch(False, meta.get("generation") if corrupt else None)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise classify_os_error(exc, "extracting the cached archive")
        log("cached archive is unusable (%s); installing with pip" % one_line(exc, 200))
        return Fetch(False, meta.get("generation") if meta else None)
    if not build_is_complete(dest, ctx):
        log("cached archive does not hold a complete build for this key and python; installing with pip")
        return Fetch(False, meta.get("generation"))
    log("cache hit: gs://%s/%s" % (gcs.bucket, gcs.object))
    return Fetch(True)


def gcs_store(ctx: Context, gcs: Gcs, build: str, replace_generation: Optional[str]) -> None:
    """Upload the new build unless it is too big; failures are logged, never fatal."""
    archive = os.path.join(ctx.work_dir, "upload.tar.gz")
    try:
        size = make_archive(build, archive)
        limit = ctx.cfg.gcs.max_archive_size
        if size > limit:
            log("archive is %d bytes, over maxArchiveSize %d: not uploaded" % (size, limit))
            degrade(ctx, "archive too large", "the build's archive is %d bytes, over maxArchiveSize %d"
                    % (size, limit))
            return
        if gcs.upload_once(archive, replace_generation):
            log("uploaded gs://%s/%s (%d bytes)" % (gcs.bucket, gcs.object, size))
        else:
            log("another pod uploaded gs://%s/%s first; keeping theirs" % (gcs.bucket, gcs.object))
    except GcsError as exc:
        status = "HTTP %d" % exc.status if exc.status else "error"
        log("upload failed (%s): %s; the pod continues" % (status, ctx.redactor(str(exc))))
        degrade(ctx, exc.cause or "upload failed", str(exc))
    except (OSError, tarfile.TarError) as exc:
        log("could not archive the build for upload (%s); the pod continues" % one_line(exc, 200))
        degrade(ctx, "upload failed", "could not archive the build: %s" % one_line(exc, 200))
    finally:
        if os.path.exists(archive):
            os.unlink(archive)


def run_gcs(ctx: Context) -> Plan:
    """Like emptyDir, but first try the bucket's archive of this build, and upload it after a
    pip install. GCS problems only cost time: the pod falls back to pip."""
    target = ctx.cfg.target
    builds = os.path.join(target, ".builds")
    final = os.path.join(builds, "%s-%s" % (ctx.cfg.install_key, ctx.tag))
    if build_is_complete(final, ctx):
        log("build already present in this pod's volume; skipping GCS and pip")
        link_site(target, final)
        return Plan([], (read_marker(final) or {}).get("distributions", []), [])
    os.makedirs(builds, exist_ok=True)
    tmp = os.path.join(builds, ".tmp-%d" % os.getpid())
    gcs = Gcs(ctx)
    fetched = gcs_fetch(ctx, gcs, tmp)
    if fetched.hit:
        plan = Plan([], (read_marker(tmp) or {}).get("distributions", []), [])
    else:
        plan = install_with_retries(ctx, tmp)
        write_marker(tmp, ctx, plan)
    publish_pod_build(target, tmp, final)
    if not fetched.hit:
        gcs_store(ctx, gcs, final, fetched.bad_generation)
    return plan


# --------------------------------------------------------------------------------------------
# Package sets: build mode (resolve -> lock -> install from the lock -> publish) and restore
# mode (the built set from the cache, else exactly the locked set with hash checking)
# --------------------------------------------------------------------------------------------

SET_ID_RE = re.compile(r"^[0-9a-f]{16}$")
LOCK_FILE_NAME = "pylock.toml"
LOCK_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
LOCK_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+!_-]*$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
LOCK_LINE_WIDTH = 76


def load_set_mode(data: dict) -> Tuple[Optional[Config], Optional[Config]]:
    """The optional ``build`` and ``restore`` objects of the configuration (at most one)."""
    build = restore = None
    if "build" in data:
        obj = _typed(data["build"], dict, "build")
        set_id = _require(obj, "set", str, "build.set")
        if not SET_ID_RE.match(set_id):
            raise _fail_config("build.set", "%s is not 16 lowercase hex characters" % _show(set_id))
        lock_out = obj.get("lockFile")
        if lock_out is not None and not os.path.isabs(_typed(lock_out, str, "build.lockFile")):
            raise _fail_config("build.lockFile", "%s is not an absolute path" % _show(lock_out))
        keep = obj.get("keep")
        if keep is not None:
            keep = _typed(keep, list, "build.keep")
            if len(keep) > 100:
                raise _fail_config("build.keep", "lists %d sets, more than 100" % len(keep))
            for i, kept in enumerate(keep):
                if not isinstance(kept, str) or not SET_ID_RE.match(kept):
                    raise _fail_config("build.keep[%d]" % i, "%s is not 16 lowercase hex characters" % _show(kept))
        image = load_image_target(obj["image"]) if obj.get("image") is not None else None
        build = Config(set=set_id, lock_file=lock_out, image=image, keep=keep)
    if "restore" in data:
        if build is not None:
            raise _fail_config("restore", "cannot be combined with build")
        obj = _typed(data["restore"], dict, "restore")
        set_id = _require(obj, "set", str, "restore.set")
        if not SET_ID_RE.match(set_id):
            raise _fail_config("restore.set", "%s is not 16 lowercase hex characters" % _show(set_id))
        lock_file = _require(obj, "lockFile", str, "restore.lockFile")
        if not os.path.isabs(lock_file):
            raise _fail_config("restore.lockFile", "%s is not an absolute path" % _show(lock_file))
        wait = _typed(obj.get("awaitSeconds", 0), (int, float), "restore.awaitSeconds")
        if not 0 <= wait <= 86400:
            raise _fail_config("restore.awaitSeconds", "%s is not in [0, 86400]" % _show(wait))
        restore = Config(set=set_id, lock_file=lock_file, await_seconds=float(wait))
    return build, restore


class LockedDist:
    """One entry of a lock: a distribution and the one file that provides it."""

    def __init__(self, name: str, version: str, kind: str, filename: str, sha256: str,
                 url: Optional[str] = None, index: Optional[str] = None):
        self.name = name
        self.version = version
        self.kind = kind  # "wheel", "sdist" or "archive" (a direct reference)
        self.filename = filename
        self.sha256 = sha256
        self.url = url
        self.index = index


def _toml_str(value: str) -> str:
    # A JSON string with only ASCII is a valid TOML basic string (same escapes, \uXXXX).
    return json.dumps(value, ensure_ascii=True)


def render_lock(dists: List[LockedDist], set_id: str, install_key: str, tag: str) -> str:
    """A PEP 751 ``pylock.toml`` for ``dists``, in the subset ``parse_lock`` reads back."""
    out = ['lock-version = "1.0"', 'created-by = "kaspr-packages"',
           "requires-python = %s" % _toml_str("==" + platform.python_version()), ""]
    for dist in sorted(dists, key=lambda d: normalize(d.name)):
        out += ["[[packages]]", "name = %s" % _toml_str(dist.name),
                "version = %s" % _toml_str(dist.version)]
        if dist.index:
            out.append("index = %s" % _toml_str(dist.index))
        out.append({"wheel": "[[packages.wheels]]", "sdist": "[packages.sdist]",
                    "archive": "[packages.archive]"}[dist.kind])
        if dist.kind != "archive":
            out.append("name = %s" % _toml_str(dist.filename))
        if dist.url:
            out.append("url = %s" % _toml_str(dist.url))
        out += ["hashes = {sha256 = %s}" % _toml_str(dist.sha256), ""]
    out += ["[tool.kaspr-packages]", "set = %s" % _toml_str(set_id),
            "install-key = %s" % _toml_str(install_key), "python-tag = %s" % _toml_str(tag), ""]
    return "\n".join(out)


LOCK_KV_RE = re.compile(r'^([A-Za-z0-9_-]+)\s*=\s*(".*"|\{\s*sha256\s*=\s*"[0-9a-f]*"\s*\})$')


def _parse_lock_subset(text: str) -> dict:
    """Read the TOML subset ``render_lock`` writes (for Pythons without ``tomllib``)."""
    doc: dict = {"packages": []}
    table: dict = doc
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line == "[[packages]]":
            table = {}
            doc["packages"].append(table)
            continue
        if line in ("[[packages.wheels]]", "[packages.sdist]", "[packages.archive]"):
            if not doc["packages"]:
                raise ValueError("line %d: %s before any [[packages]]" % (number, line))
            pkg = doc["packages"][-1]
            table = {}
            if line == "[[packages.wheels]]":
                pkg.setdefault("wheels", []).append(table)
            else:
                pkg[line[len("[packages."):-1]] = table
            continue
        if line == "[tool.kaspr-packages]":
            table = doc.setdefault("tool", {}).setdefault("kaspr-packages", {})
            continue
        match = LOCK_KV_RE.match(line)
        if not match:
            raise ValueError("line %d is not understood: %s" % (number, one_line(line, 80)))
        key, value = match.group(1), match.group(2)
        if value.startswith("{"):
            table[key] = {"sha256": value.split('"')[1]}
        else:
            table[key] = json.loads(value)
    return doc


def parse_lock(text: str) -> dict:
    try:
        import tomllib  # Python >= 3.11
    except ImportError:
        return _parse_lock_subset(text)
    return tomllib.loads(text)


def lock_dists(doc: dict) -> List[LockedDist]:
    """The distributions of a parsed lock, each checked; a bad entry is ``invalid_config``."""
    dists = []
    packages = doc.get("packages")
    if not isinstance(packages, list):
        raise _fail_config("lock", "has no [[packages]] list")
    for i, pkg in enumerate(packages):
        field = "lock packages[%d]" % i
        if not isinstance(pkg, dict):
            raise _fail_config(field, "is not a table")
        name, version = pkg.get("name"), pkg.get("version")
        if not isinstance(name, str) or not LOCK_NAME_RE.match(name):
            raise _fail_config(field + ".name", "%s is not a distribution name" % _show(name))
        if not isinstance(version, str) or not LOCK_VERSION_RE.match(version):
            raise _fail_config(field + ".version", "%s is not a version" % _show(version))
        if isinstance(pkg.get("wheels"), list) and pkg["wheels"]:
            kind, entry = "wheel", pkg["wheels"][0]
        elif isinstance(pkg.get("sdist"), dict):
            kind, entry = "sdist", pkg["sdist"]
        elif isinstance(pkg.get("archive"), dict):
            kind, entry = "archive", pkg["archive"]
        else:
            raise _fail_config(field, "names no wheel, sdist or archive")
        sha = (entry.get("hashes") or {}).get("sha256") if isinstance(entry, dict) else None
        if not isinstance(sha, str) or not SHA256_RE.match(sha):
            raise _fail_config(field + ".hashes.sha256", "%s is not a sha256 hex digest" % _show(sha))
        url = entry.get("url")
        if url is not None and (not isinstance(url, str) or any(ch.isspace() for ch in url)):
            raise _fail_config(field + ".url", "%s is not a URL" % _show(url))
        dists.append(LockedDist(name, version, kind, str(entry.get("name") or ""), sha, url,
                                pkg.get("index") if isinstance(pkg.get("index"), str) else None))
    return dists


def lock_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def print_lock(text: str) -> None:
    """Print the lock, gzip + base64, between marker lines: the controller reads it from the
    build pod's log (a termination message is capped at 4 KiB)."""
    import gzip
    blob = base64.b64encode(gzip.compress(text.encode("utf-8"), mtime=0)).decode("ascii")
    log("LOCK BEGIN sha256 %s" % lock_sha256(text))
    for start in range(0, len(blob), LOCK_LINE_WIDTH):
        log("LOCK " + blob[start:start + LOCK_LINE_WIDTH])
    log("LOCK END")


def extract_printed_lock(log_text: str) -> Optional[str]:
    """The lock that ``print_lock`` wrote into ``log_text``, verified against its sha256."""
    import gzip
    begin = "%s LOCK BEGIN sha256 " % PREFIX
    digest, chunks = None, []
    for line in log_text.splitlines():
        if line.startswith(begin):
            digest, chunks = line[len(begin):].strip(), []
        elif digest is not None and line == "%s LOCK END" % PREFIX:
            try:
                text = gzip.decompress(base64.b64decode("".join(chunks))).decode("utf-8")
            except (ValueError, OSError, EOFError, zlib.error):
                return None
            return text if lock_sha256(text) == digest else None
        elif digest is not None and line.startswith("%s LOCK " % PREFIX):
            chunks.append(line[len(PREFIX) + 6:])
    return None


class _Links(__import__("html.parser").parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs: List[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            for key, value in attrs:
                if key == "href" and value:
                    self.hrefs.append(value)


def configured_indexes(ctx: "Context") -> List[str]:
    if ctx.cfg.index_url:
        first = [ctx.cfg.index_url]
    else:  # the image's or pip's default index, as pip itself used it
        first = [ctx.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple/"]
    return first + list(ctx.cfg.extra_index_urls)


def index_page(ctx: "Context", index: str, project: str, timeout: float):
    """The project's PEP 503 page on ``index`` as (final URL, HTML), or None."""
    import ssl
    url = index.rstrip("/") + "/" + project + "/"
    request = urllib.request.Request(url, headers={"Accept": "text/html"})
    if ctx.credentials and ctx.cfg.index_url and same_host(index, ctx.cfg.index_url):
        token = base64.b64encode(("%s:%s" % ctx.credentials).encode("utf-8")).decode("ascii")
        request.add_header("Authorization", "Basic " + token)
    handlers: list = [_NoRedirect()]
    host = urllib.parse.urlsplit(index)
    if host.hostname in ctx.cfg.trusted_hosts or host.netloc.rsplit("@", 1)[-1] in ctx.cfg.trusted_hosts:
        handlers.append(urllib.request.HTTPSHandler(context=ssl._create_unverified_context()))
    try:
        with urllib.request.build_opener(*handlers).open(request, timeout=timeout) as response:
            return url, response.read(32 << 20).decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError):
        return None


def locate_files(ctx: "Context", dists: List[LockedDist], deadline: float) -> None:
    """Fill in each index distribution's file URL and index from the index pages (pages only:
    the files themselves were downloaded once, by pip). A file whose page states another sha256
    than the one computed over the downloaded file is an ``integrity`` failure."""
    indexes = configured_indexes(ctx)
    for dist in dists:
        if dist.kind == "archive":
            continue
        for index in indexes:
            remaining = deadline - time.monotonic()
            if remaining <= 1:
                log("warning: no time left to look up file URLs; the lock names files without URL")
                return
            page = index_page(ctx, index, normalize(dist.name), min(10.0, remaining))
            if page is None:
                continue
            links = _Links()
            links.feed(page[1])
            found = None
            for href in links.hrefs:
                absolute = urllib.parse.urljoin(page[0], href)
                path = urllib.parse.urlsplit(absolute).path
                if urllib.parse.unquote(path.rsplit("/", 1)[-1]) == dist.filename:
                    found = absolute
                    break
            if found is None:
                continue
            url, _, fragment = found.partition("#")
            stated = dict(p.split("=", 1) for p in fragment.split("&") if "=" in p).get("sha256")
            if stated and stated.lower() != dist.sha256:
                raise InstallError("integrity", "%s: the index states sha256 %s, the downloaded file has %s"
                                   % (dist.filename, stated, dist.sha256))
            dist.url = clean_lock_url(ctx, url)
            dist.index = describe_url(index)
            break
        else:
            log("warning: %s was found on no configured index page; the lock names it without URL" % dist.filename)


def clean_lock_url(ctx: "Context", url: Optional[str]) -> Optional[str]:
    """A URL fit for the lock: no userinfo, and nothing that came from an expanded secret."""
    if not url:
        return None
    url = describe_url(url)
    return url if ctx.redactor(url) == url else None


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def offline_requirement(requirement: str) -> str:
    """The requirement for resolving from the downloaded files only: a named direct reference
    becomes its name (and extras, and marker); everything else stays."""
    head, sep, marker = requirement.partition(";")
    match = NAMED_URL_RE.match(head.strip())
    if match and requirement_url(requirement) is not None:
        name = head.split("@", 1)[0].strip()
        return name + ((" ;" + marker) if sep else "")
    return requirement


def set_pip_env(ctx: "Context") -> Dict[str, str]:
    env = pip_child_env(ctx.index.env, ctx.work_dir)
    if ctx.index.netrc is not None:
        env["NETRC"] = write_private(os.path.join(ctx.work_dir, "netrc"), ctx.index.netrc)
    return env


def set_pip_args(command: str, ctx: "Context") -> List[str]:
    return [command, "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
            "--cache-dir", os.path.join(ctx.work_dir, "pip-cache")]


# uv, for the installs from a lock (``installTool``: pip, uv or auto). Resolution stays with
# pip: its report, resolved against the image's own distributions, is what keeps the image's
# distributions out of a set and logs each override; uv has no such report.

UV_REQUIREMENT = "uv>=0.5"
UV_MIN_VERSION = (0, 5)
# The image's UV_* variables are dropped (they could move or reshape the install) except these.
UV_ENV_KEPT = ("UV_NATIVE_TLS", "UV_HTTP_TIMEOUT", "UV_HTTP_RETRIES", "UV_CONCURRENT_DOWNLOADS",
               "UV_CONCURRENT_INSTALLS")
UV_PROGRAM_RE = re.compile(r"^uv-[^/]+\.data/scripts/uv$")


def uv_version(path: str) -> Optional[Tuple[int, ...]]:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30,
                             env={"PATH": os.environ.get("PATH", ""), "UV_NO_CONFIG": "1"})
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.match(r"^uv (\d+)\.(\d+)(?:\.(\d+))?", out.stdout.strip())
    if out.returncode != 0 or not match:
        return None
    return tuple(int(part or 0) for part in match.groups())


def image_uv() -> Optional[Tuple[str, Tuple[int, ...]]]:
    """uv as the image has it: beside its python (a venv's or the image's scripts directory),
    else on PATH."""
    candidates = [os.path.join(sysconfig.get_path("scripts") or "", "uv"), shutil.which("uv") or ""]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            version = uv_version(path)
            if version is not None and version >= UV_MIN_VERSION:
                return path, version
    return None


def uv_from_index(ctx: "Context", deadline: float) -> Tuple[str, Tuple[int, ...]]:
    """The uv program out of the newest uv wheel the configured indexes serve for this image
    (fetched by the image's pip with the run's credentials, like any package)."""
    dest = os.path.join(ctx.work_dir, "uv")
    reset_dir(dest)
    result = run_pip(set_pip_args("download", ctx) + [
        "--no-deps", "--only-binary", ":all:", "--dest", dest, "-r", "/dev/stdin"],
        UV_REQUIREMENT + "\n", set_pip_env(ctx), deadline, ctx.redactor)
    if result.returncode != 0:
        raise pip_failure(result, "download of %s" % UV_REQUIREMENT)
    wheels = sorted(e for e in os.listdir(dest) if e.endswith(".whl"))
    if not wheels:
        raise InstallError("package_not_found", "the index served no wheel for %s" % UV_REQUIREMENT)
    program = os.path.join(dest, "bin", "uv")
    os.makedirs(os.path.dirname(program))
    try:
        with zipfile.ZipFile(os.path.join(dest, wheels[0])) as wheel:
            member = next((n for n in wheel.namelist() if UV_PROGRAM_RE.match(n)), None)
            if member is None:
                raise InstallError("package_not_found", "%s holds no uv program" % wheels[0])
            with wheel.open(member) as source, open(program, "wb") as out:
                shutil.copyfileobj(source, out)
            record = next((n for n in wheel.namelist() if n.endswith(".dist-info/RECORD")), None)
            recorded = [line.split(",") for line in
                        (wheel.read(record).decode("utf-8", "replace").splitlines() if record else [])]
    except zipfile.BadZipFile as exc:
        raise InstallError("integrity", "%s is not a readable wheel: %s" % (wheels[0], exc))
    # The wheel's RECORD names the program's sha256: check what was extracted against it.
    wanted = next((fields[1] for fields in recorded if len(fields) >= 2 and fields[0] == member), "")
    hasher = hashlib.sha256()
    with open(program, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(chunk)
    digest = base64.urlsafe_b64encode(hasher.digest()).rstrip(b"=").decode()
    if wanted != "sha256=" + digest:
        raise InstallError("integrity", "the uv program of %s does not match the wheel's RECORD" % wheels[0])
    os.chmod(program, 0o700)
    version = uv_version(program)
    if version is None:
        raise InstallError("unknown", "the uv program of %s does not run on this image" % wheels[0],
                           retryable=False)
    return program, version


def lock_installer(ctx: "Context", deadline: float) -> Optional[str]:
    """The uv program the installs from a lock use, or None for pip; decided once per run.
    ``auto`` falls back to pip when uv cannot be had; ``uv`` fails, saying why."""
    if ctx.uv_decided:
        return ctx.uv
    wanted = ctx.cfg.install_tool
    if wanted != "pip":
        found, source = image_uv(), "the image"
        if found is None:
            try:
                found, source = uv_from_index(ctx, deadline), "the index"
            except InstallError as exc:
                if wanted == "uv":
                    raise InstallError(exc.category, "installTool is uv, but the image has no uv >= %s and "
                                       "the index serves none: %s" % (".".join(map(str, UV_MIN_VERSION)), exc.message),
                                       retryable=exc.retryable)
                log("uv is not in the image and could not be had from the index (%s: %s); installing with pip"
                    % (exc.category, one_line(ctx.redactor(exc.message), 200)))
        if found is not None:
            ctx.uv = found[0]
            log("installing with uv %s from %s" % (".".join(map(str, found[1])), source))
    ctx.uv_decided = True
    return ctx.uv


def uv_env(ctx: "Context") -> Dict[str, str]:
    """pip's environment (netrc for the credentials, TMPDIR, the image's PIP_* settings)
    carried over to uv's names, with uv's own configuration files and downloads off."""
    env = {k: v for k, v in set_pip_env(ctx).items() if not k.startswith("UV_") or k in UV_ENV_KEPT}
    for pip_name, uv_name in (("PIP_INDEX_URL", "UV_DEFAULT_INDEX"), ("PIP_EXTRA_INDEX_URL", "UV_INDEX"),
                              ("PIP_TRUSTED_HOST", "UV_INSECURE_HOST"), ("PIP_CERT", "SSL_CERT_FILE")):
        if env.get(pip_name) and uv_name not in env:
            env[uv_name] = env[pip_name]
    env.update({
        "UV_NO_CONFIG": "1", "UV_PYTHON_DOWNLOADS": "never", "UV_NO_PROGRESS": "1", "NO_COLOR": "1",
        # pip looks for the best match across all indexes; uv would stop at the first index
        # that knows the project. The hashes decide either way.
        "UV_INDEX_STRATEGY": "unsafe-best-match",
        "UV_LINK_MODE": "copy", "UV_CACHE_DIR": os.path.join(ctx.work_dir, "uv-cache"),
    })
    return env


def install_locked(ctx: "Context", dest: str, pinned: str, deadline: float, wheels: Optional[str] = None) -> None:
    """Install exactly the pinned, hashed lines into ``dest`` without resolving: with uv when
    the configuration asks for it and uv can be had, else with pip. ``wheels``: a local
    directory that holds every file (no index)."""
    local = ["--no-index", "--find-links", wheels] if wheels else []
    uv = lock_installer(ctx, deadline)
    if uv is not None:
        result = run_pip(["pip", "install", "--python", sys.executable, "--target", dest, "--no-deps",
                          "--require-hashes"] + local + ["-r", "/dev/stdin"],
                         pinned, uv_env(ctx), deadline, ctx.redactor, program=[uv])
    else:
        result = run_pip(set_pip_args("install", ctx) + local + [
            "--require-hashes", "--no-deps", "--no-warn-script-location", "--target", dest,
            "-r", "/dev/stdin"], pinned, set_pip_env(ctx), deadline, ctx.redactor)
    tool = "pip" if uv is None else "uv"
    if result.returncode != 0:
        raise pip_failure(result, "install from the lock", tool)
    log("%s install from the lock took %.2fs" % (tool, result.seconds))


def build_attempt(ctx: "Context", dest: str, deadline: float) -> Plan:
    """Resolve, lock and install one set: every distribution is downloaded once into a wheel
    directory, resolved against the image from there, locked, and installed from the lock
    with hash checking and without resolving again."""
    for req in ctx.expanded:
        url = requirement_url(req)
        if url is not None and (url.startswith("git@") or "+" in url.split("://", 1)[0] or url.startswith("ssh://")):
            raise _fail_config("packages", "%s is a VCS requirement, which a lock cannot pin by file "
                               "hash; publish it as a wheel or use an archive URL" % ctx.redactor(req))
    if ctx.pip_version < MIN_PIP_FOR_RESOLVE:
        raise InstallError("unknown", "pip %s cannot resolve without installing; builds need pip >= 22.2"
                           % ".".join(map(str, ctx.pip_version)), retryable=False)
    wheels = os.path.join(ctx.work_dir, "wheels")
    reset_dir(wheels)
    env = set_pip_env(ctx)
    requirements = "".join(pip_requirement(line) + "\n" for line in ctx.expanded)
    log("downloading the configuration's distributions (pip %s)" % ".".join(map(str, ctx.pip_version)))
    result = run_pip(set_pip_args("download", ctx) + ["--dest", wheels, "-r", "/dev/stdin"],
                     requirements, env, deadline, ctx.redactor)
    if result.returncode != 0:
        error = pip_failure(result, "download")
        if error.category == "package_not_found":
            error = diagnose_not_found(ctx, result.lines, deadline) or error
        raise error
    log("pip download took %.2fs" % result.seconds)

    offline = "".join(offline_requirement(pip_requirement(line)) + "\n" for line in ctx.expanded)
    result = run_pip(set_pip_args("install", ctx) + [
        "--dry-run", "--report", "{report}", "--no-index", "--find-links", wheels, "-r", "/dev/stdin"],
        offline, env, deadline, ctx.redactor, want_report=True)
    if result.returncode != 0:
        raise pip_failure(result, "resolve")
    plan = plan_from_report(result.report, ctx.expanded, ctx.installed)
    report = json.loads(result.report)
    direct = {normalize(offline_requirement(r).split("[")[0].split(";")[0].strip()): r
              for r in ctx.expanded if requirement_url(r) is not None}
    dists = []
    for item in report.get("install", []):
        meta = item.get("metadata") or {}
        url = (item.get("download_info") or {}).get("url", "")
        filename = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
        path = os.path.join(wheels, filename)
        if not filename or not os.path.isfile(path):
            raise InstallError("unknown", "the resolver chose %s, which is not among the downloaded files" % (url or meta.get("name")))
        name = meta["name"]
        requirement = direct.get(normalize(name))
        kind = "archive" if requirement else ("wheel" if filename.endswith(".whl") else "sdist")
        dist = LockedDist(name, meta["version"], kind, filename, file_sha256(path))
        if requirement:
            dist.url = clean_lock_url(ctx, requirement_url(requirement))
        dists.append(dist)
    for override in plan.overrides:
        log("override: " + override)
    locate_files(ctx, dists, deadline)
    lock = render_lock(dists, ctx.cfg.build.set, ctx.cfg.install_key, ctx.tag)
    log("locked %d distributions: %s" % (len(dists), ", ".join("%s %s" % (d.name, d.version) for d in dists)))
    if dists:
        pinned = "".join("%s==%s --hash=sha256:%s\n" % (d.name, d.version, d.sha256) for d in dists)
        install_locked(ctx, dest, pinned, deadline, wheels)
    plan.lock = lock
    return plan


def restore_attempt(ctx: "Context", dest: str, deadline: float, lock: str) -> Plan:
    """Install exactly the locked set: pinned, hash-checked, no dependency resolution."""
    dists = lock_dists(parse_lock(lock))
    direct = {}
    for req in ctx.expanded:
        if requirement_url(req) is not None:
            direct[normalize(offline_requirement(req).split("[")[0].split(";")[0].strip())] = req
    lines = []
    for dist in dists:
        if dist.kind == "archive":
            source = dist.url or requirement_url(direct.get(normalize(dist.name), "") or "")
            if not source:
                raise _fail_config("lock", "%s is a direct reference without URL, and no package "
                                   "string names it" % dist.name)
            lines.append("%s @ %s --hash=sha256:%s" % (dist.name, source, dist.sha256))
        else:
            lines.append("%s==%s --hash=sha256:%s" % (dist.name, dist.version, dist.sha256))
    names = ["%s %s" % (d.name, d.version) for d in dists]
    if lines:
        log("installing the locked set (%d distributions, hash-checked, no resolution): %s"
            % (len(lines), ", ".join(names)))
        install_locked(ctx, dest, "".join(l + "\n" for l in lines), deadline)
    return Plan(lines, names, [])


def set_attempts(ctx: "Context", dest: str, attempt) -> Plan:
    """``attempt(dest, deadline)`` with 1 + retries attempts, each bounded by the timeout."""
    attempts = 1 + ctx.cfg.retries
    for number in range(1, attempts + 1):
        reset_dir(dest)
        started = time.monotonic()
        log("attempt %d/%d (timeout %gs)" % (number, attempts, ctx.cfg.timeout))
        try:
            plan = attempt(dest, started + ctx.cfg.timeout)
            scrub_secrets(dest, ctx.redactor)
            return plan
        except InstallError as exc:
            log("attempt %d/%d failed after %.1fs: %s: %s"
                % (number, attempts, time.monotonic() - started, exc.category, ctx.redactor(exc.message)))
            if number == attempts or not exc.retryable:
                raise
            time.sleep(backoff_delay(number, ctx.environ))
        except OSError as exc:
            raise classify_os_error(exc, "installing")
    raise InstallError("unknown", "no attempt was made")


def write_set_marker(build: str, ctx: "Context", plan: Plan, set_id: str, lock: str) -> None:
    with open(os.path.join(build, LOCK_FILE_NAME), "w", encoding="utf-8") as handle:
        handle.write(lock)
    write_marker(build, ctx, plan)
    path = os.path.join(build, BUILD_MARKER)
    with open(path, encoding="utf-8") as handle:
        marker = json.load(handle)
    marker["set"] = set_id
    marker["lockSha256"] = lock_sha256(lock)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(marker, handle, indent=1)


def set_is_complete(build: str, ctx: "Context", set_id: str) -> bool:
    marker = read_marker(build)
    return build_is_complete(build, ctx) and bool(marker) and marker.get("set") == set_id


def pvc_set_dir(ctx: "Context", set_id: str) -> str:
    return os.path.join(ctx.cfg.cache_dir, "sets", set_id, ctx.tag)


def gcs_set_object(ctx: "Context", set_id: str) -> str:
    gcs = ctx.cfg.gcs
    return "%s%s/%s/sets/%s/%s.tar.gz" % (gcs.prefix, ctx.cfg.namespace, ctx.cfg.app, set_id, ctx.tag)


def run_build(ctx: "Context") -> Plan:
    """Build mode (a build Job): resolve, lock, install from the lock, publish to the cache."""
    set_id = ctx.cfg.build.set
    builds = os.path.join(ctx.cfg.target, ".builds")
    os.makedirs(builds, exist_ok=True)
    tmp = os.path.join(builds, ".tmp-set-%d" % os.getpid())
    plan = set_attempts(ctx, tmp, lambda dest, deadline: build_attempt(ctx, dest, deadline))
    lock = plan.lock
    write_set_marker(tmp, ctx, plan, set_id, lock)
    # The job's own volume holds the set too (``site``), like a pod's; the cache gets a copy.
    final = os.path.join(builds, "%s-%s" % (set_id, ctx.tag))
    publish_pod_build(ctx.cfg.target, tmp, final)
    tmp = final
    if ctx.cfg.mode == "pvc":
        publish_pvc_set(ctx, set_id, tmp)
        if ctx.cfg.build.keep is not None:
            prune_sets(ctx, set([set_id] + ctx.cfg.build.keep))
    elif ctx.cfg.mode == "gcs":
        gcs = Gcs(ctx)
        gcs.object = gcs_set_object(ctx, set_id)
        archive = os.path.join(ctx.work_dir, "set.tar.gz")
        size = make_archive(tmp, archive)
        if size > ctx.cfg.gcs.max_archive_size:
            raise InstallError("cache_error", "the set's archive is %d bytes, over maxArchiveSize %d"
                               % (size, ctx.cfg.gcs.max_archive_size), retryable=False)
        try:
            uploaded = gcs.upload_once(archive, None)
        except GcsError as exc:
            raise InstallError("cache_error", "uploading gs://%s/%s failed: %s"
                               % (gcs.bucket, gcs.object, ctx.redactor(str(exc))), retryable=False)
        log("uploaded gs://%s/%s (%d bytes)" % (gcs.bucket, gcs.object, size) if uploaded
            else "gs://%s/%s already exists; keeping it" % (gcs.bucket, gcs.object))
        if ctx.cfg.build.keep is not None:
            prune_gcs_sets(ctx, gcs, set([set_id] + ctx.cfg.build.keep))
    if ctx.cfg.build.image is not None:
        plan.image = publish_image(ctx, set_id, tmp)
    if ctx.cfg.build.lock_file:
        with open(ctx.cfg.build.lock_file, "w", encoding="utf-8") as handle:
            handle.write(lock)
    print_lock(lock)
    plan.lock_sha256 = lock_sha256(lock)
    return plan


def publish_pvc_set(ctx: "Context", set_id: str, built: str) -> None:
    final = pvc_set_dir(ctx, set_id)
    parent = os.path.dirname(final)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise InstallError("cache_error", "cannot use cache directory %s: %s"
                           % (ctx.cfg.cache_dir, exc.strerror or exc), retryable=False)
    lock = FileLock(os.path.join(parent, ".%s.lock" % ctx.tag))
    if not lock.acquire(lock_wait_limit(ctx)):
        raise InstallError("lock_timeout", "another build held the lock of set %s" % set_id, retryable=False)
    try:
        if set_is_complete(final, ctx, set_id):
            log("set %s/%s is already published" % (set_id, ctx.tag))
            return
        staging = os.path.join(parent, ".tmp-%s-%d" % (ctx.tag, os.getpid()))
        remove_tree(staging)
        shutil.copytree(built, staging, symlinks=True)
        fsync_dir(staging)
        os.rename(staging, final)
        fsync_dir(parent)
        log("published set %s/%s" % (set_id, ctx.tag))
    finally:
        lock.release()


def prune_sets(ctx: "Context", keep: set) -> None:
    """Remove the sets published on the PVC that the app's lock ConfigMap no longer lists
    (``keep``: the controller's list when it created this Job, plus this build's set). A set
    stays while a live lease names one of its builds (a running pod uses it), or while anything
    in it changed within the prune grace period: a set published after the list was made (a
    newer build that finished first), one being published, or one a pod restored recently.
    Failures only log: pruning never fails a build."""
    grace = env_seconds(ctx.environ, "KASPR_PACKAGES_PRUNE_GRACE_SECONDS", 24 * 3600.0)
    cache = ctx.cfg.cache_dir
    sets_dir = os.path.join(cache, "sets")
    lock = FileLock(os.path.join(cache, ".prune.lock"), group=ctx.cache_group)
    doomed = []
    try:
        # Pods hold this lock shared for milliseconds while they check and lease a build.
        if not lock.acquire(60.0):
            log("warning: pruning old sets skipped: the cache's prune lock stayed busy for 60s")
            return
    except OSError as exc:
        log("warning: pruning old sets skipped: %s" % exc)
        return
    try:
        referenced = live_lease_builds(os.path.join(cache, "leases"), grace)
        in_use = set(rel.split("/")[1] for rel in referenced
                     if isinstance(rel, str) and rel.startswith("sets/") and rel.count("/") >= 2)
        now = time.time()
        for set_id in sorted(os.listdir(sets_dir)) if os.path.isdir(sets_dir) else []:
            path = os.path.join(sets_dir, set_id)
            if not SET_ID_RE.match(set_id) or set_id in keep or not os.path.isdir(path):
                continue
            if set_id in in_use:
                log("keeping set %s: a pod's lease still uses it" % set_id)
                continue
            newest = max([os.lstat(path).st_mtime]
                         + [os.lstat(os.path.join(path, entry)).st_mtime for entry in os.listdir(path)])
            if now - newest <= grace:
                continue
            trash = os.path.join(cache, ".trash-set-%s-%d" % (set_id, os.getpid()))
            os.rename(path, trash)  # under the lock: no pod can lease it any more
            doomed.append(set_id)
    except OSError as exc:
        log("warning: pruning old sets failed: %s" % exc)
    finally:
        lock.release()
    for set_id in doomed:
        remove_tree(os.path.join(cache, ".trash-set-%s-%d" % (set_id, os.getpid())))
        log("pruned set %s: no longer kept by the app and used by no pod" % set_id)


def restored(ctx: "Context", build: str) -> Plan:
    return Plan([], (read_marker(build) or {}).get("distributions", []), [])


def run_restore(ctx: "Context") -> Plan:
    """Restore mode (the app's pods): the built set from the cache without the index, else
    (emptyDir, or a cache without the set) exactly the locked set, hash-checked."""
    spec = ctx.cfg.restore
    set_id = spec.set
    target = ctx.cfg.target
    builds = os.path.join(target, ".builds")
    final = os.path.join(builds, "%s-%s" % (set_id, ctx.tag))
    if set_is_complete(final, ctx, set_id):
        log("set %s already present in this pod's volume; skipping pip" % set_id)
        link_site(target, final)
        return restored(ctx, final)
    os.makedirs(builds, exist_ok=True)
    tmp = os.path.join(builds, ".tmp-%d" % os.getpid())
    deadline = time.monotonic() + spec.await_seconds
    gcs = None
    if ctx.cfg.mode == "gcs":
        gcs = Gcs(ctx)
        gcs.object = gcs_set_object(ctx, set_id)
    waited = False
    while True:
        if ctx.cfg.mode == "pvc":
            build = pvc_set_dir(ctx, set_id)
            if set_is_complete(build, ctx, set_id) and use_build(ctx, build):
                log("set %s/%s restored from the cache" % (set_id, ctx.tag))
                return restored(ctx, build)
        if gcs is not None and gcs_fetch(ctx, gcs, tmp).hit and set_is_complete(tmp, ctx, set_id):
            publish_pod_build(target, tmp, final)
            log("set %s/%s restored from the bucket" % (set_id, ctx.tag))
            return restored(ctx, final)
        if os.path.isfile(spec.lock_file):
            break
        if time.monotonic() >= deadline:
            raise InstallError("lock_timeout", "set %s is not built yet: no lock at %s%s"
                               % (set_id, spec.lock_file,
                                  " after waiting %.0fs" % spec.await_seconds if spec.await_seconds else ""),
                               retryable=False)
        if not waited:
            log("waiting up to %.0fs for set %s to be built" % (spec.await_seconds, set_id))
            waited = True
        time.sleep(2.0)
    with open(spec.lock_file, encoding="utf-8") as handle:
        lock = handle.read()
    try:
        doc = parse_lock(lock)
    except ValueError as exc:
        raise _fail_config("lock", "%s is not a readable pylock.toml: %s" % (spec.lock_file, one_line(exc, 200)))
    locked_set = ((doc.get("tool") or {}).get("kaspr-packages") or {}).get("set")
    if locked_set != set_id:
        raise _fail_config("lock", "%s is the lock of set %s, not %s" % (spec.lock_file, _show(locked_set), set_id))
    locked_tag = ((doc.get("tool") or {}).get("kaspr-packages") or {}).get("python-tag")
    if locked_tag != ctx.tag:
        log("warning: set %s was built for %s; this pod's python is %s (hash checks still apply)"
            % (set_id, locked_tag, ctx.tag))
    plan = set_attempts(ctx, tmp, lambda dest, deadline_: restore_attempt(ctx, dest, deadline_, lock))
    write_set_marker(tmp, ctx, plan, set_id, lock)
    publish_pod_build(target, tmp, final)
    return plan


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

# kaspr-packages: build-only begin (pods get these lines blank; only build Jobs prune and publish)

# --------------------------------------------------------------------------------------------
# Build Jobs: pruning the bucket's set archives no lock keeps
# --------------------------------------------------------------------------------------------

def gcs_list_objects(gcs: "Gcs", prefix: str, max_pages: int = 20) -> List[dict]:
    """Name, generation and update time of the objects under ``prefix`` (a bounded number
    of pages of 1000)."""
    items: List[dict] = []
    token = None
    for _ in range(max_pages):
        query = {"prefix": prefix, "maxResults": "1000",
                 "fields": "items(name,generation,updated),nextPageToken"}
        if token:
            query["pageToken"] = token
        url = "%s/storage/v1/b/%s/o?%s" % (gcs.endpoint, urllib.parse.quote(gcs.bucket, safe=""),
                                           urllib.parse.urlencode(query))
        _, data = http_call("GET", url, gcs.timeout, gcs.headers(),
                            deadline=time.monotonic() + gcs.call_limit)
        try:
            page = json.loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise GcsError("the object listing is not JSON")
        items.extend(item for item in page.get("items") or [] if isinstance(item, dict))
        token = page.get("nextPageToken")
        if not token:
            break
    return items


def gcs_delete(gcs: "Gcs", name: str, generation: str) -> bool:
    """Delete exactly this generation of an object; False when it is gone or was replaced."""
    url = "%s/storage/v1/b/%s/o/%s?ifGenerationMatch=%s" % (
        gcs.endpoint, urllib.parse.quote(gcs.bucket, safe=""), urllib.parse.quote(name, safe=""),
        urllib.parse.quote(str(generation), safe=""))
    try:
        http_call("DELETE", url, gcs.timeout, gcs.headers(), deadline=time.monotonic() + gcs.call_limit)
    except GcsError as exc:
        if exc.status in (404, 412):
            return False
        raise
    return True


RFC3339_RE = re.compile(r"^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.\d+)?(Z|[+-]\d\d:\d\d)$")


def rfc3339_seconds(text) -> Optional[float]:
    """Seconds since the epoch of a timestamp such as GCS's ``updated``; None if it is not one."""
    match = RFC3339_RE.match(text) if isinstance(text, str) else None
    if not match:
        return None
    import calendar

    fields = [int(part) for part in match.groups()[:6]]
    try:
        seconds = calendar.timegm((fields[0], fields[1], fields[2], fields[3], fields[4], fields[5], 0, 0, 0))
    except (ValueError, OverflowError):
        return None
    zone = match.group(7)
    if zone != "Z":
        offset = int(zone[1:3]) * 3600 + int(zone[4:6]) * 60
        seconds -= offset if zone[0] == "+" else -offset
    return float(seconds)


def prune_gcs_sets(ctx: "Context", gcs: "Gcs", keep: set) -> None:
    """Delete the app's set archives in the bucket that the lock ConfigMap no longer lists
    (``keep``, as for the PVC). The bucket has no leases: an archive stays while it is younger
    than the prune grace period (it may belong to a set published after the list was made),
    and a pod whose set was deleted installs exactly its locked set from the index instead.
    Each deletion names the generation it saw, so a re-upload is never deleted. Failures only
    log: pruning never fails a build."""
    grace = env_seconds(ctx.environ, "KASPR_PACKAGES_PRUNE_GRACE_SECONDS", 24 * 3600.0)
    prefix = "%s%s/%s/sets/" % (ctx.cfg.gcs.prefix, ctx.cfg.namespace, ctx.cfg.app)
    now = time.time()
    try:
        for item in gcs_list_objects(gcs, prefix):
            name, generation = item.get("name"), item.get("generation")
            parts = name[len(prefix):].split("/") if isinstance(name, str) and name.startswith(prefix) else []
            if len(parts) != 2 or not SET_ID_RE.match(parts[0]) or parts[0] in keep or not generation:
                continue
            updated = rfc3339_seconds(item.get("updated"))
            if updated is None or now - updated <= grace:
                continue
            if gcs_delete(gcs, name, generation):
                log("pruned gs://%s/%s: set %s is no longer kept by the app" % (gcs.bucket, name, parts[0]))
    except GcsError as exc:
        log("warning: pruning old sets in gs://%s/%s skipped: %s" % (gcs.bucket, prefix, ctx.redactor(str(exc))))


# --------------------------------------------------------------------------------------------
# Image mode: a built set published as an OCI image, one layer per distribution
# --------------------------------------------------------------------------------------------

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REPOSITORY_RE = re.compile(r"^(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]{1,5})?)/"
                           r"(?P<name>%s(?:/%s)*)$" % (_PATH_COMPONENT, _PATH_COMPONENT))
# Every file in a layer gets this time, so a distribution gives the same layer in every build.
LAYER_MTIME = 1
IMAGE_MARKER = PREFIX + " IMAGE "
IMAGE_APP_ANNOTATION = "io.kaspr.packages.app"
# A set's tag: ``<set id>-<python tag>``.
IMAGE_TAG_RE = re.compile(r"^(?P<set>[0-9a-f]{16})-")
# Retention reads at most this many tags of the repository (pages of TAG_PAGE).
TAG_PAGE = 1000
TAG_PAGES = 20


def load_image_target(obj) -> Config:
    """``build.image``: where the build publishes its set as an OCI image."""
    obj = _typed(obj, dict, "build.image")
    repository = _require(obj, "repository", str, "build.image.repository")
    if not REPOSITORY_RE.match(repository) or len(repository) > 255:
        raise _fail_config("build.image.repository", "%s is not <registry host[:port]>/<path> in lowercase"
                           % _show(repository))
    secret = obj.get("dockerConfig")
    if secret is not None and not os.path.isabs(_typed(secret, str, "build.image.dockerConfig")):
        raise _fail_config("build.image.dockerConfig", "%s is not an absolute path" % _show(secret))
    plain_http = _typed(obj.get("plainHttp", False), bool, "build.image.plainHttp")
    return Config(repository=repository, docker_config=secret, plain_http=plain_http)


def image_tag(set_id: str, tag: str) -> str:
    """``<set id>-<python tag>``: a set is published once per Python ABI and platform."""
    return ("%s-%s" % (set_id, tag))[:128]


def image_platform() -> Tuple[str, str]:
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
            "ppc64le": "ppc64le", "s390x": "s390x", "armv7l": "arm"}.get(machine, machine)
    return "linux", arch


def _read_record(root: str, dist_info: str) -> List[str]:
    """Files of one distribution from its RECORD, relative to ``root`` and inside it."""
    import csv
    paths = []
    try:
        with open(os.path.join(root, dist_info, "RECORD"), encoding="utf-8", newline="") as handle:
            rows = list(csv.reader(handle))
    except OSError:
        rows = []
    for row in rows:
        if not row or not row[0]:
            continue
        path = os.path.normpath(row[0])
        if os.path.isabs(path) or path == ".." or path.startswith("../"):
            continue
        paths.append(path)
    return paths


def compile_deterministic(root: str, paths: List[str]) -> List[str]:
    """Bytecode for the ``.py`` files of a layer, hash-based and unchecked, so it does not
    depend on when the files were written (the image is read-only: nothing is compiled at
    import time) and the same distribution gives the same bytes. Returns the ``.pyc`` paths."""
    import importlib.util
    import py_compile
    made = []
    for path in paths:
        if not path.endswith(".py"):
            continue
        source = os.path.join(root, path)
        if os.path.islink(source) or not os.path.isfile(source):
            continue
        cached = importlib.util.cache_from_source(source)
        try:
            # ``dfile``: the code objects name the file relative to the set, not this build's
            # directory (the import system puts the real path in when it loads them).
            py_compile.compile(source, cfile=cached, dfile=path, doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        except (py_compile.PyCompileError, SyntaxError, ValueError, OSError):
            continue  # a file Python cannot compile is imported as source (or never)
        made.append(os.path.relpath(cached, root))
    return made


def layer_groups(root: str) -> List[Tuple[str, List[str]]]:
    """(title, files) per layer: one per distribution (its RECORD, with fresh deterministic
    bytecode), then one for everything else the set holds (its marker, lock, ``REQUESTED``
    files: what differs between sets that install the same distribution)."""
    groups = []
    claimed = set()
    for entry in sorted(os.listdir(root)):
        if not entry.endswith(".dist-info") or not os.path.isdir(os.path.join(root, entry)):
            continue
        listed = [p for p in _read_record(root, entry)
                  if not p.endswith(".pyc") and os.path.basename(p) != "REQUESTED"]
        listed += compile_deterministic(root, listed)
        files = sorted({p for p in listed if os.path.lexists(os.path.join(root, p))
                        and not os.path.isdir(os.path.join(root, p)) and p not in claimed})
        claimed.update(files)
        if files:
            groups.append((entry[:-len(".dist-info")], files))
    rest = []
    for directory, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files) + [d for d in dirs if os.path.islink(os.path.join(directory, d))]:
            rel = os.path.relpath(os.path.join(directory, name), root)
            if rel not in claimed:
                rest.append(rel)
    groups.append(("set", sorted(rest)))
    return groups


class _HashingWriter:
    """Counts and hashes what passes through on its way to ``sink``."""

    def __init__(self, sink):
        self.sink = sink
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        self.sink.write(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass


def _tar_info(root: str, rel: str, kind: str, content: Optional[bytes] = None) -> "tarfile.TarInfo":
    info = tarfile.TarInfo(rel)
    info.mtime = LAYER_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if kind == "dir":
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        return info
    if content is not None:
        info.size = len(content)
        info.mode = 0o644
        return info
    full = os.path.join(root, rel)
    if os.path.islink(full):
        info.type = tarfile.SYMTYPE
        info.linkname = os.readlink(full)
        info.mode = 0o777
        return info
    st = os.stat(full)
    info.size = st.st_size
    info.mode = 0o755 if st.st_mode & 0o111 else 0o644
    return info


def pack_layer(root: str, files: List[str], out_path: str, contents: Optional[Dict[str, bytes]] = None) -> dict:
    """A reproducible gzip'd tar of ``files`` (with their parent directories): fixed times,
    owners and modes, sorted. ``contents`` replaces the bytes of some files. Returns its
    descriptor plus ``diffId`` (the uncompressed digest)."""
    import gzip
    contents = contents or {}
    entries = []
    seen_dirs = set()
    for rel in sorted(files):
        parts = rel.split(os.sep)[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            if parent not in seen_dirs:
                seen_dirs.add(parent)
                entries.append((parent, "dir"))
        entries.append((rel.replace(os.sep, "/"), "file"))
    entries.sort(key=lambda e: e[0].split("/"))
    with open(out_path, "wb") as raw:
        compressed = _HashingWriter(raw)
        with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, compresslevel=6, mtime=0) as gz:
            plain = _HashingWriter(gz)
            with tarfile.open(fileobj=plain, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for rel, kind in entries:
                    info = _tar_info(root, rel, kind, contents.get(rel) if kind == "file" else None)
                    if rel in contents and kind == "file":
                        tar.addfile(info, io.BytesIO(contents[rel]))
                    elif info.isreg():
                        with open(os.path.join(root, rel), "rb") as data:
                            tar.addfile(info, data)
                    else:
                        tar.addfile(info)
    return {"mediaType": OCI_LAYER, "digest": "sha256:" + compressed.sha.hexdigest(),
            "size": compressed.size, "diffId": "sha256:" + plain.sha.hexdigest()}


def canonical_json(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def image_documents(layers: List[dict], set_id: str, tag: str, app: str) -> Tuple[bytes, bytes]:
    """The image config and manifest (both without times, so a rebuild has the same digest).
    ``app`` (``<namespace>/<name>``) marks whose set it is: retention deletes only its own app's
    images from the shared repository."""
    os_name, arch = image_platform()
    config = canonical_json({
        "architecture": arch, "os": os_name,
        "config": {"Labels": {"io.kaspr.packages.set": set_id, "io.kaspr.packages.python-tag": tag}},
        "rootfs": {"type": "layers", "diff_ids": [layer["diffId"] for layer in layers]},
    })
    manifest = canonical_json({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
                   "size": len(config)},
        "layers": [{"mediaType": layer["mediaType"], "digest": layer["digest"], "size": layer["size"],
                    "annotations": {"org.opencontainers.image.title": layer["title"]}} for layer in layers],
        "annotations": {"io.kaspr.packages.set": set_id, "io.kaspr.packages.python-tag": tag,
                        IMAGE_APP_ANNOTATION: app},
    })
    return config, manifest


def docker_config_credentials(path: Optional[str], host: str) -> Optional[Tuple[str, str]]:
    """(user, password) for ``host`` from a mounted docker config Secret
    (``.dockerconfigjson``; ``auths`` keys may carry a scheme and path)."""
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except OSError as exc:
        raise InstallError("authentication", "cannot read the registry credentials %s: %s"
                           % (path, exc.strerror or exc), retryable=False)
    except ValueError:
        raise InstallError("authentication", "the registry credentials %s are not a docker config JSON" % path,
                           retryable=False)
    auths = data.get("auths") if isinstance(data, dict) else None
    for key, entry in (auths or {}).items():
        bare = re.sub(r"^[a-z]+://", "", str(key)).split("/", 1)[0]
        if bare != host or not isinstance(entry, dict):
            continue
        if entry.get("username") and entry.get("password"):
            return str(entry["username"]), str(entry["password"])
        try:
            user, _, password = base64.b64decode(str(entry.get("auth", ""))).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            user = password = ""
        if user:
            return user, password
        raise InstallError("authentication", "the registry credentials %s have no usable entry for %s"
                           % (path, host), retryable=False)
    return None


class RegistryError(Exception):
    def __init__(self, category: str, message: str):
        super().__init__(message)
        self.category = category


class Registry:
    """The OCI distribution API for one repository: blob HEAD/upload, manifest PUT, basic and
    bearer auth. Credentials are used in headers only, and redacted from every message."""

    def __init__(self, target: Config, redactor: Redactor, timeout: float):
        match = REPOSITORY_RE.match(target.repository)
        self.host, self.name = match.group("host"), match.group("name")
        self.base = "%s://%s" % ("http" if target.plain_http else "https", self.host)
        self.credentials = docker_config_credentials(target.docker_config, self.host)
        if self.credentials:
            redactor.add(self.credentials[1])
            redactor.add(base64.b64encode(("%s:%s" % self.credentials).encode()).decode())
        self.redactor = redactor
        self.timeout = timeout
        self.authorization: Optional[str] = None
        self.uploaded_bytes = 0

    def _send(self, method: str, url: str, headers: Dict[str, str], body=None):
        request = urllib.request.Request(url, data=body, method=method, headers=headers)
        opener = urllib.request.build_opener(_NoRedirect())
        try:
            with opener.open(request, timeout=self.timeout) as response:
                return response.status, response.headers, response.read(1 << 20)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers, (exc.read(2000) if exc.fp else b"")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise RegistryError("network", "%s %s: %s" % (method, self.redactor(url.split("?", 1)[0]),
                                                           getattr(exc, "reason", exc) or type(exc).__name__))

    def _login(self, challenge: str) -> None:
        scheme, _, params = challenge.partition(" ")
        fields = dict(re.findall(r'([A-Za-z_]+)="([^"]*)"', params))
        basic = None
        if self.credentials:
            basic = "Basic " + base64.b64encode(("%s:%s" % self.credentials).encode()).decode()
        if scheme.lower() == "basic":
            if basic is None:
                raise RegistryError("authentication", "registry %s asks for credentials and the push Secret has "
                                    "none for it" % self.host)
            self.authorization = basic
            return
        if scheme.lower() != "bearer" or "realm" not in fields:
            raise RegistryError("authentication", "registry %s asks for unsupported authentication %r"
                                % (self.host, scheme))
        query = {"scope": fields.get("scope") or "repository:%s:pull,push" % self.name}
        if fields.get("service"):
            query["service"] = fields["service"]
        url = fields["realm"] + ("&" if "?" in fields["realm"] else "?") + urllib.parse.urlencode(query)
        status, _, body = self._send("GET", url, {"Authorization": basic} if basic else {})
        if status != 200:
            raise RegistryError("authentication", "the token service of registry %s answered HTTP %d: %s"
                                % (self.host, status, one_line(self.redactor(body.decode("utf-8", "replace")), 200)))
        try:
            token = json.loads(body.decode("utf-8"))
            token = token.get("token") or token.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not token:
            raise RegistryError("authentication", "the token service of registry %s returned no token" % self.host)
        self.redactor.add(token)
        self.authorization = "Bearer " + token

    def call(self, method: str, path_or_url: str, headers: Optional[Dict[str, str]] = None, body=None,
             reopen=None):
        """One request, logging in once on a 401. ``reopen`` gives a fresh body for the retry."""
        url = urllib.parse.urljoin(self.base + "/", path_or_url)
        for attempt in (0, 1):
            sent = dict(headers or {})
            if self.authorization:
                sent["Authorization"] = self.authorization
            status, answer, data = self._send(method, url, sent, body)
            if status != 401 or attempt == 1:
                break
            self._login(answer.get("WWW-Authenticate", "") if answer else "")
            if reopen is not None:
                body = reopen()
        if status in (401, 403):
            raise RegistryError("authentication", "registry %s refused %s on %s: HTTP %d %s"
                                % (self.host, method, self.name, status, self._message(data)))
        return status, answer, data

    def _message(self, data: bytes) -> str:
        return one_line(self.redactor(data.decode("utf-8", "replace")), 300)

    def has_blob(self, digest: str) -> bool:
        status, _, data = self.call("HEAD", "/v2/%s/blobs/%s" % (self.name, digest))
        if status == 404:
            return False
        if 200 <= status < 400:
            return True
        raise RegistryError("cache_error", "HEAD blob %s on %s: HTTP %d %s" % (digest, self.name, status,
                                                                             self._message(data)))

    def upload_blob(self, digest: str, path: Optional[str] = None, data: Optional[bytes] = None) -> bool:
        """Uploads a blob the repository lacks (monolithic: POST then PUT). Returns whether it
        was uploaded."""
        if self.has_blob(digest):
            return False
        status, answer, reply = self.call("POST", "/v2/%s/blobs/uploads/" % self.name, {"Content-Length": "0"}, b"")
        location = answer.get("Location") if answer else None
        if status != 202 or not location:
            raise RegistryError("cache_error", "starting an upload to %s: HTTP %d %s"
                                % (self.name, status, self._message(reply)))
        url = urllib.parse.urljoin(self.base + "/", location)
        url += ("&" if "?" in url else "?") + urllib.parse.urlencode({"digest": digest})
        size = len(data) if data is not None else os.path.getsize(path)
        handles = []

        def body():
            if data is not None:
                return data
            handles.append(open(path, "rb"))
            return handles[-1]

        try:
            status, _, reply = self.call("PUT", url, {"Content-Type": "application/octet-stream",
                                                      "Content-Length": str(size)}, body(), reopen=body)
        finally:
            for handle in handles:
                handle.close()
        if status != 201:
            raise RegistryError("cache_error", "uploading blob %s to %s: HTTP %d %s"
                                % (digest, self.name, status, self._message(reply)))
        self.uploaded_bytes += size
        return True

    def put_manifest(self, reference: str, manifest: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        status, answer, reply = self.call("PUT", "/v2/%s/manifests/%s" % (self.name, reference),
                                          {"Content-Type": OCI_MANIFEST}, manifest)
        if status != 201:
            raise RegistryError("cache_error", "putting manifest %s:%s: HTTP %d %s"
                                % (self.name, reference, status, self._message(reply)))
        echoed = answer.get("Docker-Content-Digest") if answer else None
        if echoed and echoed != digest:
            raise RegistryError("integrity", "registry %s stored manifest %s as %s" % (self.host, digest, echoed))
        return digest


    def list_tags(self, page: int, pages: int) -> List[str]:
        """The repository's tags, following ``Link`` (or ``last=``) pagination, at most
        ``pages`` pages of ``page``."""
        tags: List[str] = []
        path = "/v2/%s/tags/list?n=%d" % (self.name, page)
        for _ in range(pages):
            status, answer, data = self.call("GET", path)
            if status == 404:
                return tags
            if status != 200:
                raise RegistryError("cache_error", "listing the tags of %s: HTTP %d %s"
                                    % (self.name, status, self._message(data)))
            try:
                listed = json.loads(data.decode("utf-8")).get("tags") or []
            except (ValueError, AttributeError):
                raise RegistryError("cache_error", "listing the tags of %s: not a JSON tag list" % self.name)
            listed = [tag for tag in listed if isinstance(tag, str)]
            tags.extend(listed)
            link = re.match(r"\s*<([^>]+)>", (answer.get("Link") or "") if answer else "")
            if link:
                path = link.group(1)
            elif len(listed) >= page:
                path = "/v2/%s/tags/list?%s" % (self.name, urllib.parse.urlencode({"n": page, "last": listed[-1]}))
            else:
                return tags
        return tags

    def get_manifest(self, reference: str) -> Optional[Tuple[str, object]]:
        """(digest, manifest JSON) of ``reference``; None if the registry no longer has it."""
        status, answer, data = self.call("GET", "/v2/%s/manifests/%s" % (self.name, reference),
                                         {"Accept": OCI_MANIFEST})
        if status == 404:
            return None
        if status != 200:
            raise RegistryError("cache_error", "reading manifest %s:%s: HTTP %d %s"
                                % (self.name, reference, status, self._message(data)))
        try:
            manifest = json.loads(data.decode("utf-8"))
        except ValueError:
            manifest = None
        return "sha256:" + hashlib.sha256(data).hexdigest(), manifest

    def delete_manifest(self, reference: str) -> bool:
        """DELETE a manifest by digest (or a tag by name). False when the registry does not
        delete (HTTP 405, or the error code ``UNSUPPORTED``); a manifest already gone counts as
        deleted."""
        status, _, data = self.call("DELETE", "/v2/%s/manifests/%s" % (self.name, reference))
        if status in (200, 202, 204, 404):
            return True
        if status == 405 or b"UNSUPPORTED" in data:
            return False
        raise RegistryError("cache_error", "deleting manifest %s:%s: HTTP %d %s"
                            % (self.name, reference, status, self._message(data)))


def image_marker(built: str) -> Dict[str, bytes]:
    """The build marker as the image carries it: without its creation time, so the same set
    built twice is the same image."""
    marker = read_marker(built)
    if marker is None:
        return {}
    marker.pop("created", None)
    return {BUILD_MARKER: json.dumps(marker, indent=1, sort_keys=True).encode()}


def publish_image(ctx: "Context", set_id: str, built: str) -> dict:
    """Publishes the built set ``built`` as ``<repository>:<set id>-<python tag>`` and returns
    what was published (printed as one ``IMAGE`` line for the controller)."""
    target = ctx.cfg.build.image
    tag = image_tag(set_id, ctx.tag)
    layers_dir = os.path.join(ctx.work_dir, "layers")
    reset_dir(layers_dir)
    layers = []
    for number, (title, files) in enumerate(layer_groups(built)):
        path = os.path.join(layers_dir, "%04d.tar.gz" % number)
        layer = pack_layer(built, files, path, image_marker(built))
        layer["title"] = title
        layer["path"] = path
        layers.append(layer)
    config, manifest = image_documents(layers, set_id, ctx.tag, "%s/%s" % (ctx.cfg.namespace, ctx.cfg.app))
    try:
        registry = Registry(target, ctx.redactor, min(ctx.cfg.timeout, 300.0))
        uploaded = 0
        for layer in layers:
            uploaded += registry.upload_blob(layer["digest"], path=layer["path"])
        registry.upload_blob("sha256:" + hashlib.sha256(config).hexdigest(), data=config)
        digest = registry.put_manifest(tag, manifest)
    except RegistryError as exc:
        raise InstallError(exc.category, "publishing the set's image to %s: %s"
                           % (target.repository, ctx.redactor(str(exc))), retryable=False)
    finally:
        remove_tree(layers_dir)
    total = sum(layer["size"] for layer in layers)
    published = {
        "repository": target.repository, "tag": tag, "digest": digest, "pythonTag": ctx.tag,
        "layers": [[layer["title"], layer["digest"], layer["size"]] for layer in layers],
        "uploadedLayers": uploaded, "uploadedBytes": registry.uploaded_bytes, "totalBytes": total,
    }
    log("published image %s@%s: %d layers, %d uploaded (%d of %d bytes)"
        % (target.repository, digest, len(layers), uploaded, registry.uploaded_bytes, total))
    print(IMAGE_MARKER + json.dumps(published, sort_keys=True), flush=True)
    if ctx.cfg.build.keep is not None:
        prune_images(ctx, registry, set([set_id] + ctx.cfg.build.keep))
    return published


def prune_images(ctx: "Context", registry: "Registry", keep: set) -> None:
    """Deletes this app's set images the lock ConfigMap no longer keeps (``keep``: the
    controller's list when it created this Job, plus this build's set). Only manifests annotated
    with this app are touched: the repository is shared by every app. Each is deleted by digest
    (which removes the image and, in most registries, its tags), then its tag, for registries
    that keep a tag after its manifest. A registry that refuses deletes, or any other error, is
    logged: retention never fails a build."""
    app = "%s/%s" % (ctx.cfg.namespace, ctx.cfg.app)
    try:
        tags = registry.list_tags(TAG_PAGE, TAG_PAGES)
        deleted = 0
        for tag in tags:
            match = IMAGE_TAG_RE.match(tag)
            if not match or match.group("set") in keep:
                continue
            found = registry.get_manifest(tag)
            if found is None:
                continue
            digest, manifest = found
            annotations = manifest.get("annotations") if isinstance(manifest, dict) else None
            if not isinstance(annotations, dict) or annotations.get(IMAGE_APP_ANNOTATION) != app:
                continue
            if not registry.delete_manifest(digest):
                log("warning: registry %s does not delete images; set %s (%s@%s) stays"
                    % (registry.host, match.group("set"), ctx.cfg.build.image.repository, digest))
                return
            try:
                registry.delete_manifest(tag)
            except RegistryError:
                pass  # the image is gone; a registry that keeps tags apart may keep a dangling one
            deleted += 1
            log("deleted image %s:%s (%s) of set %s: no longer kept by the app"
                % (ctx.cfg.build.image.repository, tag, digest, match.group("set")))
        if deleted == 0:
            log("no images of earlier sets to delete")
    except RegistryError as exc:
        log("warning: deleting images of dropped sets failed: %s" % ctx.redactor(str(exc)))
# kaspr-packages: build-only end


def write_termination_log(environ: Dict[str, str], line: str) -> None:
    """Write the summary for `kubectl describe pod`; a missing or read-only path is ignored."""
    path = environ.get("KASPR_PACKAGES_TERMINATION_LOG") or DEFAULT_TERMINATION_LOG
    try:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(line + "\n")
    except OSError:
        pass


OPERATOR_HASH_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def write_operator_marker(environ: Dict[str, str], cfg: "Config", seconds: float) -> Optional[str]:
    """Under takeover of a Kaspr operator (v0.14+), the install container carries the operator's
    ``PACKAGES_HASH``, and in its PVC mode the operator reads ``<target>/.installed-<hash>``
    through ``pods/exec`` for its status: write it after a successful install, in the pod's own
    packages volume. Returns its path, or None when there is no such hash (or it cannot be
    written: the status reading is a courtesy, never a reason to fail the pod)."""
    digest = environ.get("PACKAGES_HASH", "")
    if not OPERATOR_HASH_RE.fullmatch(digest) or digest.startswith("."):
        return None
    path = os.path.join(cfg.target, ".installed-" + digest)
    marker = {
        "hash": digest,
        "installKey": cfg.install_key,
        "packages": list(cfg.packages),  # as written: ${VAR} stays unexpanded
        "lastInstallTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "installDuration": "%.1fs" % seconds,
        "installedBy": socket.gethostname(),
        "installer": "kaspr-packages-webhook",
    }
    try:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(marker, handle, sort_keys=True)
    except OSError:
        return None
    return path


def finish_failure(environ: Dict[str, str], exc: InstallError, on_failure: str, redactor: Optional[Redactor]) -> int:
    message = one_line(redactor(exc.message) if redactor else exc.message)
    line = "%s FAILED %s: %s" % (PREFIX, exc.category, message)
    if on_failure == "allow":
        line += " (onFailure=allow: the app starts without packages)"
    print(line, flush=True)
    write_termination_log(environ, line)
    return 0 if on_failure == "allow" else EXIT_CODES[exc.category]


def run(cfg: Config, ctx: Context) -> Plan:
    prepare_target(cfg.target)
    remove_tree(ctx.work_dir)  # a killed earlier run may have left it
    os.makedirs(ctx.work_dir, mode=0o700)
    try:
        if cfg.build is not None:
            return run_build(ctx)
        if cfg.restore is not None:
            return run_restore(ctx)
        if cfg.mode == "pvc":
            return run_pvc(ctx)
        if cfg.mode == "gcs":
            return run_gcs(ctx)
        return run_empty_dir(ctx)
    finally:
        remove_tree(ctx.work_dir)


def main(environ: Optional[Dict[str, str]] = None) -> int:
    """Run the installer; returns the process exit code."""
    environ = dict(os.environ if environ is None else environ)
    started = time.monotonic()
    on_failure = early_on_failure(environ)
    ctx = None
    try:
        cfg = load_config(environ)
        on_failure = cfg.on_failure
        ctx = Context(cfg, environ)
        log("mode %s, app %s/%s, install key %s, python %s (%s), %d packages, indexes: %s"
            % (cfg.mode, cfg.namespace, cfg.app, cfg.install_key, ctx.tag,
               platform.python_version(), len(cfg.packages), describe_indexes(cfg)))
        for pkg in cfg.packages:
            log("requirement: " + pkg)  # as written: ${VAR} stays unexpanded
        plan = run(cfg, ctx)
    except InstallError as exc:
        return finish_failure(environ, exc, on_failure, ctx.redactor if ctx else None)
    except OSError as exc:
        return finish_failure(environ, classify_os_error(exc, "unexpected I/O error"), on_failure,
                              ctx.redactor if ctx else None)
    except Exception as exc:  # noqa: BLE001 - a bug must still give a one-line category
        error = InstallError("unknown", "internal error: %s: %s" % (type(exc).__name__, exc))
        return finish_failure(environ, error, on_failure, ctx.redactor if ctx else None)
    line = "%s OK %d packages, key %s, %s, %.1fs" % (
        PREFIX, len(cfg.packages), cfg.install_key, ctx.tag, time.monotonic() - started)
    if getattr(plan, "lock_sha256", None):
        line += ", set %s, lock sha256 %s" % (cfg.build.set, plan.lock_sha256)
        if getattr(plan, "image", None):
            line += ", image %s" % plan.image["digest"]
    elif cfg.restore is not None:
        line += ", set %s" % cfg.restore.set
    if plan.overrides:
        line += ", overrides: " + "; ".join(plan.overrides)
    write_operator_marker(environ, cfg, time.monotonic() - started)
    if ctx.degraded is not None:
        # The pod has its packages, but without the cache: say so where `kubectl describe`
        # and the controller (which turns it into an Event and a metric) look.
        line += " (cache off: %s: %s)" % ctx.degraded
    print(line, flush=True)
    write_termination_log(environ, line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
