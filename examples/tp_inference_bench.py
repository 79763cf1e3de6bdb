"""Throughput of tp_inference.py at several rank counts, measured side by side in one run.

    python examples/tp_inference_bench.py --rounds 3 --copies 4

Each round runs every configuration once (interleaved, so that background load hits them all
alike) on the sample sentences repeated ``--copies`` times, and reads the sentences/s that
tp_inference.py reports (median of its timed passes, barrier to barrier). Prints the median over
rounds per configuration and dtype, and the ratio to the first configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: (label, ranks, extra tp_inference.py arguments)
CONFIGS = [
    ("1 rank, 1 thread", 1, ["--threads", "1"]),
    ("2 ranks TP=2, 1 thread each", 2, ["--tp", "2", "--threads", "1"]),
    ("2 ranks DP=2 (TP=1), 1 thread each", 2, ["--tp", "1", "--threads", "1"]),
    ("1 rank, 2 threads", 1, ["--threads", "2"]),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--copies", type=int, default=4, help="repeat the sample file this often")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per run")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", default="fp32,bf16")
    args = p.parse_args(argv)
    mpiexec = Path(sys.executable).parent / "mpiexec"
    mpiexec = str(mpiexec) if mpiexec.exists() else shutil.which("mpiexec")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(ROOT)]))
    sample = (HERE / "sentences.txt").read_text().strip().splitlines()
    rates: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sentences = Path(tmp) / "sentences.txt"
        sentences.write_text("\n".join(sample * args.copies) + "\n")
        for rnd in range(args.rounds):
            for label, n, extra in CONFIGS:
                summary = Path(tmp) / "summary.json"
                cmd = ["timeout", "600", mpiexec, "-n", str(n), sys.executable]
                cmd += [str(HERE / "tp_inference.py"), "--file", str(sentences), "--no-reference"]
                cmd += ["--repeats", str(args.repeats), "--batch-size", str(args.batch_size)]
                cmd += ["--dtype", args.dtype, "--summary", str(summary), "--show", "0", *extra]
                subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
                got = json.loads(summary.read_text())["results"]
                for row in got:
                    rates.setdefault((label, row["dtype"]), []).append(row["sentences_per_s"])
                line = ", ".join(f"{r['dtype']} {r['sentences_per_s']:.1f}/s" for r in got)
                print(f"round {rnd + 1}/{args.rounds}: {label}: {line}", file=sys.stderr)
    n_sent = len(sample) * args.copies
    load = os.getloadavg()[0]
    print(f"{n_sent} sentences, batch {args.batch_size}, median of {args.rounds} rounds")
    print(f"1-minute load average at the end: {load:.1f} on {os.cpu_count()} CPUs")
    print(f"| configuration | dtype | sentences/s | vs {CONFIGS[0][0]} |")
    print("|---|---|---|---|")
    for dtype in args.dtype.split(","):
        base = statistics.median(rates[(CONFIGS[0][0], dtype)])
        for label, _, _ in CONFIGS:
            r = statistics.median(rates[(label, dtype)])
            print(f"| {label} | {dtype} | {r:.1f} | {r / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
