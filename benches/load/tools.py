#!/usr/bin/env python3
"""Helpers of scripts/bench-load: inputs it generates and measurements it takes.

  tools.py kasprapps DIR COUNT
      Writes COUNT KasprApp files (the emptyDir example, renamed app-00000…) into DIR.
  tools.py vault-review IN OUT
      Turns our Pod CREATE review into the same Pod as vault-k8s expects it: Vault agent
      annotations (init container only, like ours) and the service-account token volume the API
      server adds before webhooks run.
  tools.py ready --url URL [--cacert FILE] [--timeout S] [--hold S] [--later S] -- COMMAND...
      Starts COMMAND, polls URL every millisecond until it answers 2xx, prints one JSON line
      {ready_ms, rss_kib, hwm_kib} (RSS read --hold seconds after ready; with --later, also
      later_rss_kib and later_cpu_s, S seconds after that), then stops COMMAND.
  tools.py proc PID
      Prints one JSON line {rss_kib, hwm_kib, cpu_s} of a running process.
  tools.py summary OHA_JSON PROC_BEFORE PROC_AFTER LABEL RATE LOADAVG
      One JSON line per load run from oha's JSON output and two `proc` samples.
  tools.py table RESULTS_JSONL
      Markdown tables of the JSON lines written by `ready` and `summary`.
"""

import json
import os
import pathlib
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def proc_sample(pid):
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    after_name = stat[stat.rindex(")") + 2 :].split()
    # utime and stime are fields 14 and 15 of /proc/PID/stat (1-based, the name is field 2).
    ticks = int(after_name[11]) + int(after_name[12])
    return {
        "rss_kib": int(fields["VmRSS"].split()[0]),
        "hwm_kib": int(fields["VmHWM"].split()[0]),
        "cpu_s": ticks / CLOCK_TICKS,
    }


def kasprapps(directory, count):
    root = pathlib.Path(__file__).resolve().parents[2]
    template = (root / "examples" / "kasprapp-emptydir.yaml").read_text()
    assert "name: my-app\n" in template, "the example's name moved"
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        name = f"app-{i:05d}"
        (out / f"{name}.yaml").write_text(template.replace("name: my-app\n", f"name: {name}\n"))


def vault_review(source, target):
    review = json.loads(pathlib.Path(source).read_text())
    pod = review["request"]["object"]
    pod["metadata"].setdefault("annotations", {}).update(
        {
            "vault.hashicorp.com/agent-inject": "true",
            "vault.hashicorp.com/agent-pre-populate-only": "true",
            "vault.hashicorp.com/role": "my-app",
            "vault.hashicorp.com/agent-inject-secret-config": "secret/data/my-app/config",
        }
    )
    token_volume = "kube-api-access-7xk2p"
    pod["spec"].setdefault("volumes", []).append(
        {
            "name": token_volume,
            "projected": {
                "defaultMode": 420,
                "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {
                        "configMap": {
                            "name": "kube-root-ca.crt",
                            "items": [{"key": "ca.crt", "path": "ca.crt"}],
                        }
                    },
                    {
                        "downwardAPI": {
                            "items": [
                                {
                                    "path": "namespace",
                                    "fieldRef": {
                                        "apiVersion": "v1",
                                        "fieldPath": "metadata.namespace",
                                    },
                                }
                            ]
                        }
                    },
                ],
            },
        }
    )
    for container in pod["spec"]["containers"]:
        container.setdefault("volumeMounts", []).append(
            {
                "name": token_volume,
                "readOnly": True,
                "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
            }
        )
    pathlib.Path(target).write_text(json.dumps(review, indent=2) + "\n")


def ready(args):
    url, cacert, timeout, hold, later = None, None, 10.0, 0.0, 0.0
    while args and args[0] != "--":
        flag, value, args = args[0], args[1], args[2:]
        if flag == "--url":
            url = value
        elif flag == "--cacert":
            cacert = value
        elif flag == "--timeout":
            timeout = float(value)
        elif flag == "--hold":
            hold = float(value)
        elif flag == "--later":
            later = float(value)
        else:
            sys.exit(f"ready: unknown flag {flag}")
    command = args[1:]
    context = ssl.create_default_context(cafile=cacert) if cacert else None
    start = time.monotonic()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ready_ms = None
    try:
        while time.monotonic() - start < timeout and child.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=1, context=context) as answer:
                    if 200 <= answer.status < 300:
                        ready_ms = (time.monotonic() - start) * 1000
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.001)
        if ready_ms is not None and hold:
            time.sleep(hold)
        sample = proc_sample(child.pid) if child.poll() is None else {}
        late = {}
        if ready_ms is not None and later and child.poll() is None:
            time.sleep(later)
            late = proc_sample(child.pid) if child.poll() is None else {}
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    print(
        json.dumps(
            {
                "ready_ms": round(ready_ms, 1) if ready_ms is not None else None,
                "rss_kib": sample.get("rss_kib"),
                "hwm_kib": sample.get("hwm_kib"),
                **(
                    {
                        "later_s": later,
                        "later_rss_kib": late.get("rss_kib"),
                        "later_cpu_s": round(late["cpu_s"] - sample["cpu_s"], 2),
                    }
                    if late
                    else {}
                ),
            }
        )
    )
    return 0 if ready_ms is not None else 1


def summary(oha_json, before, after, label, rate, load):
    report = json.loads(pathlib.Path(oha_json).read_text())
    before = json.loads(pathlib.Path(before).read_text())
    after = json.loads(pathlib.Path(after).read_text())
    stats = report["summary"]
    percentiles = report["latencyPercentiles"]
    codes = report.get("statusCodeDistribution", {})
    ok = sum(n for code, n in codes.items() if code == "200")
    failed = sum(n for code, n in codes.items() if code != "200") + sum(
        report.get("errorDistribution", {}).values()
    )
    seconds = stats["total"]
    cpu = after["cpu_s"] - before["cpu_s"]
    print(
        json.dumps(
            {
                "kind": "load",
                "label": label,
                "rate": rate,
                "loadavg": load,
                "seconds": round(seconds, 2),
                "requests_ok": ok,
                "errors": failed,
                "throughput": round(ok / seconds, 1) if seconds else 0,
                "p50_ms": round(percentiles["p50"] * 1000, 3),
                "p99_ms": round(percentiles["p99"] * 1000, 3),
                "p99_9_ms": round(percentiles["p99.9"] * 1000, 3),
                "max_ms": round(stats["slowest"] * 1000, 3),
                "cpu_cores": round(cpu / seconds, 3) if seconds else 0,
                "cpu_us_per_req": round(cpu * 1e6 / ok, 1) if ok else None,
                "rss_mib": round(after["rss_kib"] / 1024, 1),
                "peak_rss_mib": round(after["hwm_kib"] / 1024, 1),
            }
        )
    )


def table(path):
    rows = [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line]
    ready_rows = [r for r in rows if r["kind"] == "ready"]
    load_rows = [r for r in rows if r["kind"] == "load"]
    if ready_rows:
        print(
            "| KasprApps | time to ready (ms) | RSS after ready (MiB) | peak RSS (MiB) "
            "| later: after (s) | RSS (MiB) | CPU in that time (s) |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for r in ready_rows:
            rss = r["rss_kib"] / 1024 if r["rss_kib"] else float("nan")
            hwm = r["hwm_kib"] / 1024 if r["hwm_kib"] else float("nan")
            later = (
                f"{r['later_s']:g} | {r['later_rss_kib'] / 1024:.1f} | {r['later_cpu_s']}"
                if r.get("later_rss_kib")
                else "– | – | –"
            )
            print(f"| {r['apps']} | {r['ready_ms']} | {rss:.1f} | {hwm:.1f} | {later} |")
        print()
    if load_rows:
        print(
            "| server, review, CPUs | rate (req/s) | achieved (req/s) | p50 (ms) | p99 (ms) "
            "| p99.9 (ms) | max (ms) | errors | server CPU (cores) | CPU µs/req "
            "| peak RSS (MiB) | load before |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in load_rows:
            print(
                f"| {r['label']} | {r['rate']} | {r['throughput']} | {r['p50_ms']} "
                f"| {r['p99_ms']} | {r['p99_9_ms']} | {r['max_ms']} | {r['errors']} "
                f"| {r['cpu_cores']} | {r['cpu_us_per_req']} | {r['peak_rss_mib']} "
                f"| {r['loadavg']} |"
            )
        ratios(load_rows)


def ratios(load_rows):
    """Throughput at `max` of each review against its floor and against vault-k8s, per layout."""
    at_max = {r["label"]: r["throughput"] for r in load_rows if r["rate"] == "max"}
    lines = []
    for label, throughput in sorted(at_max.items()):
        if not label.startswith("ours-"):
            continue
        review, layout = label[len("ours-") :].rsplit("-", 1)
        # A review with the answer cache off has the floor of the same review.
        floor = at_max.get(f"floor-{review.removeprefix('uncached-')}-{layout}")
        vault = at_max.get(f"vault-pod-{layout}")
        lines.append(
            f"| {review} | {layout} | {throughput} "
            f"| {floor if floor else '–'} | {f'{throughput / floor:.0%}' if floor else '–'} "
            f"| {f'{throughput / vault:.2f}×' if vault else '–'} |"
        )
    if lines:
        print()
        print("| review | layout | ours at max (req/s) | floor at max (req/s) | ours ÷ floor | ours ÷ vault-k8s |")
        print("|---|---|---:|---:|---:|---:|")
        print("\n".join(lines))


def main():
    command, args = sys.argv[1], sys.argv[2:]
    if command == "kasprapps":
        kasprapps(args[0], int(args[1]))
    elif command == "vault-review":
        vault_review(args[0], args[1])
    elif command == "ready":
        sys.exit(ready(args))
    elif command == "proc":
        print(json.dumps(proc_sample(int(args[0]))))
    elif command == "summary":
        summary(*args)
    elif command == "table":
        table(args[0])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
