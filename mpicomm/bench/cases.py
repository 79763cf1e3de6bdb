"""What every collective entry of the benchmark shares: the case types, inputs and references.

Each entry (:mod:`.dense`, :mod:`.moe`) turns ``(backend, dtype, count)`` into a :class:`Case`: a
``run()`` that performs the operation once, and a ``check()`` that verifies the result of the last
``run()`` (or of one fresh call, for in-place baselines) against a reference computed locally.
``count`` is the element count of the larger buffer of the operation, as nccl-tests reports it:
the result of an all-gather, the input of a reduce-scatter, the buffer of an all-reduce,
broadcast or send.

Inputs follow a periodic pattern of small integers (``-2..2``, different per rank) so that sums
are exact in every dtype, including bfloat16, and the reference needs no tolerance.

Backends: ``mpicomm`` (the communicator under test, tensors on the benchmark's device, fresh
results as the contract requires), ``mpi4py`` (raw buffer API on preallocated host numpy arrays:
the floor of mpicomm's own overhead), ``gloo`` (torch.distributed on tensors on the benchmark's
device, preallocated outputs where the API allows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mpicomm.dtypes import dtype_info

from .._mpi import MPI

BACKENDS = ("mpicomm", "mpi4py", "gloo")


class Skip(Exception):
    """This backend cannot run this case; the message says why (it goes into the JSON)."""


@dataclass
class Ctx:
    """What the entries need: the MPI communicator for baselines, the communicator under test."""

    comm: MPI.Comm
    communicator: object | None
    gloo: bool
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def size(self) -> int:
        return self.comm.size

    @property
    def peers(self) -> tuple[int, int]:
        """(rank + 1, rank - 1) around the ring: where send/recv cases send and receive."""
        return (self.rank + 1) % self.size, (self.rank - 1) % self.size


@dataclass
class Case:
    """One operation ready to time: ``run()`` once per iteration, ``check()`` once after."""

    run: Callable[[], object]
    check: Callable[[], bool]


def pattern(count: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
    """Rank ``rank``'s input: ``((i + 3 * rank) % 5) - 2`` (no ``- 2`` for unsigned dtypes)."""
    cycle = (torch.arange(5) + 3 * rank) % 5
    if dtype.is_signed:
        cycle = cycle - 2
    reps = -(-count // 5) if count else 0
    return cycle.to(dtype).repeat(reps)[:count].contiguous()


def summed(count: int, nranks: int, dtype: torch.dtype) -> torch.Tensor:
    """The exact sum over ranks of :func:`pattern` (computed on one period, then repeated)."""
    period = sum(pattern(5, r, dtype).to(torch.float64) for r in range(nranks))
    reps = -(-count // 5) if count else 0
    return period.to(dtype).repeat(reps)[:count].contiguous()


def uneven(total: int, nranks: int) -> list[int]:
    """Row counts per rank in proportion 1:2:...:n (the last takes the remainder)."""
    weight = nranks * (nranks + 1) // 2
    sizes = [total * (r + 1) // weight for r in range(nranks)]
    sizes[-1] += total - sum(sizes)
    return sizes


def host_pair(x: torch.Tensor, out_count: int):
    """For raw mpi4py: the host output tensor and the numpy views of ``x`` and of it."""
    y = torch.empty(out_count, dtype=x.dtype)
    return y, to_numpy(x), to_numpy(y)


def to_numpy(t: torch.Tensor):
    """The numpy view of a CPU tensor (dtypes numpy cannot name as their same-size carrier)."""
    return t.view(dtype_info(t.dtype).carrier).numpy()


def same(out: torch.Tensor, ref: torch.Tensor) -> bool:
    out = out.reshape(-1)
    return out.dtype == ref.dtype and out.shape == ref.shape and torch.equal(out.cpu(), ref)


def device_sync(ctx: Ctx) -> Callable[[], None]:
    if ctx.device.type == "cuda":
        return lambda: torch.cuda.synchronize(ctx.device)
    return lambda: None


def result_case(call: Callable[[], object], ref: Callable[[object], bool], ctx: Ctx) -> Case:
    """A case whose ``run`` returns a fresh result (device synchronised); ``check`` looks at the
    last one."""
    box: list = [None]
    sync = device_sync(ctx)

    def run():
        box[0] = call()
        sync()

    return Case(run=run, check=lambda: ref(box[0]))


def gloo_case(ctx: Ctx, run: Callable[[], object], check: Callable[[], bool]) -> Case:
    """A gloo case on the benchmark's device (each call synchronised, as mpicomm's are)."""
    sync = device_sync(ctx)

    def timed():
        run()
        sync()

    return Case(run=timed, check=check)


def dist():
    import torch.distributed

    return torch.distributed


GLOO_NO_V = "torch.distributed gloo has no {} (its collectives need equal sizes)"


class Entry:
    """Base of a collective entry. ``factor(n)`` is nccl-tests' busbw factor; ``io(n)`` the
    fractions of the case size that enter and leave a rank (for the staging floor on a device)."""

    name = ""
    reduces = False
    even = False  # equal parts per rank: a case needs at least one element per rank

    def factor(self, n: int) -> float:
        return 1.0

    def io(self, n: int) -> tuple[float, float]:
        return 1.0, 1.0

    def min_count(self, n: int) -> int:
        return n if self.even else 1

    def build(self, ctx: Ctx, backend: str, dtype: torch.dtype, count: int) -> Case:
        if backend == "gloo" and not ctx.gloo:
            raise Skip("gloo not initialised")
        if backend == "mpicomm" and ctx.communicator is None:
            raise Skip("no mpicomm communicator")
        if self.reduces and backend == "mpi4py" and dtype_info(dtype).sum_op != MPI.SUM:
            raise Skip(f"raw MPI has no correct sum for {str(dtype).removeprefix('torch.')}")
        return getattr(self, backend)(ctx, dtype, count)

    def gloo(self, ctx: Ctx, dtype: torch.dtype, count: int) -> Case:
        raise Skip(f"torch.distributed gloo has no {self.name}")
