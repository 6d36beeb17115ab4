"""Measure (not assert) layer sharing in image mode: bytes a registry receives and bytes a node
pulls for a second app that shares a large distribution and for a one-package change, with one
layer per distribution against one layer per set.

Run: "$(scripts/python-env)/bin/python" tests/installer/measure_image.py [MiB of the large distribution]
Uses a loopback index, an "image" venv and crane's registry (scripts/build-crane) behind the
tests' auth proxy (bearer tokens).
"""

import random
import runpy
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from helpers import INSTALLER, StaticIndex, base_env, config, make_wheel, run_installer  # noqa: E402
from oci_registry import AuthRegistry, image_line  # noqa: E402

KEY = "0123456789abcdef"


def main(big_mib: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="kaspr-measure-image-"))
    installer = runpy.run_path(str(INSTALLER), run_name="kaspr_installer")
    try:
        wheels = work / "wheels"
        wheels.mkdir()
        big = random.Random(7).randbytes(big_mib << 20)
        index = StaticIndex({
            "bigdist": [make_wheel(wheels, "bigdist", "1.0", module_text="DATA = %r\n" % big)],
            "kasprdemo": [make_wheel(wheels, "kasprdemo", "1.0"), make_wheel(wheels, "kasprdemo", "2.0")],
            "needsbase": [make_wheel(wheels, "needsbase", "1.0", requires=["basedep>=1.0"])],
            "basedep": [make_wheel(wheels, "basedep", "1.0")],
        })
        (work / "registry").mkdir()
        registry = AuthRegistry(work / "registry", {"pusher": "secret"}, auth="bearer")
        try:
            venv = work / "image"
            subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], check=True)
            python = str(venv / "bin" / "python")
            (work / "push").mkdir()
            secret = registry.docker_config(work / "push" / "config.json", "pusher", "secret")
            env = base_env(work)
            rows = []
            seen = set()
            for number, (label, packages) in enumerate([
                    ("first app (large distribution + kasprdemo 1.0)", ["bigdist", "kasprdemo==1.0"]),
                    ("second app sharing the large distribution", ["bigdist", "needsbase"]),
                    ("first app, kasprdemo 1.0 -> 2.0", ["bigdist", "kasprdemo==2.0"])]):
                target = {"repository": "%s/kaspr/packages" % registry.host, "plainHttp": True,
                          "dockerConfig": str(secret)}
                cfg = config(work / ("job-%d" % number), index.url, packages, installKey=KEY,
                             build={"set": "1a6e00000000000%d" % number, "image": target})
                before = registry.uploaded
                run = run_installer(python, cfg, env, work / "termlog", timeout=900)
                assert run.returncode == 0, run
                image = image_line(run.stdout)
                received = registry.uploaded - before
                # A node that ran the earlier images pulls only layers it has not seen.
                pulled = sum(size for _, digest, size in image["layers"] if digest not in seen)
                seen.update(digest for _, digest, _ in image["layers"])
                built = next((work / ("job-%d" % number) / ".builds").glob("*-*"))
                whole = installer["pack_layer"](str(built), [f for _, files in installer["layer_groups"](str(built))
                                                             for f in files], str(work / "whole.tar.gz"))
                rows.append((label, len(image["layers"]), image["totalBytes"], received, pulled, whole["size"],
                             run.duration))
        finally:
            registry.stop()
            index.stop()
        print("large distribution: %d MiB of incompressible data (wheel); bytes are compressed layer bytes"
              % big_mib)
        print("| push | layers | image size | registry received | node pulls (has earlier images) "
              "| one layer per set: received = pulled | build wall time |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for label, layers, total, received, pulled, whole, seconds in rows:
            print("| %s | %d | %s | %s | %s | %s | %.1f s |" % (label, layers, _size(total), _size(received),
                                                              _size(pulled), _size(whole), seconds))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _size(n: int) -> str:
    return "%.1f MB" % (n / 1e6) if n >= 100_000 else "%.1f kB" % (n / 1e3)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 16)
