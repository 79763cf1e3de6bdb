"""Crossover mode: fp32 all_reduce by MPI's native Allreduce vs mpicomm's "bytes" algorithm.

For each size, four variants are timed in interleaved rounds (so machine load hits them alike):
raw mpi4py ``Allreduce`` on numpy buffers, and ``MPICommunicator.all_reduce`` with
``allreduce_algo`` = ``native``, ``bytes`` and ``auto``. The table says which algorithm wins at
each size and condenses that into size ranges: the thresholds ``auto`` should use.
"""

from __future__ import annotations

import numpy as np
import torch

from .collectives import ENTRIES, Ctx
from .timing import Schedule, bandwidths, time_loop
from .units import human

VARIANTS = ("mpi4py", "native", "bytes", "auto")
# "bytes" must beat "native" by this fraction to be chosen (measurement noise guard).
MARGIN = 0.03


def run(args, comm, device: torch.device, auto_comm) -> dict:
    """Measure every size in ``args.sizes`` (fp32); print the table on rank 0; return the JSON."""
    from . import env

    entry = ENTRIES["all_reduce"]
    comms = {"auto": auto_comm}
    for algo in ("native", "bytes"):
        comms[algo] = env.make_communicator(device, algo)
    switch = all(getattr(comms[a], "allreduce_algo", None) == a for a in ("native", "bytes"))
    sched = Schedule(args.iters, args.min_iters, args.iter_bytes)
    rows = []
    rank0 = comm.rank == 0
    if rank0:
        print(
            f"# all_reduce float32 crossover ({comm.size} ranks, {args.rounds} interleaved rounds)"
        )
        if not switch:
            print(
                "# warning: the communicator has no allreduce_algo switch; variants are identical"
            )
        print(
            f"{'bytes':>9s} | {'mpi4py us':>10s} {'native us':>10s} {'bytes us':>10s} "
            f"{'auto us':>10s} | {'bytes/native':>12s} {'winner':>7s} | {'auto/best':>9s} "
            f"{'auto/mpi4py':>11s} | {'b/n (min)':>9s}",
            flush=True,
        )
    try:
        for nbytes in args.sizes:
            count = max(1, nbytes // 4)
            nb = count * 4
            cases = {}
            for v in VARIANTS:
                ctx = Ctx(comm=comm, communicator=comms.get(v), gloo=False, device=device)
                backend = "mpi4py" if v == "mpi4py" else "mpicomm"
                cases[v] = entry.build(ctx, backend, torch.float32, count)
            pooled = {v: [] for v in VARIANTS}
            ok = {v: True for v in VARIANTS}
            for _ in range(args.rounds):
                for v in VARIANTS:
                    t = time_loop(
                        cases[v].run, cases[v].check, comm, sched.warmup(nb), sched.iters(nb)
                    )
                    pooled[v].append(t.times)
                    ok[v] = ok[v] and bool(t.ok) and t.error is None
            del cases
            us = {v: float(np.median(np.concatenate(pooled[v])) * 1e6) for v in VARIANTS}
            # The fastest iteration: less sensitive to a loaded machine than the median.
            low = {v: float(np.min(np.concatenate(pooled[v])) * 1e6) for v in VARIANTS}
            speed = us["native"] / us["bytes"]  # > 1: bytes is faster
            winner = "bytes" if speed > 1 + MARGIN else "native"
            best = min(us["native"], us["bytes"])
            row = {
                "bytes": nb,
                **{f"{v}_us": us[v] for v in VARIANTS},
                **{
                    f"{v}_busbw_GBps": bandwidths(nb, us[v] * 1e-6, entry.factor(comm.size))[1]
                    for v in VARIANTS
                },
                **{f"{v}_min_us": low[v] for v in VARIANTS},
                "bytes_speedup_over_native": speed,
                "bytes_speedup_over_native_min": low["native"] / low["bytes"],
                "winner": winner,
                "auto_vs_best": best / us["auto"],
                "auto_vs_mpi4py": us["mpi4py"] / us["auto"],
                "ok": ok,
            }
            rows.append(row)
            if rank0:
                print(
                    f"{human(nb):>9s} | {us['mpi4py']:10.1f} {us['native']:10.1f} "
                    f"{us['bytes']:10.1f} {us['auto']:10.1f} | {speed:12.2f} {winner:>7s} | "
                    f"{row['auto_vs_best']:9.2f} {row['auto_vs_mpi4py']:11.2f} | "
                    f"{row['bytes_speedup_over_native_min']:9.2f}"
                    + ("" if all(ok.values()) else f"  CHECK FAILED {ok}"),
                    flush=True,
                )
    finally:
        for algo in ("native", "bytes"):
            if hasattr(comms[algo], "destroy"):
                comms[algo].destroy()
    table = thresholds(rows)
    if rank0:
        print(
            "# suggested auto table (fp32, this machine, "
            f"{comm.size} ranks; bytes chosen when >{MARGIN:.0%} faster):"
        )
        for r in table:
            hi = "inf" if r["max_bytes"] is None else human(r["max_bytes"])
            print(f"#   [{human(r['min_bytes'])}, {hi}) -> {r['algo']}")
    return {
        "dtype": "float32",
        "nranks": comm.size,
        "rounds": args.rounds,
        "margin": MARGIN,
        "switch_available": switch,
        "rows": rows,
        "auto_table": table,
    }


def thresholds(rows: list[dict]) -> list[dict]:
    """Condense per-size winners into ``[min_bytes, max_bytes) -> algo`` ranges.

    A range starts at the first measured size of a run of equal winners; the first range starts
    at 0 and the last has ``max_bytes`` ``None`` (unbounded).
    """
    table: list[dict] = []
    for row in sorted(rows, key=lambda r: r["bytes"]):
        if table and table[-1]["algo"] == row["winner"]:
            continue
        if table:
            table[-1]["max_bytes"] = row["bytes"]
        table.append(
            {"min_bytes": row["bytes"] if table else 0, "max_bytes": None, "algo": row["winner"]}
        )
    return table
