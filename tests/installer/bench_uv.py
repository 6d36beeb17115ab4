"""Measure (not assert) pip against uv for cold installs of a realistic package set.

Run: "$(scripts/python-env)/bin/python" tests/installer/bench_uv.py [rounds]

The set (SET below, with its dependencies: about 30 distributions, pandas and numpy among
them) is downloaded from the public index once into
${KASPR_CACHE_DIR:-~/.cache/kaspr-packages-webhook}/bench-wheels; every measured run then
reads it from a loopback index (127.0.0.2), so the network does not take part. Each run starts
cold: the installer's pip and uv caches live in its own work directory and are removed after
it. Prints medians in seconds. Not part of the test suite.
"""

import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from helpers import REPO, StaticIndex, base_env, config, run_installer  # noqa: E402

SET = ["requests==2.34.2", "pydantic==2.14.3", "httpx==0.28.1", "sqlalchemy==2.1.9", "pyyaml==6.0.3",
       "orjson==3.13.0", "boto3==1.44.5", "pandas==3.1.1"]
KEY = "0123456789abcdef"


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheels_dir() -> Path:
    cache = Path(os.environ.get("KASPR_CACHE_DIR") or Path.home() / ".cache" / "kaspr-packages-webhook")
    dest = cache / "bench-wheels"
    stamp = dest / ".set"
    if not stamp.exists() or stamp.read_text() != "\n".join(SET):
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary", ":all:",
                        "--dest", str(dest)] + SET, check=True, timeout=1800)
        stamp.write_text("\n".join(SET))
    return dest


def venv(path: Path, uv_wheel: str = "") -> str:
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(path)], check=True)
    python = str(path / "bin" / "python")
    if uv_wheel:
        subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", uv_wheel], check=True)
    return python


def timed(python, cfg, env, work, step_re):
    run = run_installer(python, cfg, env, work / "termlog", timeout=1800)
    assert run.returncode == 0, run
    step = re.findall(step_re, run.stdout)
    return run.duration, float(step[-1]) if step else 0.0


def main(rounds: int) -> None:
    uv_wheel = subprocess.run([str(REPO / "scripts" / "uv-wheel")], check=True, capture_output=True,
                              text=True).stdout.strip()
    projects = {}
    for wheel in sorted(wheels_dir().glob("*.whl")) + [Path(uv_wheel)]:
        projects.setdefault(normalize(wheel.name.split("-")[0]), []).append(wheel)
    index = StaticIndex(projects)
    work = Path(tempfile.mkdtemp(prefix="kaspr-bench-uv-"))
    try:
        plain = venv(work / "image")
        with_uv = venv(work / "image-uv", uv_wheel)
        env = base_env(work)
        rows = {name: [] for name in (
            "build, pip", "build, uv from the image",
            "restore, pip", "restore, uv from the image", "restore, uv from the index (auto)")}
        steps = {name: [] for name in rows}
        lock_step = r"(?:pip|uv) install from the lock took ([0-9.]+)s"
        for i in range(rounds):
            for name, python, tool in (("build, pip", plain, "pip"), ("build, uv from the image", with_uv, "uv")):
                set_id = "be%014x" % (i * 2 + (tool == "uv"))
                cfg = config(work / ("job-%d-%s" % (i, tool)), index.url, SET, installKey=KEY, installTool=tool,
                             build={"set": set_id, "lockFile": str(work / ("lock-%d-%s" % (i, tool)))})
                total, step = timed(python, cfg, env, work, lock_step)
                rows[name].append(total)
                steps[name].append(step)
            lock = work / ("lock-%d-pip" % i)
            set_id = "be%014x" % (i * 2)
            for name, python, tool in (("restore, pip", plain, "pip"), ("restore, uv from the image", with_uv, "uv"),
                                       ("restore, uv from the index (auto)", plain, "auto")):
                cfg = config(work / ("pod-%d-%s-%s" % (i, tool, python == with_uv)), index.url, SET, installKey=KEY,
                             installTool=tool, restore={"set": set_id, "lockFile": str(lock)})
                total, step = timed(python, cfg, env, work, lock_step)
                rows[name].append(total)
                steps[name].append(step)
        locked = lock.read_text().count("[[packages]]")
        print("%d rounds, medians; %d locked distributions from %s" % (rounds, locked, " ".join(SET)))
        print("%-36s %10s %22s" % ("run", "total (s)", "install from lock (s)"))
        for name in rows:
            print("%-36s %10.2f %22.2f" % (name, statistics.median(rows[name]), statistics.median(steps[name])))
    finally:
        index.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
