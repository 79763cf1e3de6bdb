"""``python -m mpicomm info``: the MPI library, its thread level and CUDA awareness, and where
every rank runs."""

from __future__ import annotations

import mpi4py
import torch

from . import plan
from ._mpi import MPI
from .buffers import HUGE_PAGES_FROM, RECYCLE_FROM, recycler, thp_mode
from .config import (
    hierarchical_mode,
    huge_pages_on,
    recycle_on,
    shm_direct_on,
    shm_mode,
    staging_on,
)
from .cuda import cuda_awareness_report, loaded_libmpi
from .shm import built as shm_built
from .topology import default_device, node_topology

_THREAD_LEVELS = ("THREAD_SINGLE", "THREAD_FUNNELED", "THREAD_SERIALIZED", "THREAD_MULTIPLE")


def _thread_level() -> str:
    """``multiple`` (the thread level MPI gave this process), or its number if not a known one."""
    level = MPI.Query_thread()
    names = {getattr(MPI, name): name.removeprefix("THREAD_").lower() for name in _THREAD_LEVELS}
    return names.get(level, str(level))


def huge_pages_report() -> str:
    """Whether large fresh results are put on transparent huge pages, and whether Linux obliges."""
    if not huge_pages_on():
        return "off (MPICOMM_HUGE_PAGES=0)"
    wanted = f"for host results >= {HUGE_PAGES_FROM >> 20} MiB"
    mode = thp_mode()
    if mode is None:
        return f"asked {wanted}; transparent huge pages: unknown here"
    if mode == "never":
        return f"asked {wanted}, but transparent huge pages are off (never): no effect"
    return f"on {wanted} (transparent huge pages: {mode})"


def result_memory_report() -> str:
    """Where large host results come from: recycled storages, or new memory every time."""
    if not recycle_on():
        return "new memory every time (MPICOMM_RECYCLE=0)"
    if not recycler.available:
        return "new memory every time (this torch cannot count a storage's users)"
    return f"recycled storages for host results >= {RECYCLE_FROM >> 20} MiB"


def _or_error(report_line) -> str:
    """``report_line()``, or the malformed setting it tripped on (info never needs settings)."""
    try:
        return report_line()
    except ValueError as exc:
        return f"unknown: {exc}"


def transport_report(num_nodes: int) -> list[str]:
    """The engine each kind of group gets for host tensors, as :func:`mpicomm.plan.engine_for`
    picks it from this process's settings (docs/architecture.md, "Engines"; docs/shm.md)."""
    try:
        mode, direct = shm_mode(), shm_direct_on()
        hierarchical, staging = hierarchical_mode(), staging_on()
    except ValueError as exc:
        return [f"engines          unknown: {exc}"]
    built = shm_built()
    large = (
        "large messages read from peers' tensors directly where the kernel allows it"
        if direct
        else "large messages copied through the segment (MPICOMM_SHM_DIRECT=0)"
    )
    why_mpi = plan.no_segment_reason(mode, built, True, staging)
    words = {
        plan.SHM: f"shared memory (mpicomm.shm, compiled core built; {large})",
        plan.HIERARCHICAL: "MPI, sums node-aware (MPICOMM_HIERARCHICAL: shared memory inside each "
        "node where the core is built, MPI between nodes)",
    }
    lines = []
    for label, node_of, why in (
        ("one-node groups ", (0, 0), why_mpi),
        ("multi-node      ", (0, 1), "MPICOMM_HIERARCHICAL=0"),
    ):
        try:
            kind = plan.engine_for(mode, built, node_of, hierarchical, staging)
            lines.append(f"{label} {words.get(kind, f'MPI ({why})')}")
        except ValueError as exc:
            lines.append(f"{label} refused: {exc}")
    if num_nodes == 1:
        lines[1] += " (this job: one node)"
    return [*lines, "CUDA tensors     MPI (CUDA-aware, or staged through pinned host memory)"]


def report(comm: MPI.Comm | None = None) -> str | None:
    """The info text on rank 0 of ``comm`` (``None`` elsewhere). Collective."""
    comm = MPI.COMM_WORLD if comm is None else comm
    topo = node_topology(comm)
    device = default_device(topo.local_rank)
    rows = comm.gather(
        (
            comm.Get_rank(),
            topo.hostname,
            topo.node_index,
            topo.local_rank,
            topo.local_size,
            str(device),
        ),
        root=0,
    )
    if comm.Get_rank() != 0:
        return None
    version = MPI.Get_library_version().strip().splitlines()[0]
    lines = [
        f"MPI library      {version}",
        f"libmpi           {loaded_libmpi() or 'unknown'}",
        f"MPI standard     {'.'.join(map(str, MPI.Get_version()))}",
        f"mpi4py           {mpi4py.__version__}",
        f"thread level     {_thread_level()}",
        f"torch            {torch.__version__} (CUDA available: {torch.cuda.is_available()})",
        f"CUDA-aware MPI   {_or_error(cuda_awareness_report)}",
        f"huge pages       {_or_error(huge_pages_report)}",
        f"large results    {_or_error(result_memory_report)}",
        *transport_report(topo.num_nodes),
        f"ranks            {comm.Get_size()} on {topo.num_nodes} node(s)",
        "",
        f"{'rank':>4}  {'host':<20} {'node':>4} {'local':>5} {'of':>3}  device",
    ]
    for rank, host, node, local, size, dev in rows:
        lines.append(f"{rank:>4}  {host:<20} {node:>4} {local:>5} {size:>3}  {dev}")
    return "\n".join(lines)
