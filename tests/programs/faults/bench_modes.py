"""Per-call cost of the consistency mode and of timeouts, measured side by side.

``mpiexec -n 2 python tests/programs/faults/bench_modes.py [CALLS] [ROUNDS]``. Four communicators on the
same ranks (plain; ``validate=True``; ``timeout=60``; both) take turns, round by round, on the
same all_reduce / all_gather calls, so load on the machine hits all of them alike. Rank 0 prints a
Markdown table of median microseconds per call and the ratio to plain.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from mpi4py import MPI

import mpicomm

torch.set_num_threads(1)
WORLD = MPI.COMM_WORLD
MODES = {
    "plain": {"validate": False},
    "validate": {"validate": True},
    "timeout": {"timeout": 60, "validate": False},
    "timeout+validate": {"timeout": 60, "validate": True},
}
CASES = [
    ("all_reduce", 1),
    ("all_reduce", 1024),
    ("all_reduce", 256 * 1024),
    ("all_gather", 1024),
]


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    comms = {
        name: mpicomm.MPICommunicator(WORLD, unique_name=name, **kw) for name, kw in MODES.items()
    }
    rows = []
    for op, numel in CASES:
        x = torch.ones(numel)
        n = max(10, calls if numel < 100_000 else calls // 10)
        times = {name: [] for name in MODES}
        for _ in range(rounds):
            for name, comm in comms.items():
                fn = getattr(comm, op)
                fn(x)
                WORLD.Barrier()
                start = time.perf_counter()
                for _ in range(n):
                    fn(x)
                elapsed = WORLD.allreduce(time.perf_counter() - start, op=MPI.MAX)
                times[name].append(elapsed / n * 1e6)
        med = {name: statistics.median(t) for name, t in times.items()}
        rows.append((op, numel * 4, med))
    for comm in comms.values():
        comm.destroy()
    if WORLD.Get_rank() == 0:
        print(f"ranks={WORLD.Get_size()} calls={calls} rounds={rounds} (median us per call)")
        head = " | ".join(f"{m} us (x plain)" for m in MODES)
        print(f"| operation | bytes per rank | {head} |")
        print("|---|---:|" + "---:|" * len(MODES))
        for op, nbytes, med in rows:
            cells = " | ".join(f"{med[m]:.1f} ({med[m] / med['plain']:.2f})" for m in MODES)
            print(f"| {op} | {nbytes} | {cells} |")


if __name__ == "__main__":
    main()
