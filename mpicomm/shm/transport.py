"""The shared-memory transport of one communicator whose ranks all share a node (docs/shm.md).

:func:`open_transport` (collective on the cpu communicator, at construction) maps one POSIX
shared-memory segment for the group, or returns ``None`` when the group cannot use one (the
compiled core is missing, the group spans nodes, ``MPICOMM_SHM=0``, no room in /dev/shm); the
communicator then uses MPI alone. The segment's name is removed as soon as it is made (peers open
it through the creator's descriptor), so no file is left in ``/dev/shm`` whatever happens to the
job; :meth:`Transport.close` unmaps it.

The per-call methods take host tensors and return fresh results, or ``None`` for a dtype the
compiled sums do not cover (the caller then takes the MPI path). Waits honour the communicator's
timeout and notice dead peers: both raise (docs/contract.md, "Errors").

Why it has more than 400 lines: one thin method per collective (the hot paths and the general
ones), each around a single call into the core with the same two error handlers written out in
place rather than behind a shared wrapper, which would add a Python call to every hot-path call.
"""

from __future__ import annotations

import itertools
import logging
import os
import uuid

import numpy as np
import torch

from .._mpi import MPI
from ..buffers import SMALL_RESULT, ResultMemory
from ..calls import Caller
from ..dtypes import DTYPES
from ..errors import CollectiveTimeoutError, CommunicationError
from ..staging import readable, writable_into

try:
    from . import _core
except ImportError:  # not compiled here: every collective takes the MPI path
    _core = None

# Bytes per slot: each rank has two (double buffering); any message streams through them.
SLOT_BYTES = 1 << 20
# all_reduce messages are summed one-shot (every rank sums every slot) while each rank reads at
# most ONESHOT_PEER_BYTES of its peers' slots ((W - 1) x the message), bfloat16/float16 ones up to
# ONESHOT_NARROW_MAX bytes (their conversions make every rank's full sum costlier); larger ones are
# reduce-scattered and all-gathered inside the segment: each rank sums 1/W of the elements for one
# more wait. The limits come from side-by-side runs of the two on the hot path (2 ranks:
# benchmarks/results/history/2026-12-03-shared-memory.md, fourth pass).
ONESHOT_PEER_BYTES = 128 << 10
ONESHOT_NARROW_MAX = 16 << 10
# Messages of at least this many bytes (all_reduce, reduce_scatter: the whole input; gathers: the
# whole output; broadcast: the tensor) skip the slots where peers can read each other's memory
# (process_vm_readv): one copy per byte instead of two, but every read pins the peer's pages, which
# costs more than the second copy until messages are tens of MiB. Measured side by side with
# benchmarks/shm_direct.py (docs/shm.md, "Measured").
DIRECT_FROM = 32 << 20
# Calls moving at least this many bytes release the GIL for the whole call (other threads run
# while it copies and sums). Smaller ones keep it unless a wait outlasts the first spins: then
# they release it too, since a wait that holds it stops this process's other threads, one of which
# may be the peer a rank is waiting for in another communicator (docs/reliability.md, "Threads").
# Releasing and taking it back would cost a small call a tenth of its time.
GIL_FREE_FROM = 64 << 10

# The compiled sums' element kinds: dtype -> (kind, kind elements per element). Integers of one
# width share a kind (wrapping sums have the same bits signed or not); complex sums are sums of
# (re, im) pairs. Other dtypes (8-bit floats) take the MPI path.
_BOOL, _I8, _I16, _I32, _I64, _F32, _F64, _BF16, _F16, _BF16_WIDE, _F16_WIDE = range(1, 12)
KINDS: dict[torch.dtype, tuple[int, int]] = {
    torch.bool: (_BOOL, 1),
    torch.uint8: (_I8, 1),
    torch.int8: (_I8, 1),
    torch.int16: (_I16, 1),
    torch.uint16: (_I16, 1),
    torch.int32: (_I32, 1),
    torch.uint32: (_I32, 1),
    torch.int64: (_I64, 1),
    torch.uint64: (_I64, 1),
    torch.float32: (_F32, 1),
    torch.float64: (_F64, 1),
    torch.complex64: (_F32, 2),
    torch.complex128: (_F64, 2),
    torch.bfloat16: (_BF16, 1),
    torch.float16: (_F16, 1),
}

# 16-bit floats that :meth:`Transport.reduce_scatter` sums into float32 results, unrounded.
_WIDE = {torch.bfloat16: _BF16_WIDE, torch.float16: _F16_WIDE}

# The dtypes :meth:`Transport.sum_fresh` takes: real ones (one kind element per element).
_REAL = {dtype: kind for dtype, (kind, per) in KINDS.items() if per == 1}
# The dtypes the gathers' hot paths move (every one in the dtype table), with their sizes.
_ITEMSIZES = {dtype: info.itemsize for dtype, info in DTYPES.items()}
_NEVER = (1 << 63) - 1
_counter = itertools.count()
_warned = False
log = logging.getLogger("mpicomm")


def built() -> bool:
    """Whether the compiled core is importable here."""
    return _core is not None


def segment_name(pid: int, serial: int, token: str) -> str:
    """The POSIX shared-memory name of one group's segment: the job (its scheduler id when there
    is one), the creating rank's pid, a per-process serial and a random token, so two groups or
    two jobs on one node never share a name."""
    job = os.environ.get("SLURM_JOB_ID") or "job"
    return f"/mpicomm-{job}-{pid}-{serial}-{token}"


def _no_segment(group: str, error: str) -> None:
    """Log that ``group`` takes MPI for want of a segment: once per process at WARNING (a full
    /dev/shm fails every later group alike), then at DEBUG."""
    global _warned
    level = logging.DEBUG if _warned else logging.WARNING
    _warned = True
    log.log(level, "%s: no shared memory (%s); collectives use MPI", group, error)


def open_transport(
    comm: MPI.Comm, caller: Caller, results: ResultMemory, direct: bool = True
) -> Transport | None:
    """Map a segment for ``comm``'s group (all ranks on one node; collective on ``comm``).

    Rank 0 creates it under a fresh name, removes the name at once (nothing can be left in
    /dev/shm, whichever rank dies when) and reserves its memory (a full /dev/shm fails here, not
    with a SIGBUS later); it broadcasts ``/proc/<pid>/fd/<fd>``, which every other rank opens and
    maps; an allreduce of the outcome follows, after which rank 0 closes its descriptor. ``None``
    on every rank if any rank failed (logged once per process at WARNING, later at DEBUG), so all
    ranks take the MPI path alike. Large messages read peers' tensors directly when ``direct``
    (``MPICOMM_SHM_DIRECT``) is on at every rank and every rank can read every peer's memory
    (probed here).
    """
    if _core is None:
        return None
    world, rank = comm.Get_size(), comm.Get_rank()
    if world > _core.MAXW:
        return None
    where, segment, error = "", None, ""
    if rank == 0:
        name = segment_name(os.getpid(), next(_counter), uuid.uuid4().hex[:12])
        try:
            segment = _core.Segment(name, world, rank, SLOT_BYTES, True)
            where = f"/proc/{os.getpid()}/fd/{segment.fd}"
        except Exception as exc:  # any failure (a core older than this module too): every
            error, segment = str(exc), None  # rank still takes part in the exchanges, then MPI
            _core.unlink(name)  # an older core leaves the name in place
    where = comm.bcast(where, root=0)
    if rank != 0 and where:
        try:
            segment = _core.Segment(where, world, rank, SLOT_BYTES, False)
        except Exception as exc:
            error = str(exc)
    ok = _all_agree(comm, not error and bool(where))
    if segment is not None:
        segment.close_fd()  # every rank has mapped it (or given up)
    if not ok:
        if segment is not None:
            segment.close()
        if error:
            _no_segment(caller.group, error)
        return None
    segment.start()
    segment.oneshot_max = ONESHOT_PEER_BYTES // max(1, world - 1)
    segment.oneshot_narrow_max = ONESHOT_NARROW_MAX
    segment.gil_free_from = GIL_FREE_FROM
    readable_peers = world > 1 and segment.probe_direct()
    if _all_agree(comm, direct and readable_peers):
        segment.direct_from = DIRECT_FROM
    return Transport(segment, caller, results)


def _all_agree(comm: MPI.Comm, yes: bool) -> bool:
    """True on every rank when ``yes`` on every rank (collective). A buffer ``Allreduce``: mpi4py's
    pickled ``allreduce`` with an op keeps a hidden duplicate of ``comm`` for good."""
    flag = np.array([1 if yes else 0], dtype=np.int32)
    comm.Allreduce(MPI.IN_PLACE, flag, op=MPI.MIN)
    return bool(flag[0])


class Transport:
    """One group's segment and the collectives it runs (host tensors only).

    ``caller`` is the communicator's :class:`~mpicomm.calls.Caller`: its timeout bounds the waits
    (:attr:`timeout` follows it when the communicator's changes) and its ``broken`` state is
    shared: a failure here makes the MPI paths refuse too, and the other way round.
    """

    __slots__ = ("_seg", "_caller", "world", "rank", "_results")

    def __init__(self, segment, caller: Caller, results: ResultMemory) -> None:
        self._seg = segment
        self._caller = caller
        self.world = segment.world
        self.rank = segment.rank
        self._results = results
        self.timeout = caller.timeout
        self._hot_config()

    def _hot_config(self, small=torch.empty_like, new=torch.Tensor.new_empty) -> None:
        """Tell the compiled hot paths (:meth:`sum_fresh`, :meth:`gather_fresh`,
        :meth:`gatherv_fresh`, :meth:`scatter_fresh`) what they take and where their results
        come from: below ``SMALL_RESULT`` bytes ``small(x)`` for a sum and ``new(x, shape)`` for
        the others (what ResultMemory would give, without that call); ResultMemory's
        ``empty_like`` for larger sums (larger gathers and reduce-scatters take the general
        path). Tests pass other allocators."""
        self._seg.hot_config(
            torch.Tensor,
            _REAL,
            _ITEMSIZES,
            torch.strided,
            small,
            new,
            self._results.empty_like,
            SMALL_RESULT,
        )

    @property
    def timeout(self) -> float | None:
        t = self._seg.timeout
        return t if t > 0 else None

    @timeout.setter
    def timeout(self, seconds: float | None) -> None:
        self._seg.timeout = seconds or 0.0

    @property
    def direct_from(self) -> int | None:
        """Bytes from which peers' tensors are read directly; ``None``: never (docs/shm.md). Set
        it to the same value on every rank (tests compare the two paths)."""
        n = self._seg.direct_from
        return None if n >= _NEVER else n

    @direct_from.setter
    def direct_from(self, nbytes: int | None) -> None:
        self._seg.direct_from = _NEVER if nbytes is None else nbytes

    @staticmethod
    def sums(dtype: torch.dtype) -> bool:
        """Whether the compiled core sums ``dtype`` (else a sum takes the MPI path)."""
        return dtype in KINDS

    def close(self) -> None:
        """Unmap the segment (its name is already gone)."""
        self._seg.close()

    def _refused(self, operation: str) -> CommunicationError:
        return CommunicationError(
            f"{operation} on group {self._caller.group!r}: the communicator is unusable after "
            f"an earlier failure ({self._caller.broken})",
            operation=operation,
            group=self._caller.group,
        )

    def _failed(self, operation: str, exc: Exception) -> CommunicationError:
        """The error of a wait that failed (``exc``: the core's WaitError); marks the
        communicator broken, except when the ranks disagreed on the call (every rank then fails
        at the same stage, having read nothing, and the segment stays in step)."""
        what, ranks, seconds = exc.args
        ranks = list(ranks)
        listed = ", ".join(map(str, ranks))
        caller = self._caller
        group = caller.group
        if what == "timeout":
            noun = "rank" if len(ranks) == 1 else "ranks"  # worded as mpicomm.calls words it
            caller.broken = f"{operation} timed out after {seconds:g} s"
            return CollectiveTimeoutError(
                f"{operation} on group {group!r} did not complete within {seconds:g} s "
                f"(MPICOMM_TIMEOUT). Group {noun} {listed} had not entered it (shared memory). "
                "A rank may have failed, be stuck, or never have called it. End the job: leave "
                "this error uncaught (mpicomm's abort hook then calls MPI_Abort).",
                operation=operation,
                group=group,
                timeout=seconds,
                missing=ranks,
            )
        if what == "died":
            caller.broken = f"group rank(s) {listed} died during {operation}"
            return CommunicationError(
                f"{operation} on group {group!r}: group rank(s) {listed} died (their process "
                "is gone) while this rank waited for them in shared memory. End the job.",
                operation=operation,
                group=group,
            )
        if what == "mismatch":
            return CommunicationError(
                f"{operation} on group {group!r}: group rank(s) {listed} passed a different call "
                "(another operation, or other sizes or dtype) than this rank. Nothing was read "
                "from any rank and the group stays usable; MPICOMM_VALIDATE=1 names the "
                "difference (docs/reliability.md).",
                operation=operation,
                group=group,
            )
        caller.broken = caller.broken or f"the shared memory is {what}"
        return self._refused(operation)

    def _interrupted(self, operation: str, exc: BaseException) -> None:
        """After ``exc`` left a call: when a signal handler raised it during a wait (the core
        then marks the segment broken: the peers are mid-call), mark the communicator broken, as
        the MPI paths do (docs/reliability.md); an allocation's error leaves the ranks in step."""
        if self._seg.broken and self._caller.broken is None:
            self._caller.broken = (
                f"{operation} was interrupted by {type(exc).__name__} while waiting"
            )

    # ------------------------------------------------------------------ collectives
    def sum_fresh(self, x) -> torch.Tensor | None:
        """The hot path of a model layer's sum (docs/shm.md, "Per call"): the rank-order sum of
        every rank's ``x`` in a fresh tensor, where ``x`` is a plain dense contiguous host tensor
        of a real dtype with no lazy bit; ``None`` (no wait, nothing done) for anything else or
        when the group is broken: the caller then validates and takes :meth:`all_reduce`.

        One call into the compiled core, which reads x's attributes, allocates the result and sums
        (``Segment.sum_fresh``).
        """
        if self._caller.broken is not None:
            return None
        try:
            return self._seg.sum_fresh(x)
        except _core.WaitError as exc:
            raise self._failed("all_reduce", exc) from None
        except BaseException as exc:
            self._interrupted("all_reduce", exc)
            raise

    def sum_into(self, x) -> torch.Tensor | None:
        """The hot path of an in-place sum (torch.distributed's all_reduce): ``x`` <- the
        rank-order sum of every rank's ``x``, for the tensors :meth:`sum_fresh` takes that do not
        require grad; returns ``x``, or ``None`` (no wait, nothing done) for anything else or
        when the group is broken (``Segment.sum_into``)."""
        if self._caller.broken is not None:
            return None
        try:
            return self._seg.sum_into(x)
        except _core.WaitError as exc:
            raise self._failed("all_reduce", exc) from None
        except BaseException as exc:
            self._interrupted("all_reduce", exc)
            raise

    def gather_fresh(self, x, dim, out=None) -> torch.Tensor | None:
        """The hot path of an all_gather (docs/shm.md, "Per call"): ``torch.cat`` of every rank's
        ``x`` along ``dim`` in a fresh tensor (or in ``out``, a plain contiguous host tensor of
        the result's shape and dtype, not requiring grad, sharing no memory with ``x``), where ``x`` is a plain contiguous host tensor of at
        least one dimension and the gather fits one round of the slots; ``None`` (no wait,
        nothing done) otherwise or when the group is broken: the caller then validates and takes
        :meth:`all_gather`. One call into the compiled core (``Segment.gather_fresh``)."""
        if self._caller.broken is not None:
            return None
        try:
            return self._seg.gather_fresh(x, dim, out)
        except _core.WaitError as exc:
            raise self._failed("all_gather", exc) from None
        except BaseException as exc:
            self._interrupted("all_gather", exc)
            raise

    def gatherv_fresh(self, x, dim, sizes, out=None) -> torch.Tensor | None:
        """The hot path of an all_gatherv along dim 0 (docs/shm.md, "Per call"): every rank's
        rows of ``x`` (``sizes[r]`` from rank r; ``None``: the same everywhere), rank after rank,
        in a fresh tensor (or in ``out``, as :meth:`gather_fresh` takes it), where ``x`` is a plain contiguous host tensor and the gather fits one
        round of the slots; ``None`` (no wait, nothing done) otherwise or when the group is
        broken: the caller then validates and takes :meth:`gatherv`. One call into the compiled
        core (``Segment.gatherv_fresh``)."""
        if self._caller.broken is not None:
            return None
        try:
            return self._seg.gatherv_fresh(x, dim, sizes, out)
        except _core.WaitError as exc:
            raise self._failed("all_gatherv", exc) from None
        except BaseException as exc:
            self._interrupted("all_gatherv", exc)
            raise

    def scatter_fresh(self, x, dim, sizes, operation: str, out=None) -> torch.Tensor | None:
        """The hot path of a reduce_scatter(v) along dim 0 (docs/shm.md, "Per call"): this rank's
        rows of the rank-order sum of every rank's ``x`` (``sizes`` rows per rank; ``None``: an
        even split) in a fresh tensor (or in ``out``, as :meth:`gather_fresh` takes it), where ``x`` is a plain contiguous host tensor of a real
        dtype and the call fits one round of the slots; ``None`` (no wait, nothing done)
        otherwise or when the group is broken: the caller then validates and takes
        :meth:`reduce_scatter`. One call into the compiled core (``Segment.scatter_fresh``)."""
        if self._caller.broken is not None:
            return None
        try:
            return self._seg.scatter_fresh(x, dim, sizes, out)
        except _core.WaitError as exc:
            raise self._failed(operation, exc) from None
        except BaseException as exc:
            self._interrupted(operation, exc)
            raise

    def all_reduce(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """The rank-order sum of every rank's ``x`` (a host tensor of any shape): written into
        ``out`` (x's shape and dtype; may be ``x`` itself) where its memory allows, else a fresh
        tensor; ``None`` for a dtype the compiled sums do not cover."""
        if self._caller.broken is not None:
            raise self._refused("all_reduce")
        kind = KINDS.get(x.dtype)
        if kind is None:
            return None
        if x.is_neg() or not x.is_contiguous() or (kind[1] == 2 and x.is_conj()):
            x = readable(x).contiguous()
        n = x.numel()
        if out is None or not writable_into(out, x):
            out = self._results.empty_like(x)
        try:
            self._seg.all_reduce(x.data_ptr(), out.data_ptr(), n * kind[1], kind[0])
        except _core.WaitError as exc:
            raise self._failed("all_reduce", exc) from None
        except BaseException as exc:
            self._interrupted("all_reduce", exc)
            raise
        return out

    def reduce_scatter(
        self,
        x: torch.Tensor,
        counts: list[int],
        shape,
        operation: str = "reduce_scatter",
        out: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Rank r: the sum over ranks of elements ``[sum(counts[:r]), +counts[r])`` of the
        contiguous ``x``, as a fresh tensor of ``shape``, or in ``out`` (a contiguous host tensor
        of ``shape`` sharing no memory with ``x``: the caller checks; x's dtype, or float32 for a
        float16/bfloat16 ``x``: then summed in float32 and not rounded); ``None`` for an
        uncovered dtype."""
        if self._caller.broken is not None:
            raise self._refused(operation)
        kind = KINDS.get(x.dtype)
        if out is not None and out.dtype != x.dtype:
            wide = _WIDE.get(x.dtype) if out.dtype == torch.float32 else None
            if wide is None:
                raise TypeError(f"reduce_scatter: {x.dtype} into {out.dtype}")
            kind = (wide, 1)
        if kind is None:
            return None
        x = readable(x).contiguous()
        if out is None:
            out = self._results.empty(shape, x.dtype)
        scale = kind[1]
        sizes = tuple(c * scale for c in counts)
        try:
            self._seg.reduce_scatter(x.data_ptr(), out.data_ptr(), sizes, kind[0])
        except _core.WaitError as exc:
            raise self._failed(operation, exc) from None
        except BaseException as exc:
            self._interrupted(operation, exc)
            raise
        return out

    def all_gather(
        self, x: torch.Tensor, shape, operation: str = "all_gather", out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Every rank's contiguous ``x`` (same size everywhere), rank after rank, in a fresh
        tensor of ``shape`` (W times ``x``'s elements), or in ``out`` (as :meth:`reduce_scatter`
        takes it)."""
        if self._caller.broken is not None:
            raise self._refused(operation)
        x = readable(x).contiguous()
        if out is None:
            out = self._results.empty(shape, x.dtype)
        try:
            self._seg.all_gather(x.data_ptr(), out.data_ptr(), x.nbytes)
        except _core.WaitError as exc:
            raise self._failed(operation, exc) from None
        except BaseException as exc:
            self._interrupted(operation, exc)
            raise
        return out

    def gatherv(
        self,
        x: torch.Tensor,
        rows: list[int],
        row_bytes: int,
        shape,
        root: int,
        out: torch.Tensor | None = None,
    ):
        """Rank r's ``rows[r]`` rows (contiguous ``x``), rank after rank, in a fresh tensor of
        ``shape`` (or in ``out``, as :meth:`reduce_scatter` takes it) on ``root`` (``-1``: on
        every rank); ``None`` on the other ranks."""
        if self._caller.broken is not None:
            raise self._refused("gather" if root >= 0 else "all_gatherv")
        x = readable(x).contiguous()
        receives = root < 0 or root == self.rank
        if not receives:
            out = None
        elif out is None:
            out = self._results.empty(shape, x.dtype)
        sizes = tuple(r * row_bytes for r in rows)
        try:
            self._seg.gatherv(x.data_ptr(), 0 if out is None else out.data_ptr(), sizes, root)
        except _core.WaitError as exc:
            raise self._failed("gather" if root >= 0 else "all_gatherv", exc) from None
        except BaseException as exc:
            self._interrupted("gather" if root >= 0 else "all_gatherv", exc)
            raise
        return out

    def broadcast(
        self, tensor: torch.Tensor, src: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rank ``src``'s ``tensor`` on every rank: in a fresh tensor, or in ``out`` (contiguous,
        host, tensor's shape and dtype; may be ``tensor`` itself)."""
        if self._caller.broken is not None:
            raise self._refused("broadcast")
        if out is None:
            out = self._results.empty(tensor.shape, tensor.dtype)
        if self.rank == src and out.data_ptr() != tensor.data_ptr():
            out.copy_(tensor.detach())
        try:
            self._seg.broadcast(out.data_ptr(), out.nbytes, src)
        except _core.WaitError as exc:
            raise self._failed("broadcast", exc) from None
        except BaseException as exc:
            self._interrupted("broadcast", exc)
            raise
        return out

    def barrier(self) -> None:
        """Wait until every rank has arrived here (no data)."""
        try:
            self._seg.barrier()
        except _core.WaitError as exc:
            raise self._failed("barrier", exc) from None
        except BaseException as exc:
            self._interrupted("barrier", exc)
            raise
