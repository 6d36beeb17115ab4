"""What an end-to-end run may leave on the host, compared before and after the run.

    leftovers.py snapshot          print the host state as JSON
    leftovers.py check SNAPSHOT    exit 1, listing each leftover, if the host differs

Checked: network namespaces, mounts, the kubelet's cgroups, processes that carry this run's
marker (scripts/test-e2e sets KASPR_E2E_RUN_MARKER; every process the harness starts inherits
it), the harness's work directories and the host sysctls a kubelet changes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from e2e_node import HOST_SYSCTLS, kubepods_cgroups, read_host_sysctls

RUN_MARKER = "KASPR_E2E_RUN_MARKER"


def snapshot() -> dict:
    netns = sorted(p.name for p in Path("/run/netns").iterdir()) if Path("/run/netns").is_dir() else []
    with open("/proc/self/mountinfo") as info:
        # /run/netns is iproute2's own mount point, made once by the first `ip netns add` on a
        # machine and shared by every user of named network namespaces; it is not ours to undo.
        mounts = sorted({line.split()[4] for line in info} - {"/run/netns"})
    processes = []
    marker = os.environ.get(RUN_MARKER)
    needle = f"{RUN_MARKER}={marker}".encode() if marker else None
    # The scripts that ran this check carry the marker too: only their descendants count.
    ancestors = _ancestors()
    for pid_dir in Path("/proc").iterdir():
        if needle is None or not pid_dir.name.isdigit() or int(pid_dir.name) in ancestors:
            continue
        try:
            environ = (pid_dir / "environ").read_bytes()
            exe = os.readlink(pid_dir / "exe")
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            processes.append(f"{pid_dir.name} {exe}")
    workdirs = sorted(str(p) for p in Path("/tmp").glob("kaspr-e2e-*"))
    return {
        "netns": netns,
        "mounts": mounts,
        "cgroups": sorted(str(c) for c in kubepods_cgroups()),
        "processes": sorted(processes),
        "workdirs": workdirs,
        "sysctls": read_host_sysctls(),
    }


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return pids


def differences(before: dict, after: dict) -> list[str]:
    found = []
    for key in ("netns", "mounts", "cgroups", "processes", "workdirs"):
        for item in sorted(set(after[key]) - set(before[key])):
            found.append(f"{key}: {item}")
    for key in HOST_SYSCTLS:
        if before["sysctls"].get(key) != after["sysctls"].get(key):
            found.append(f"sysctl {key}: {before['sysctls'].get(key)} -> {after['sysctls'].get(key)}")
    return found


def main() -> int:
    if sys.argv[1:2] == ["snapshot"]:
        print(json.dumps(snapshot()))
        return 0
    if len(sys.argv) == 3 and sys.argv[1] == "check":
        found = differences(json.loads(sys.argv[2]), snapshot())
        for line in found:
            print(f"left behind: {line}", file=sys.stderr)
        return 1 if found else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
