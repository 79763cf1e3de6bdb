"""Physical references measured beside the collectives: memory copies and the staging floor.

On every rank at once: torch ``copy_`` of the case size (``memcpy``); in the device mode also
device -> pinned host (``d2h``) and pinned host -> device (``h2d``) copies, the way mpicomm's
staging path copies (docs/gpu.md). The staging floor of a case is the time its two staged copies
take at those bandwidths (input down, result up): a lower bound for the staged path.
"""

from __future__ import annotations

import torch

from .._mpi import MPI
from .timing import Schedule, figures, time_loop
from .units import human


def copy_kinds(device_mode: bool) -> list[str]:
    return ["memcpy"] + (["d2h", "h2d"] if device_mode else [])


def measure_copies(
    comm: MPI.Comm, device: torch.device, sizes: list[int], sched: Schedule, kinds, step
) -> list[dict]:
    """One record per size and kind (``backend`` ``torch``); ``step(label)`` after each.

    On a CPU device (the device mode's dry run) the "device" side is host memory and the host
    side is not pinned: the same code runs, the figures are memcpy figures.
    """
    out = []
    cuda = device.type == "cuda"
    for nbytes in sizes:
        for kind in kinds:
            if kind == "memcpy":
                src = torch.ones(nbytes, dtype=torch.uint8, device=device)
                dst = torch.empty_like(src)
            else:
                dev = torch.ones(nbytes, dtype=torch.uint8, device=device)
                host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
                src, dst = (dev, host) if kind == "d2h" else (host, dev)

            def run(src=src, dst=dst):
                dst.copy_(src)
                if cuda:
                    torch.cuda.synchronize(device)

            timing = time_loop(run, None, comm, sched.warmup(nbytes), sched.iters(nbytes))
            rec = {
                "collective": kind,
                "backend": "torch",
                "dtype": "uint8",
                "bytes": nbytes,
                "count": nbytes,
                "nranks": comm.size,
            }
            figures(rec, timing.times, 1.0)
            out.append(rec)
            step(f"{kind} {human(nbytes)}")
            del src, dst
    return out


def add_staging_floors(results: list[dict], copies: list[dict], entries: dict) -> None:
    """Set ``staging_floor_us`` (and ``floor_over_time``) on every measured mpicomm record whose
    size has d2h and h2d references: input bytes at the d2h bandwidth + result bytes at h2d."""
    bw = {(c["collective"], c["bytes"]): c["algbw_GBps"] for c in copies}
    for r in results:
        down, up = bw.get(("d2h", r["bytes"])), bw.get(("h2d", r["bytes"]))
        if r["backend"] != "mpicomm" or "time_us" not in r or not down or not up:
            continue
        into, back = entries[r["collective"]].io(r["nranks"])
        floor = (r["bytes"] * into / (down * 1e9) + r["bytes"] * back / (up * 1e9)) * 1e6
        r["staging_floor_us"] = floor
        r["floor_over_time"] = floor / r["time_us"]
