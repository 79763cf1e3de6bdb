"""Soak: thousands of mixed collectives of random sizes, every result checked, memory flat.

``mpiexec -n 4 python tests/programs/faults/soak.py [STEPS]`` (default ``MPICOMM_SOAK_STEPS`` or 2000).
Every rank draws the same sequence of calls from a seeded generator; inputs are small integers
derived from (step, rank), so every rank computes the exact reference for every call itself.
Two communicators alternate: a plain one, and one with a timeout and validation (the polling,
arrival-notice and fingerprint paths). After a warm-up that runs every operation and dtype at the
largest size, the library's own holdings must not grow: workspace bytes, outstanding requests,
and the Python objects alive (a tensor or request kept per call shows there at once). Resident
memory is sampled at ``MARKS`` points and summarised as a least-squares slope (bytes per call):
transparent huge pages move RSS in 2 MiB steps, which a slope over the run averages away.
Rank 0 prints one JSON line with the summary; the exit status is 0 only if every result held.
"""

from __future__ import annotations

import gc
import json
import os
import random
import sys
import time

import torch
from mpi4py import MPI

import mpicomm
from mpicomm.consistency import COLLECTIVES

torch.set_num_threads(1)
WORLD = MPI.COMM_WORLD
RANK, W = WORLD.Get_rank(), WORLD.Get_size()
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.float64]
OPS = [*COLLECTIVES, "sendrecv", "dispatch"]
MAX_ROWS, MAX_COLS = 64, 96  # largest tensor: 64 x 96 elements per rank
MARKS = 20  # samples of memory and objects after the warm-up


def rss() -> int:
    """Resident set size in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make(step: int, rank: int, shape, dtype) -> torch.Tensor:
    """Rank ``rank``'s input at ``step``: small integers (exact sums in every dtype used)."""
    g = torch.Generator().manual_seed(step * 1009 + rank)
    return torch.randint(-8, 9, shape, generator=g).to(dtype)


def draw(rng: random.Random, largest: bool = False):
    """One call: operation, dtype, shape, dim, per-rank rows and a root."""
    rows = MAX_ROWS if largest else rng.randint(1, MAX_ROWS)
    cols = MAX_COLS if largest else rng.choice([1, 3, 8, rng.randint(1, MAX_COLS)])
    rows = max(W, rows - rows % W)  # divisible by W for reduce_scatter
    sizes = [rows // W] * W if largest else [rng.randint(0, rows // W + 2) for _ in range(W)]
    return rows, cols, sizes, rng.randrange(W), rng.choice([0, 1, -1])


def run_one(comm, step: int, op: str, dtype, rows, cols, sizes, root, dim) -> bool:
    """Run ``op`` once on ``comm``; True if this rank's result equals the reference."""
    if op in ("all_gatherv", "dispatch"):
        x = make(step, RANK, (sizes[RANK], cols), dtype)
        every = [make(step, r, (sizes[r], cols), dtype) for r in range(W)]
        if op == "all_gatherv":
            return torch.equal(comm.all_gatherv(x, 0, sizes), torch.cat(every))
        logits = x[:, :1].float() + 0.5
        h, lg = comm.dispatch(x, logits, sizes=sizes)
        ok = torch.equal(h, torch.cat(every))
        ok &= torch.equal(lg, torch.cat([e[:, :1].float() + 0.5 for e in every]))
        back = comm.combine(h)  # every rank returns the same rows: rank r gets W * its own rows
        return ok and torch.equal(back, (every[RANK].float() * W).to(dtype))
    x = make(step, RANK, (rows, cols), dtype)
    if op == "sendrecv":
        nxt, prv = (RANK + 1) % W, (RANK - 1) % W
        if RANK % 2 == 0:
            comm.send(x, nxt)
            got = comm.recv(x.shape, dtype, prv)
        else:
            got = comm.recv(x.shape, dtype, prv)
            comm.send(x, nxt)
        return torch.equal(got, make(step, prv, (rows, cols), dtype))
    every = [make(step, r, (rows, cols), dtype) for r in range(W)]
    if op == "broadcast":
        return torch.equal(comm.broadcast(x, src=root), every[root])
    if op in ("all_gather", "gather"):
        ref = torch.cat(every, dim)
        if op == "all_gather":
            return torch.equal(comm.all_gather(x, dim), ref)
        out = comm.gather(x, dst=root, dim=dim)
        return torch.equal(out, ref) if root == RANK else out is None
    total = torch.stack([e.double() for e in every]).sum(0).to(dtype)
    if op == "all_reduce":
        return torch.equal(comm.all_reduce(x), total)
    if op == "reduce_scatter":
        return torch.equal(comm.reduce_scatter(x, dim=0), total.chunk(W, 0)[RANK])
    vs = [rows // W] * W
    vs[0], vs[-1] = vs[0] + vs[-1] // 2, vs[-1] - vs[-1] // 2
    start = sum(vs[:RANK])
    return torch.equal(comm.reduce_scatterv(x, 0, vs), total[start : start + vs[RANK]])


def state(comms) -> dict:
    gc.collect()
    return {
        "rss": rss(),
        "objects": len(gc.get_objects()),
        "workspace": sum(c.workspace.nbytes for c in comms),
        "outstanding": sum(c.outstanding for c in comms),
    }


def slope(xs: list[int], ys: list[int]) -> float:
    """Least-squares slope of ``ys`` over ``xs`` (0 for fewer than two points)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def main() -> int:
    steps = (
        int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ.get("MPICOMM_SOAK_STEPS", 2000))
    )
    plain = mpicomm.MPICommunicator(WORLD, unique_name="soak")
    guarded = mpicomm.MPICommunicator(WORLD, unique_name="soak-guarded", timeout=60, validate=True)
    comms = [plain, guarded]
    rng = random.Random(1234)  # the same sequence of calls on every rank
    failures, calls = [], 0
    start = time.monotonic()
    for comm in comms:  # warm-up: every operation and dtype at the largest size
        for op in OPS:
            for dtype in DTYPES:
                calls += 1
                if not run_one(comm, calls, op, dtype, *draw(rng, largest=True)):
                    failures.append((calls, op, str(dtype), "warm-up"))
    warm = state(comms)
    marks = []
    for i in range(steps):
        calls += 1
        comm = comms[rng.randrange(2)]
        op, dtype = rng.choice(OPS), rng.choice(DTYPES)
        args = draw(rng)
        if not run_one(comm, calls, op, dtype, *args):
            failures.append((calls, op, str(dtype), comm.unique_name, args[:2]))
        if (i + 1) % max(1, steps // MARKS) == 0:
            marks.append((i + 1, state(comms)))
    end = state(comms)
    elapsed = time.monotonic() - start
    every_failures = WORLD.allgather(failures)
    every_end = WORLD.allgather({"warm": warm, "end": end, "marks": marks})
    for comm in comms:
        comm.destroy()
    if RANK == 0:
        summary = {
            "ranks": W,
            "calls": calls,
            "seconds": round(elapsed, 1),
            "failures": sum(len(f) for f in every_failures),
            "first_failures": [f for fs in every_failures for f in fs][:5],
            "rss_growth_bytes": [e["end"]["rss"] - e["warm"]["rss"] for e in every_end],
            "rss_marks_mib": [
                [round(m["rss"] / 2**20, 1) for _, m in e["marks"]] for e in every_end
            ],
            "rss_slope_bytes_per_call": [
                round(slope([i for i, _ in e["marks"]], [m["rss"] for _, m in e["marks"]]), 1)
                for e in every_end
            ],
            "objects_marks": [[m["objects"] for _, m in e["marks"]] for e in every_end],
            "objects_growth": [e["end"]["objects"] - e["warm"]["objects"] for e in every_end],
            "workspace_growth_bytes": [
                e["end"]["workspace"] - e["warm"]["workspace"] for e in every_end
            ],
            "outstanding_end": [e["end"]["outstanding"] for e in every_end],
        }
        print("SOAK " + json.dumps(summary), flush=True)
    return 0 if not any(every_failures) else 1


if __name__ == "__main__":
    sys.exit(main())
