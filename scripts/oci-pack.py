#!/usr/bin/env python3
"""Pack a root filesystem directory into an OCI image archive (a tar of an OCI image layout).

    scripts/oci-pack.py --rootfs DIR --ref REF --output FILE [options]

The image recipes (scripts/build-image, scripts/build-test-images) use it so that an image can be
built without Docker, a registry or any tool beyond the Python 3 standard library. The archive
can be imported with `ctr -n k8s.io images import FILE` or pushed with crane/skopeo.

What it writes, and why:
- One layer holding the whole directory, stored *uncompressed* (media type
  application/vnd.oci.image.layer.v1.tar). Then the layer digest equals its diff_id, nothing is
  gzipped (packing stays fast) and containerd unpacks it as is.
- Deterministic bytes: entries sorted by name, parents before children, every mtime set to
  --mtime (default: $SOURCE_DATE_EPOCH or 0), numeric owners only (no user/group names), PAX
  format, compact sorted JSON. The same directory and options always give the same archive and
  therefore the same digests, which lets the recipes cache archives by the hash of their inputs.
- Owners come from the files (a root filesystem built as root keeps its owners), unless
  --owner overrides them: `--owner 0:0` for every entry, `--owner /home/app=1000:1000` for one
  path and everything under it. The most specific path wins.
- The image config carries Entrypoint, Cmd, User, Env, WorkingDir, ExposedPorts and Labels, the
  layer's diff_id in rootfs.diff_ids and one history entry, as the OCI image spec describes.
- index.json names the image twice: `io.containerd.image.name` (what `ctr images import` uses)
  and `org.opencontainers.image.ref.name`, both the full reference. A reference without a
  registry is normalised as Docker and the CRI do it (`kaspr-e2e/app:1` becomes
  `docker.io/kaspr-e2e/app:1`, a missing tag becomes `:latest`), so the kubelet finds the image
  under the name a pod spec uses.

Extended attributes (file capabilities, SELinux labels) are not carried over; the images built
here need none. Sockets are skipped. The manifest digest ("sha256:...") is printed on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import re
import stat
import sys
import tarfile
import tempfile

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar"

_ARCHES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def normalize_reference(ref: str) -> str:
    """Docker's normalisation of an image reference: add docker.io (and library/) and :latest."""
    name, digest = (ref.split("@", 1) + [""])[:2]
    first, _, rest = name.partition("/")
    if not rest or ("." not in first and ":" not in first and first != "localhost"):
        name = "docker.io/" + name
        if "/" not in name[len("docker.io/") :]:
            name = "docker.io/library/" + name[len("docker.io/") :]
    last = name.rsplit("/", 1)[1]
    if ":" not in last and not digest:
        name += ":latest"
    if not re.fullmatch(r"[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-]+[a-z0-9]+)*)+(:[\w][\w.-]{0,127})?", name):
        raise SystemExit(f"oci-pack: not a valid image reference: {ref!r}")
    return name + ("@" + digest if digest else "")


def canonical_json(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def parse_owner(text: str) -> tuple[int, int]:
    uid, sep, gid = text.partition(":")
    if not sep or not uid.isdigit() or not gid.isdigit():
        raise argparse.ArgumentTypeError(f"owner must be UID:GID, got {text!r}")
    return int(uid), int(gid)


class OwnerMap:
    """Owner overrides: a default for every entry and/or per-path overrides (longest path wins)."""

    def __init__(self, specs: list[str]):
        self.default: tuple[int, int] | None = None
        self.paths: dict[str, tuple[int, int]] = {}
        for spec in specs:
            path, sep, owner = spec.rpartition("=")
            if not sep:
                self.default = parse_owner(spec)
            else:
                self.paths[path.strip("/")] = parse_owner(owner)

    def lookup(self, arcname: str) -> tuple[int, int] | None:
        best, best_len = self.default, -1
        for path, owner in self.paths.items():
            if (arcname == path or arcname.startswith(path + "/")) and len(path) > best_len:
                best, best_len = owner, len(path)
        return best


def write_layer(rootfs: str, out, mtime: int, owners: OwnerMap) -> None:
    """Write the root filesystem as a deterministic tar stream into the file object `out`."""
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add_dir(directory: str, prefix: str) -> None:
            for name in sorted(os.listdir(directory)):
                path = os.path.join(directory, name)
                arcname = prefix + name
                st = os.lstat(path)
                if stat.S_ISSOCK(st.st_mode):
                    print(f"oci-pack: skipping socket /{arcname}", file=sys.stderr)
                    continue
                # gettarinfo turns a second link to an already added file into a hard link entry.
                info = tar.gettarinfo(path, arcname)
                info.mtime = mtime
                info.uname = info.gname = ""
                owner = owners.lookup(arcname)
                if owner is not None:
                    info.uid, info.gid = owner
                if info.isreg():
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
                if stat.S_ISDIR(st.st_mode):
                    add_dir(path, arcname + "/")

        add_dir(rootfs, "")


def sha256_file(path: str) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return "sha256:" + h.hexdigest(), size


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o644
    tar.addfile(info, io.BytesIO(data))


def add_dir_entry(tar: tarfile.TarFile, name: str, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mtime, info.mode = tarfile.DIRTYPE, mtime, 0o755
    tar.addfile(info)


def pack(args: argparse.Namespace) -> str:
    ref = normalize_reference(args.ref)
    mtime = args.mtime
    created = "1970-01-01T00:00:00Z" if mtime == 0 else _rfc3339(mtime)
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)

    # The layer goes to a temporary file beside the output: it can be large, and its digest must
    # be known before the config and manifest that name it are written.
    layer_fd, layer_path = tempfile.mkstemp(prefix=".layer-", dir=out_dir)
    archive_tmp = None
    try:
        with os.fdopen(layer_fd, "wb") as layer:
            write_layer(args.rootfs, layer, mtime, OwnerMap(args.owner))
        layer_digest, layer_size = sha256_file(layer_path)

        container_config: dict = {}
        env = list(args.env)
        if env:
            container_config["Env"] = env
        if args.entrypoint is not None:
            container_config["Entrypoint"] = json.loads(args.entrypoint)
        if args.cmd is not None:
            container_config["Cmd"] = json.loads(args.cmd)
        if args.user:
            container_config["User"] = args.user
        if args.workdir:
            container_config["WorkingDir"] = args.workdir
        if args.expose:
            container_config["ExposedPorts"] = {p if "/" in p else p + "/tcp": {} for p in args.expose}
        labels = dict(kv.split("=", 1) for kv in args.label)
        if labels:
            container_config["Labels"] = labels
        for key in ("Entrypoint", "Cmd"):
            value = container_config.get(key)
            if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise SystemExit(f"oci-pack: --{key.lower()} must be a JSON array of strings")

        config = canonical_json(
            {
                "architecture": args.arch,
                "os": "linux",
                "created": created,
                "config": container_config,
                "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
                "history": [{"created": created, "created_by": args.created_by}],
            }
        )
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        manifest = canonical_json(
            {
                "schemaVersion": 2,
                "mediaType": MT_MANIFEST,
                "config": {"mediaType": MT_CONFIG, "digest": config_digest, "size": len(config)},
                "layers": [{"mediaType": MT_LAYER, "digest": layer_digest, "size": layer_size}],
            }
        )
        manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        index = canonical_json(
            {
                "schemaVersion": 2,
                "mediaType": MT_INDEX,
                "manifests": [
                    {
                        "mediaType": MT_MANIFEST,
                        "digest": manifest_digest,
                        "size": len(manifest),
                        "platform": {"architecture": args.arch, "os": "linux"},
                        "annotations": {
                            "io.containerd.image.name": ref,
                            "org.opencontainers.image.ref.name": ref,
                        },
                    }
                ],
            }
        )

        fd, archive_tmp = tempfile.mkstemp(prefix=".archive-", dir=out_dir)
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            add_bytes(tar, "oci-layout", canonical_json({"imageLayoutVersion": "1.0.0"}), mtime)
            add_bytes(tar, "index.json", index, mtime)
            add_dir_entry(tar, "blobs", mtime)
            add_dir_entry(tar, "blobs/sha256", mtime)
            blobs = [(manifest_digest, manifest), (config_digest, config)]
            for digest, data in sorted(blobs):
                add_bytes(tar, "blobs/sha256/" + digest.split(":", 1)[1], data, mtime)
            info = tarfile.TarInfo("blobs/sha256/" + layer_digest.split(":", 1)[1])
            info.size, info.mtime, info.mode = layer_size, mtime, 0o644
            with open(layer_path, "rb") as layer:
                tar.addfile(info, layer)
        os.chmod(archive_tmp, 0o644)
        os.replace(archive_tmp, args.output)
        archive_tmp = None
    finally:
        os.unlink(layer_path)
        if archive_tmp is not None:
            os.unlink(archive_tmp)
    return manifest_digest


def _rfc3339(epoch: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rootfs", required=True, help="the root filesystem directory")
    parser.add_argument("--ref", required=True, help="image reference, e.g. ghcr.io/org/name:1.0")
    parser.add_argument("--output", required=True, help="archive to write (replaced atomically)")
    parser.add_argument("--entrypoint", help='JSON array, e.g. \'["/usr/local/bin/app"]\'')
    parser.add_argument("--cmd", help="JSON array")
    parser.add_argument("--user", help="UID:GID or name")
    parser.add_argument("--workdir", help="working directory")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE (repeatable)")
    parser.add_argument("--expose", action="append", default=[], help="port[/proto] (repeatable)")
    parser.add_argument("--label", action="append", default=[], help="KEY=VALUE (repeatable)")
    parser.add_argument("--owner", action="append", default=[], help="UID:GID for all entries, or PATH=UID:GID (repeatable)")
    parser.add_argument("--arch", default=_ARCHES.get(platform.machine(), platform.machine()), help="OCI architecture (default: this machine's)")
    parser.add_argument("--mtime", type=int, default=int(os.environ.get("SOURCE_DATE_EPOCH", "0")), help="timestamp for every entry (default: $SOURCE_DATE_EPOCH or 0)")
    parser.add_argument("--created-by", default="scripts/oci-pack.py", help="history entry text")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.rootfs):
        parser.error(f"--rootfs {args.rootfs}: not a directory")
    for kv in args.env + args.label:
        if "=" not in kv:
            parser.error(f"expected KEY=VALUE, got {kv!r}")
    for spec in args.owner:
        try:
            OwnerMap([spec])
        except argparse.ArgumentTypeError as e:
            parser.error(str(e))
    print(pack(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
