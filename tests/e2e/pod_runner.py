"""Run a Pod read from the API server the way a kubelet would, on this machine.

There is no kubelet and no container runtime in the test cluster. The runner plays both for a
Pod object: it resolves each container's environment (`value` with `$(VAR)` expansion,
`secretKeyRef` and `configMapKeyRef` read from the cluster, `fieldRef`), maps every volume to a
host directory (emptyDir per pod, PersistentVolumeClaim shared by claim name, Secret and
ConfigMap files with their modes, projected service-account volumes), and runs each init
container and then the main container in a private mount namespace in which those directories
are bind-mounted at the containers' mount paths (read-only where the mount says so). The image
is played by a local Python: the command `python3` resolves to the interpreter the test picks.

The runner itself is started inside the test's network namespace, so containers reach only the
loopback services that live there.

Module entry point `--exec SPEC` is the part that runs inside the new mount namespace: it does
the mounts, drops to the container's user when asked, and execs the container command.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
TERMINATION_MESSAGE_MAX = 4096
# The installer writes its summary where this variable points (a kubelet would mount a file at
# the container's terminationMessagePath instead).
TERMINATION_LOG_ENV = "KASPR_PACKAGES_TERMINATION_LOG"


class PodRunnerError(RuntimeError):
    """The pod cannot be started (like a pod stuck in ContainerCreating)."""


@dataclass
class ContainerResult:
    name: str
    argv: list[str]
    exit_code: int
    stdout: str
    stderr: str
    termination_message: str
    duration: float
    env: dict[str, str] = field(repr=False, default_factory=dict)

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@dataclass
class PodResult:
    name: str
    init_containers: list[ContainerResult]
    main: ContainerResult | None

    @property
    def init_failed(self) -> bool:
        return any(r.exit_code != 0 for r in self.init_containers)

    def init(self, name: str) -> ContainerResult:
        for r in self.init_containers:
            if r.name == name:
                return r
        raise KeyError(f"init container {name} did not run in pod {self.name}")

    def describe(self) -> str:
        parts = []
        for r in [*self.init_containers, *([self.main] if self.main else [])]:
            parts.append(
                f"== {r.name}: exit {r.exit_code} after {r.duration:.1f}s\n"
                f"termination message: {r.termination_message!r}\n"
                f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
            )
        return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# $(VAR) expansion, as in k8s.io/kubernetes/third_party/forked/golang/expansion


def expand(text: str, lookup: Callable[[str], str | None]) -> str:
    out: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == "$" and i + 1 < n:
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = text.find(")", i + 2)
                if end == -1:
                    out.append(text[i:])
                    break
                name = text[i + 2 : end]
                value = lookup(name)
                out.append(value if value is not None else f"$({name})")
                i = end + 1
                continue
            out.append(c + nxt)
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# The runner


Kubectl = Callable[..., subprocess.CompletedProcess]


class PodRunner:
    """Executes pods; `kubectl(args) -> CompletedProcess` reads objects from the cluster.

    `wrap(argv)` turns a command into one that runs inside the test's network namespace.
    `python` is the interpreter that plays the image's `python3`.
    """

    def __init__(
        self,
        kubectl: Kubectl,
        wrap: Callable[[Sequence[str]], list[str]],
        workdir: Path,
        python: str,
        *,
        pod_ip: str = "127.0.0.1",
        honor_run_as_user: bool = False,
        container_timeout: float = 300,
    ):
        self.kubectl = kubectl
        self.wrap = wrap
        self.workdir = Path(workdir)
        self.python = python
        self.pod_ip = pod_ip
        self.honor_run_as_user = honor_run_as_user
        self.container_timeout = container_timeout
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.image_bin = self.workdir / "image-bin"
        self.image_bin.mkdir(exist_ok=True)
        shim = self.image_bin / "python3"
        # A wrapper rather than a symlink, so a virtualenv interpreter still finds its pyvenv.cfg.
        shim.write_text(f'#!/bin/sh\nexec {python} "$@"\n')
        shim.chmod(0o755)

    # -- cluster reads -------------------------------------------------------------------------
    def _get(self, kind: str, name: str, namespace: str) -> dict | None:
        proc = self.kubectl(["get", kind, name, "-n", namespace, "-o", "json"], check=False)
        if proc.returncode != 0:
            if "NotFound" in proc.stderr:
                return None
            raise PodRunnerError(f"reading {kind} {namespace}/{name}: {proc.stderr.strip()}")
        return json.loads(proc.stdout)

    def _secret_data(self, name: str, namespace: str) -> dict[str, bytes] | None:
        secret = self._get("secret", name, namespace)
        if secret is None:
            return None
        return {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}

    def _configmap_data(self, name: str, namespace: str) -> dict[str, bytes] | None:
        cm = self._get("configmap", name, namespace)
        if cm is None:
            return None
        data = {k: v.encode() for k, v in (cm.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (cm.get("binaryData") or {}).items()})
        return data

    # -- env ------------------------------------------------------------------------------------
    def _field_ref(self, pod: dict, path: str) -> str:
        meta = pod["metadata"]
        m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if m:
            return (meta.get(m.group(1)) or {}).get(m.group(2), "")
        simple = {
            "metadata.name": meta.get("name", ""),
            "metadata.namespace": meta.get("namespace", ""),
            "metadata.uid": meta.get("uid", ""),
            "spec.nodeName": pod["spec"].get("nodeName", "e2e-node"),
            "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
            "status.podIP": self.pod_ip,
            "status.podIPs": self.pod_ip,
            "status.hostIP": "127.0.0.1",
            "status.hostIPs": "127.0.0.1",
        }
        if path in simple:
            return simple[path]
        raise PodRunnerError(f"unsupported fieldRef {path!r}")

    def _resource_ref(self, container: dict, ref: dict) -> str:
        resource = ref["resource"]
        kind, _, name = resource.partition(".")
        value = ((container.get("resources") or {}).get(kind) or {}).get(name)
        if value is None:
            # Without a limit the kubelet reports node allocatable; this machine's is what we have.
            value = str(os.cpu_count() or 1) if name == "cpu" else str(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        return str(value)

    def resolve_env(self, pod: dict, container: dict) -> dict[str, str]:
        namespace = pod["metadata"]["namespace"]
        env: dict[str, str] = {
            # What the image would set; nothing of the host's environment leaks in.
            "PATH": f"{self.image_bin}:/usr/local/bin:/usr/bin:/bin",
            "HOSTNAME": pod["metadata"]["name"],
            "KUBERNETES_SERVICE_HOST": "10.96.0.1",
            "KUBERNETES_SERVICE_PORT": "443",
            "LANG": "C.UTF-8",
        }
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "secretRef" in source:
                ref = source["secretRef"]
                data = self._secret_data(ref["name"], namespace)
            else:
                ref = source["configMapRef"]
                data = self._configmap_data(ref["name"], namespace)
            if data is None:
                if ref.get("optional"):
                    continue
                raise PodRunnerError(f"envFrom {ref['name']} not found (CreateContainerConfigError)")
            for key, value in data.items():
                env[prefix + key] = value.decode()
        for var in container.get("env") or []:
            name = var["name"]
            if "valueFrom" not in var:
                env[name] = expand(var.get("value", ""), env.get)
                continue
            source = var["valueFrom"]
            if "secretKeyRef" in source or "configMapKeyRef" in source:
                is_secret = "secretKeyRef" in source
                ref = source["secretKeyRef" if is_secret else "configMapKeyRef"]
                data = (self._secret_data if is_secret else self._configmap_data)(ref["name"], namespace)
                if data is None or ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    what = "secret" if is_secret else "configmap"
                    raise PodRunnerError(
                        f"env {name}: {what} {ref['name']} key {ref['key']} not found (CreateContainerConfigError)"
                    )
                env[name] = data[ref["key"]].decode()
            elif "fieldRef" in source:
                env[name] = self._field_ref(pod, source["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in source:
                env[name] = self._resource_ref(container, source["resourceFieldRef"])
            else:
                raise PodRunnerError(f"env {name}: unsupported valueFrom {source}")
        return env

    # -- volumes --------------------------------------------------------------------------------
    @staticmethod
    def _write_atomic_dir(target: Path, files: dict[str, tuple[bytes, int]]) -> None:
        """Lay files out like the kubelet's atomic writer: ..<ts>/ dir, ..data link, per-key links."""
        target.mkdir(parents=True, exist_ok=True)
        os.chmod(target, 0o755)
        stamp = target / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{os.getpid()}"
        stamp.mkdir()
        for rel, (content, mode) in files.items():
            path = stamp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            os.chmod(path, mode)
        (target / "..data").symlink_to(stamp.name)
        for top in sorted({rel.split("/")[0] for rel in files}):
            (target / top).symlink_to(f"..data/{top}")

    def _key_files(self, data: dict[str, bytes], items: list | None, default_mode: int, what: str) -> dict[str, tuple[bytes, int]]:
        files: dict[str, tuple[bytes, int]] = {}
        if items:
            for item in items:
                if item["key"] not in data:
                    raise PodRunnerError(f"{what}: key {item['key']} not found")
                files[item["path"]] = (data[item["key"]], item.get("mode", default_mode))
        else:
            for key, value in data.items():
                files[key] = (value, default_mode)
        return files

    def _prepare_volume(self, pod: dict, volume: dict, pod_dir: Path) -> Path:
        namespace = pod["metadata"]["namespace"]
        name = volume["name"]
        if "emptyDir" in volume:
            path = pod_dir / "volumes" / "empty-dir" / name
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, 0o777)  # the kubelet's emptyDir mode
            return path
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            if self._get("persistentvolumeclaim", claim, namespace) is None:
                raise PodRunnerError(f"volume {name}: PersistentVolumeClaim {claim} not found (pod stays Pending)")
            path = self.workdir / "claims" / namespace / claim
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, 0o777)
            return path
        if "secret" in volume or "configMap" in volume:
            is_secret = "secret" in volume
            src = volume["secret" if is_secret else "configMap"]
            ref_name = src["secretName"] if is_secret else src["name"]
            data = (self._secret_data if is_secret else self._configmap_data)(ref_name, namespace)
            if data is None:
                if src.get("optional"):
                    data = {}
                else:
                    raise PodRunnerError(f"volume {name}: {'secret' if is_secret else 'configmap'} {ref_name} not found")
            files = self._key_files(data, src.get("items"), src.get("defaultMode", 0o644), f"volume {name}")
            path = pod_dir / "volumes" / ("secret" if is_secret else "configmap") / name
            self._write_atomic_dir(path, files)
            return path
        if "projected" in volume:
            src = volume["projected"]
            default_mode = src.get("defaultMode", 0o644)
            files: dict[str, tuple[bytes, int]] = {}
            for source in src.get("sources") or []:
                if "serviceAccountToken" in source:
                    tok = source["serviceAccountToken"]
                    sa = pod["spec"].get("serviceAccountName", "default")
                    args = ["create", "token", sa, "-n", namespace, "--bound-object-kind", "Pod",
                            "--bound-object-name", pod["metadata"]["name"],
                            "--bound-object-uid", pod["metadata"]["uid"]]
                    if tok.get("expirationSeconds"):
                        args += ["--duration", f"{tok['expirationSeconds']}s"]
                    if tok.get("audience"):
                        args += ["--audience", tok["audience"]]
                    token = self.kubectl(args).stdout.strip()
                    files[tok["path"]] = (token.encode(), default_mode)
                elif "configMap" in source or "secret" in source:
                    is_secret = "secret" in source
                    ref = source["secret" if is_secret else "configMap"]
                    data = (self._secret_data if is_secret else self._configmap_data)(ref["name"], namespace)
                    if data is None:
                        if ref.get("optional"):
                            continue
                        raise PodRunnerError(f"volume {name}: {ref['name']} not found")
                    files.update(self._key_files(data, ref.get("items"), default_mode, f"volume {name}"))
                elif "downwardAPI" in source:
                    for item in source["downwardAPI"].get("items") or []:
                        value = self._field_ref(pod, item["fieldRef"]["fieldPath"])
                        files[item["path"]] = (value.encode(), item.get("mode", default_mode))
                else:
                    raise PodRunnerError(f"volume {name}: unsupported projected source {source}")
            path = pod_dir / "volumes" / "projected" / name
            self._write_atomic_dir(path, files)
            return path
        raise PodRunnerError(f"volume {name}: unsupported volume type {sorted(volume)}")

    # -- running ---------------------------------------------------------------------------------
    def _user(self, pod: dict, container: dict) -> tuple[int, int, list[int]] | None:
        if not self.honor_run_as_user:
            return None
        pod_sc = pod["spec"].get("securityContext") or {}
        sc = container.get("securityContext") or {}
        uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
        if uid is None:
            return None
        gid = sc.get("runAsGroup", pod_sc.get("runAsGroup", 0))
        groups = list(pod_sc.get("supplementalGroups") or [])
        if pod_sc.get("fsGroup") is not None:
            groups.append(pod_sc["fsGroup"])
        return int(uid), int(gid), groups

    def _run_container(
        self,
        pod: dict,
        container: dict,
        volumes: dict[str, Path],
        pod_dir: Path,
        argv_override: list[str] | None = None,
    ) -> ContainerResult:
        name = container["name"]
        env = self.resolve_env(pod, container)
        term_log = pod_dir / "termination" / name
        term_log.parent.mkdir(parents=True, exist_ok=True)
        term_log.write_text("")
        os.chmod(term_log, 0o666)
        env[TERMINATION_LOG_ENV] = str(term_log)

        if argv_override is not None:
            argv = argv_override
        else:
            command = container.get("command") or []
            if not command:
                raise PodRunnerError(f"container {name} has no command; the runner has no image entrypoint")
            argv = [expand(a, env.get) for a in [*command, *(container.get("args") or [])]]

        mounts = []
        for m in container.get("volumeMounts") or []:
            if m["name"] not in volumes:
                raise PodRunnerError(f"container {name}: mount of undeclared volume {m['name']}")
            src = volumes[m["name"]]
            if m.get("subPath"):
                src = src / m["subPath"]
            mounts.append({"source": str(src), "target": m["mountPath"], "readOnly": bool(m.get("readOnly"))})

        work = pod_dir / "scratch" / name
        work.mkdir(parents=True, exist_ok=True)
        os.chmod(work, 0o1777)
        env.setdefault("HOME", str(work))
        env.setdefault("TMPDIR", str(work))
        spec = {
            "mounts": mounts,
            "argv": argv,
            "env": env,
            "cwd": container.get("workingDir") or str(work),
            "user": self._user(pod, container),
            "stash": str(pod_dir / "stash" / name),
        }
        spec_path = pod_dir / f"{name}.exec.json"
        spec_path.write_text(json.dumps(spec))
        os.chmod(spec_path, 0o600)
        cmd = self.wrap(["unshare", "--mount", "--propagation", "private",
                         sys.executable, os.path.abspath(__file__), "--exec", str(spec_path)])
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=self.container_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            stderr += f"\n[pod-runner] killed after {self.container_timeout}s"
        duration = time.monotonic() - start
        spec_path.unlink()
        message = term_log.read_text(errors="replace")[:TERMINATION_MESSAGE_MAX]
        if not message and proc.returncode != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            message = "\n".join((stdout + stderr).splitlines()[-80:])[-2048:]
        return ContainerResult(name, argv, proc.returncode, stdout, stderr, message, duration, env)

    def run(self, pod: dict, main_argv: list[str] | None = None, main_container: str = "kaspr") -> PodResult:
        """Run the init containers in order, then the main container (unless an init failed).

        `main_argv` replaces the main container's command (the image's entrypoint is not
        available here); None skips the main container.
        """
        namespace = pod["metadata"]["namespace"]
        pod_name = pod["metadata"]["name"]
        pod_dir = Path(tempfile.mkdtemp(prefix=f"{namespace}.{pod_name}.", dir=self.workdir))
        os.chmod(pod_dir, 0o755)  # containers may run as another user
        volumes = {v["name"]: self._prepare_volume(pod, v, pod_dir) for v in pod["spec"].get("volumes") or []}
        results: list[ContainerResult] = []
        for container in pod["spec"].get("initContainers") or []:
            result = self._run_container(pod, container, volumes, pod_dir)
            results.append(result)
            if result.exit_code != 0:
                return PodResult(pod_name, results, None)
        main = None
        if main_argv is not None:
            containers = pod["spec"]["containers"]
            container = next((c for c in containers if c["name"] == main_container), containers[0])
            main = self._run_container(pod, container, volumes, pod_dir, argv_override=main_argv)
        return PodResult(pod_name, results, main)


# ---------------------------------------------------------------------------------------------
# Inside the private mount namespace


_MS_RDONLY = 0x1
_MS_REMOUNT = 0x20
_MS_BIND = 0x1000
_MS_REC = 0x4000


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    """mount(2) directly: mount(8) would write its own state files into the tmpfs we build."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    enc = lambda v: v.encode() if v is not None else None  # noqa: E731
    if libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def _make_mount_point(target: Path, is_dir: bool, stash_root: Path, shadowed: set[Path]) -> None:
    """Create `target` without touching the host's file system.

    When a missing path must be created under an existing directory P, P is replaced (in this
    mount namespace only) by a tmpfs into which P's entries are bind-mounted back, the way
    bubblewrap does it; then the missing path is created in the tmpfs.
    """
    if target.exists() or target.is_symlink():
        return
    missing = target
    while not missing.parent.exists():
        missing = missing.parent
    parent = missing.parent.resolve()
    if parent not in shadowed:
        stash = stash_root / str(len(shadowed))
        stash.mkdir(parents=True, exist_ok=True)
        _mount(str(parent), str(stash), None, _MS_BIND | _MS_REC)
        _mount("tmpfs", str(parent), "tmpfs", 0, "mode=755")
        for entry in os.listdir(stash):
            original = stash / entry
            placeholder = parent / entry
            if original.is_symlink():
                placeholder.symlink_to(os.readlink(original))
                continue
            if original.is_dir():
                placeholder.mkdir()
            else:
                placeholder.touch()
            _mount(str(original), str(placeholder), None, _MS_BIND | _MS_REC)
        shadowed.add(parent)
    if is_dir:
        target.mkdir(parents=True, exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()


def _exec_container(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    stash_root = Path(spec["stash"])
    shadowed: set[Path] = set()
    # Deeper mounts last, so a mount inside another mount's path lands on top of it.
    for m in sorted(spec["mounts"], key=lambda m: m["target"].count("/")):
        source = Path(m["source"])
        target = Path(m["target"])
        _make_mount_point(target, source.is_dir(), stash_root, shadowed)
        _mount(str(source), str(target), None, _MS_BIND)
        if m["readOnly"]:
            _mount(None, str(target), None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY)
    os.chdir(spec["cwd"])
    if spec["user"]:
        uid, gid, groups = spec["user"]
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)
    argv = spec["argv"]
    try:
        os.execvpe(argv[0], argv, spec["env"])
    except OSError as exc:
        sys.stderr.write(f"[pod-runner] exec {argv[0]}: {exc}\n")
        sys.exit(127)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--exec":
        _exec_container(sys.argv[2])
    else:
        sys.stderr.write("usage: pod_runner.py --exec SPEC (internal)\n")
        sys.exit(2)
