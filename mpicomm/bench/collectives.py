"""The benchmark's collectives: the one list of their names and their entries, in table order.

Each entry is a thin class (:mod:`.dense`, :mod:`.moe`) that builds one timed case per backend;
what they share (inputs, references, the case types) is in :mod:`.cases`.
"""

from __future__ import annotations

from .cases import BACKENDS, Case, Ctx, Entry, Skip, pattern, summed, uneven
from .dense import (
    AllGather,
    AllGatherV,
    AllReduce,
    Broadcast,
    ReduceScatter,
    ReduceScatterV,
    SendRecv,
)
from .moe import Combine, Dispatch

ENTRIES: dict[str, Entry] = {
    e.name: e
    for e in (
        AllReduce(),
        AllGather(),
        ReduceScatter(),
        AllGatherV(),
        ReduceScatterV(),
        Broadcast(),
        SendRecv(),
        Dispatch(),
        Combine(),
    )
}
COLLECTIVES: tuple[str, ...] = tuple(ENTRIES)

__all__ = [
    "BACKENDS",
    "COLLECTIVES",
    "ENTRIES",
    "Case",
    "Ctx",
    "Entry",
    "Skip",
    "pattern",
    "summed",
    "uneven",
]
