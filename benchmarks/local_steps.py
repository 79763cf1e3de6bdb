"""Two local steps of mpicomm's collectives, each timed against what it replaced, side by side.

    PYTHONPATH=. python benchmarks/local_steps.py        (one process, no mpiexec)

1. Filling a fresh 64 MiB result (what MPI does to an all_reduce output): plain ``torch.empty``
   against ``buffers.huge_pages(torch.empty(...))``. Best of 10 (fresh memory each time).
2. The two-rank bf16 sum of the bytes algorithm (``reduction.sum_in_rank_order`` on (2, n)):
   the single ``torch.add`` against the widen-and-add path it replaced. Best of 30 batches.
"""

from __future__ import annotations

import functools
import time

import torch

from mpicomm import buffers, reduction
from mpicomm.dtypes import DTYPES


def best_ms(fn, reps: int = 10, batch: int = 1) -> float:
    low = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(batch):
            fn()
        low = min(low, (time.perf_counter() - start) / batch)
    return low * 1e3


def main() -> None:
    torch.set_num_threads(1)
    src = torch.ones(16 << 20)  # 64 MiB of float32
    print(f"transparent huge pages: {buffers.thp_mode()}")
    plain = best_ms(lambda: torch.empty_like(src).copy_(src))
    huge = best_ms(lambda: buffers.huge_pages(torch.empty_like(src)).copy_(src))
    print(
        f"fill a fresh 64 MiB result: 4 KiB pages {plain:7.2f} ms, huge pages {huge:7.2f} ms"
        f"  ({plain / huge:.2f}x)"
    )

    info = DTYPES[torch.bfloat16]
    for n in (1024, 65536, 1 << 20):
        parts = torch.randn(2, n).to(torch.bfloat16)
        out, ws = torch.empty(n, dtype=torch.bfloat16), buffers.Workspace()
        run = functools.partial(reduction.sum_in_rank_order, parts, out, info, ws)
        added = best_ms(run, reps=30, batch=20)
        saved = reduction._ADD_IN_FLOAT32
        reduction._ADD_IN_FLOAT32 = set()  # the widen-and-add path
        try:
            widened = best_ms(run, reps=30, batch=20)
        finally:
            reduction._ADD_IN_FLOAT32 = saved
        print(
            f"2-rank bf16 sum of {n:8d}: widen+add {widened * 1e3:9.1f} us, torch.add "
            f"{added * 1e3:9.1f} us  ({widened / added:.2f}x)"
        )


if __name__ == "__main__":
    main()
