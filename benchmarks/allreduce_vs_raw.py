"""fp32 all_reduce of one size: mpicomm against raw mpi4py on the same input buffer, side by side.

    mpiexec -n 2 python benchmarks/allreduce_vs_raw.py [MiB]      (default 16)

Times, interleaved over rounds (median per round, best round reported):
- ``raw (reused out)``: ``Allreduce`` into one preallocated buffer (the floor);
- ``raw (fresh out)``: ``Allreduce`` into a new tensor each call, dropped before the next;
- ``mpicomm``: ``MPICommunicator.all_reduce`` (fresh result, dropped before the next call);
- ``mpicomm (keep prev)``: the same while the previous result is still alive, as a pipeline
  holds its last activation: glibc then returns and re-faults the pages of large results unless
  ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` keep them (see docs/benchmarks.md);
- ``mpicomm (4K pages)``: ``mpicomm`` without the huge-page advice on large results
  (``buffers.HUGE_PAGES_FROM``), to show what it saves.
"""

import sys
import time

import numpy as np
import torch
from mpi4py import MPI

import mpicomm
from mpicomm import buffers

torch.set_num_threads(1)
world = MPI.COMM_WORLD
count = int(float(sys.argv[1]) * (1 << 20)) // 4 if len(sys.argv) > 1 else 4 << 20
x = torch.randn(count, generator=torch.Generator().manual_seed(world.Get_rank()))
reused = torch.empty_like(x)
comm = mpicomm.MPICommunicator(world, unique_name="bench")
kept = [None]
huge_from = buffers.HUGE_PAGES_FROM


def raw_reused():
    world.Allreduce(x.numpy(), reused.numpy())


def raw_fresh():
    out = torch.empty_like(x)
    world.Allreduce(x.numpy(), out.numpy())


def mpicomm_fresh():
    comm.all_reduce(x)


def mpicomm_keep():
    kept[0] = comm.all_reduce(x)


def mpicomm_small_pages():
    buffers.HUGE_PAGES_FROM = 1 << 62  # results on 4 KiB pages, as before 2026-11-24
    try:
        comm.all_reduce(x)
    finally:
        buffers.HUGE_PAGES_FROM = huge_from


cases = {
    "raw (reused out)": raw_reused,
    "raw (fresh out)": raw_fresh,
    "mpicomm": mpicomm_fresh,
    "mpicomm (keep prev)": mpicomm_keep,
    "mpicomm (4K pages)": mpicomm_small_pages,
}
best = {name: float("inf") for name in cases}
for _ in range(5):
    for name, fn in cases.items():
        times = []
        for _ in range(7):
            world.Barrier()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        best[name] = min(best[name], float(np.median(times)))
assert torch.equal(comm.all_reduce(x), reused)  # same bits as MPI's own sum
if world.Get_rank() == 0:
    print(f"fp32 all_reduce, {count * 4 / 2**20:g} MiB, {world.Get_size()} ranks")
    for name, t in best.items():
        print(f"  {name:<20} {t * 1e3:8.2f} ms   {best['raw (reused out)'] / t:5.2f}x raw")
comm.destroy()
