"""Judge the output of examples/vllm_generate.py run across the simulated hosts (run.sh's vllm
checks): exit 0 only if rank 0 printed the IDENTICAL verdict, every rank printed its result, the
ranks sat PER_HOST to a host on the expected hosts, every rank's token ids equal the one-rank ids
kept in REFERENCE (a JSON file with ``ids``), and vLLM's TP group ran on mpicomm's
``VllmMPICommunicator`` with all_reduce calls.

    python vllm_verdict.py OUTPUT_FILE REFERENCE_JSON --hosts mcnode1,mcnode2 --per-host 1
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))

from mpicomm.vllm.tiny import parse_results  # noqa: E402


def problems(out: str, reference: list[list[int]], hosts: list[str], per_host: int) -> list[str]:
    """What is wrong with the run whose combined output is ``out`` (empty: it passed)."""
    found = []
    if "vs one rank: IDENTICAL" not in out:
        found.append("no 'vs one rank: IDENTICAL' verdict from rank 0")
    results = sorted(parse_results(out), key=lambda r: r["rank"])
    n = len(hosts) * per_host
    if [r["rank"] for r in results] != list(range(n)):
        found.append(f"results of ranks {[r['rank'] for r in results]}, expected 0..{n - 1}")
    placed = Counter(r.get("host") for r in results)
    if placed != Counter({h: per_host for h in hosts}):
        found.append(f"ranks per host {dict(placed)}, expected {per_host} on each of {hosts}")
    for r in results:
        if r["ids"] != reference:
            found.append(f"rank {r['rank']}: token ids differ from the one-rank ids")
        tp = r["served_by"].get("tp") or {}
        if tp.get("communicator") != "VllmMPICommunicator":
            found.append(f"rank {r['rank']}: TP group on {tp.get('communicator')}, not mpicomm")
        elif tp.get("calls", {}).get("all_reduce", 0) <= 0:
            found.append(f"rank {r['rank']}: mpicomm served no TP all_reduce ({tp})")
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("output", help="the launch's stdout and stderr")
    p.add_argument("reference", help="JSON file of the one-rank run (its 'ids')")
    p.add_argument("--hosts", required=True, help="comma-separated host names")
    p.add_argument("--per-host", type=int, required=True)
    args = p.parse_args(argv)
    reference = json.loads(Path(args.reference).read_text())["ids"]
    found = problems(Path(args.output).read_text(), reference, args.hosts.split(","), args.per_host)
    for line in found:
        print(f"vllm_verdict: FAIL: {line}")
    if not found:
        print(
            f"vllm_verdict: PASS: {len(args.hosts.split(',')) * args.per_host} ranks on "
            f"{args.hosts}, ids identical to one rank, TP on VllmMPICommunicator"
        )
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
