"""Measure (not assert) the installer's own overhead beyond pip and the warm PVC restart time.

Run: "$(scripts/python-env)/bin/python" tests/installer/measure.py [rounds]
Uses the same loopback index and "image" venv as the tests; prints medians in seconds.
"""

import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from conftest import PLAIN_PASSWORD, PLAIN_USER  # noqa: E402
from helpers import PypiServer, base_env, config, make_wheel, run_installer  # noqa: E402

PACKAGES = ["kasprdemo==2.0", "needsbase==1.0"]


def main(rounds: int) -> None:
    from passlib.apache import HtpasswdFile

    work = Path(tempfile.mkdtemp(prefix="kaspr-measure-"))
    try:
        wheels = work / "wheels"
        wheels.mkdir()
        for name, version, requires in [("kasprdemo", "2.0", []), ("basedep", "1.0", []),
                                        ("needsbase", "1.0", ["basedep>=1.0"])]:
            make_wheel(wheels, name, version, requires)
        ht = HtpasswdFile(str(work / "htpasswd"), new=True)
        ht.set_password(PLAIN_USER, PLAIN_PASSWORD)
        ht.save()
        pypi = PypiServer(wheels, work / "htpasswd", work / "pypi.log")
        try:
            venv = work / "image"
            subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], check=True)
            python = str(venv / "bin" / "python")
            env = base_env(work)
            env.update(KASPR_PYPI_USERNAME=PLAIN_USER, KASPR_PYPI_PASSWORD=PLAIN_PASSWORD)
            authed = "http://%s:%s@127.0.0.1:%d/simple/" % (PLAIN_USER, PLAIN_PASSWORD, pypi.port)

            plain_pip, total, in_pip, warm = [], [], [], []
            build, restore_lock, restore_pvc = [], [], []
            for i in range(rounds):
                # Baseline: one plain pip install of the same requirements into a fresh target.
                target = work / ("pip-%d" % i)
                started = _now()
                subprocess.run([python, "-m", "pip", "install", "-q", "--no-cache-dir", "--target", str(target),
                                "--index-url", authed] + PACKAGES, check=True, env=env)
                plain_pip.append(_now() - started)

                cfg = config(work / ("pod-%d" % i), pypi.url, PACKAGES, credentials=True)
                run = run_installer(python, cfg, env, work / "termlog")
                assert run.returncode == 0, run
                total.append(run.duration)
                in_pip.append(sum(float(x) for x in re.findall(r"pip (?:resolve|install) took ([0-9.]+)s", run.stdout)))

                cache = work / ("cache-%d" % i)
                pvc = config(work / ("pvc-a-%d" % i), pypi.url, PACKAGES, credentials=True, mode="pvc", cacheDir=str(cache))
                assert run_installer(python, pvc, env, work / "termlog").returncode == 0
                pvc["target"] = str(work / ("pvc-b-%d" % i))
                run = run_installer(python, pvc, env, work / "termlog")
                assert run.returncode == 0 and "skipping pip" in run.stdout, run
                warm.append(run.duration)

                # Package sets: a build Job (PVC mode), a pod restoring it from the cache, and
                # an emptyDir pod installing the locked set with hash checking.
                lock = work / ("lock-%d.toml" % i)
                set_cache = work / ("sets-%d" % i)
                job = config(work / ("job-%d" % i), pypi.url, PACKAGES, credentials=True, mode="pvc",
                             cacheDir=str(set_cache), build={"set": "5e7a00000000000%d" % (i % 10), "lockFile": str(lock)})
                run = run_installer(python, job, env, work / "termlog")
                assert run.returncode == 0, run
                build.append(run.duration)
                pod = config(work / ("setpod-%d" % i), pypi.url, PACKAGES, credentials=True, mode="pvc",
                             cacheDir=str(set_cache), restore={"set": job["build"]["set"], "lockFile": str(lock)})
                run = run_installer(python, pod, env, work / "termlog")
                assert run.returncode == 0 and "restored from the cache" in run.stdout, run
                restore_pvc.append(run.duration)
                pod = config(work / ("lockpod-%d" % i), pypi.url, PACKAGES, credentials=True,
                             restore={"set": job["build"]["set"], "lockFile": str(lock)})
                run = run_installer(python, pod, env, work / "termlog")
                assert run.returncode == 0 and "hash-checked" in run.stdout, run
                restore_lock.append(run.duration)

            own = [t - p for t, p in zip(total, in_pip)]
            med = statistics.median
            print("rounds: %d" % rounds)
            print("plain pip install --target (1 process):      %.2fs" % med(plain_pip))
            print("installer emptyDir, total wall time:         %.2fs" % med(total))
            print("  of which inside pip (resolve + install):   %.2fs" % med(in_pip))
            print("  installer's own overhead beyond pip:       %.2fs" % med(own))
            print("  total minus plain pip (incl. 2nd pip run): %.2fs" % med([t - p for t, p in zip(total, plain_pip)]))
            print("PVC warm restart (build present), total:     %.2fs" % med(warm))
            print("set build (download, lock, install, publish): %.2fs" % med(build))
            print("set restore, PVC (no index), total:          %.2fs" % med(restore_pvc))
            print("set restore, emptyDir (from the lock):       %.2fs" % med(restore_lock))
        finally:
            pypi.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _now() -> float:
    import time
    return time.monotonic()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
