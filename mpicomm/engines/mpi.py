"""The MPI engine: every collective of a group over MPI, for tensors on any device.

An engine moves the data of a call the communicator has already checked (arguments, consistency,
``out=``): it stages a CUDA tensor through host memory where its :class:`~mpicomm.staging.Route`
says so, runs MPI on the payload communicator and returns a fresh result (or writes ``out``). It
makes the per-call choices that remain: a sum's algorithm by dtype and size (:mod:`mpicomm.plan`).
Point-to-point and ``all_to_allv`` run here too, over MPI in every engine.

:class:`MPIEngine` is the base with working defaults; the shared-memory engine
(:mod:`mpicomm.engines.shm`) and the hierarchical one (:mod:`mpicomm.engines.hierarchical`)
override what they do differently. Which one a group holds is :func:`mpicomm.plan.engine_for`'s
choice, made once at construction.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from .. import plan, reduction
from .._mpi import MPI
from ..buffers import ResultMemory, Workspace, byte_spec, mpi_spec, sync_device, vector_spec
from ..calls import Caller
from ..dtypes import DtypeInfo
from ..errors import CommunicationError
from ..staging import Route, readable, stacked_shape, writable_into

_P2P_TAG = 7


class Parts(NamedTuple):
    """What every engine of one communicator works with."""

    call: Caller  # runs MPI calls (errors, timeouts); shared with the communicator
    comm: MPI.Comm  # the payload (device) communicator
    rank: int  # this rank in it
    world: int  # its size
    workspace: Workspace  # scratch and staging memory
    results: ResultMemory  # where fresh host results come from
    cuda_aware: bool  # the loaded MPI reads device memory
    staging: bool  # every tensor goes through host staging memory (MPICOMM_STAGING)


class MPIEngine:
    """Every collective over MPI on ``parts.comm``; ``algo``: the group's ``allreduce_algo``,
    ``mode``: its ``MPICOMM_HIERARCHICAL`` (both assignable: the communicator's properties)."""

    kind = plan.MPI_ONLY
    transport = None  # the group's shared-memory transport (the shared-memory engine's)
    node_transport = None  # this node's transport (the hierarchical engine's)
    # The hot paths (docs/shm.md, "Per call"): bound methods taking what the communicator would
    # validate and returning ``None`` for anything they decline; ``None``: no such path.
    sum_fresh = sum_into = gather_fresh = gatherv_fresh = scatter_fresh = None

    def __init__(self, parts: Parts, algo: str, mode: str) -> None:
        self.parts = parts
        self.call, self.comm = parts.call, parts.comm
        self.workspace, self.results = parts.workspace, parts.results
        self.rank, self.world = parts.rank, parts.world  # no MPI call: a forked child builds one
        self.algo, self.mode = algo, mode
        self._routes: dict[torch.device, Route] = {}

    # ----------------------------------------------------------------- lifetime
    def plain(self) -> MPIEngine:
        """This engine without shared memory: what a forked child and a destroyed communicator
        keep (no hot path may touch a segment there)."""
        return self

    def close(self) -> None:
        """Free what this engine made (collective); the communicator frees the rest."""

    def timeout_changed(self) -> None:
        """Follow the communicator's new timeout (``call.timeout``) in waits MPI does not run."""

    # ----------------------------------------------------------------- routes and sums
    def route(self, device: torch.device) -> Route:
        """The cached :class:`~mpicomm.staging.Route` of ``device`` (decided once per device)."""
        route = self._routes.get(device)
        if route is None:
            parts = self.parts
            staged = Route.needs_staging(device, parts.cuda_aware, parts.staging)
            route = Route(device, staged, parts.workspace, parts.results)
            self._routes[device] = route
        return route

    def algorithm(self, input_: torch.Tensor, info: DtypeInfo) -> str:
        """The algorithm :meth:`all_reduce` takes for ``input_`` (see :mod:`mpicomm.plan`)."""
        return self._plan(info, input_.nbytes, self.route(input_.device))

    def _plan(self, info: DtypeInfo, nbytes: int, route: Route) -> str:
        return plan.flat_algorithm(info, nbytes, self.algo)

    def _sum(self, algo: str, x: torch.Tensor, out: torch.Tensor, info: DtypeInfo) -> None:
        """``out`` = the sum over ranks of ``x`` (MPI-readable memory) by ``algo``."""
        if algo == plan.NATIVE:
            reduction.all_reduce_native(self.call, "all_reduce", self.comm, x, out, info)
        else:
            reduction.all_reduce_bytes(
                self.call, "all_reduce", self.comm, x, out, info, self.workspace
            )

    # ----------------------------------------------------------------- collectives
    def all_reduce(
        self, input_: torch.Tensor, out: torch.Tensor | None, info: DtypeInfo
    ) -> torch.Tensor:
        """The sum over ranks of ``input_``: fresh, or written into ``out`` and returned."""
        route = self.route(input_.device)
        algo = self._plan(info, input_.nbytes, route)
        if out is not None and algo == plan.NATIVE and input_.is_cpu and not route.staged:
            x = route.stage_in(input_)
            if writable_into(out, x):
                reduction.all_reduce_native(self.call, "all_reduce", self.comm, x, out, info)
                return out
        x, buf = route.stage_in_and_output(input_, input_.shape)
        self._sum(algo, x, buf, info)
        return into(out, route.result(buf))

    def reduce_scatter(
        self,
        operation: str,
        input_: torch.Tensor,
        moved: torch.Tensor,
        dim: int,
        sizes: list[int],
        out: torch.Tensor | None,
        info: DtypeInfo,
    ) -> torch.Tensor:
        """This rank's ``sizes[rank]`` rows along ``dim`` of the sum over ranks of ``input_``
        (``moved``: ``input_`` with ``dim`` first, shape (1,) for a 0-d one)."""
        shape = (sizes[self.rank], *moved.shape[1:])
        counts = [s * math.prod(moved.shape[1:]) for s in sizes]
        route = self.route(input_.device)
        x = readable(moved).contiguous() if moved.is_cpu else moved
        target = out if dim == 0 and input_.dim() > 0 and writes_into(out, x, route) else None
        result = self._scatter(operation, moved, x, counts, shape, target, info, route)
        if result is target:
            return result
        if input_.dim() == 0:
            return into(out, result.reshape(()))
        return into(out, result if dim == 0 else result.movedim(0, dim).contiguous())

    def _scatter(self, operation, moved, x, counts, shape, target, info, route) -> torch.Tensor:
        """The reduce-scatter of ``counts`` elements per rank into ``target`` or fresh memory of
        ``shape`` (``x``: ``moved`` made contiguous where it is host memory)."""
        x = route.stage_in(moved, sync=False)
        buf = route.output(shape, x.dtype, sync=False) if target is None else target
        route.ready()
        comm, call = self.comm, self.call
        if plan.flat_algorithm(info, x.nbytes, self.algo) == plan.NATIVE:
            reduction.reduce_scatter_native(call, operation, comm, x, counts, buf, info)
        else:
            reduction.reduce_scatter_bytes(
                call, operation, comm, x, counts, buf, info, self.workspace
            )
        return route.result(buf)

    def all_gather(self, x: torch.Tensor, dim: int, out: torch.Tensor | None) -> torch.Tensor:
        """``torch.cat`` of every rank's ``x`` (at least 1-d) along ``dim``."""
        route = self.route(x.device)
        shape = stacked_shape(x.shape, self.world, dim)
        x = route.stage_in(x, sync=False)
        if dim == 0 and writes_into(out, x, route):
            buf = out
        else:
            buf = route.output(shape, x.dtype, sync=False)
        route.ready()
        self.call("all_gather", self.comm, "Allgather", mpi_spec(x), mpi_spec(buf, x.numel()))
        return out if buf is out else into(out, route.gathered(buf, dim))

    def gather(
        self, x: torch.Tensor, dim: int, dst: int, out: torch.Tensor | None
    ) -> torch.Tensor | None:
        """:meth:`all_gather` on rank ``dst``; ``None`` on the others."""
        route = self.route(x.device)
        root = self.rank == dst
        if root:
            x = route.stage_in(x, sync=False)
            if dim == 0 and writes_into(out, x, route):
                buf = out
            else:
                shape = stacked_shape(x.shape, self.world, dim)
                buf = route.output(shape, x.dtype, sync=False)
            route.ready()
        else:
            x, buf = route.stage_in(x), None
        self.call(
            "gather",
            self.comm,
            "Gather",
            mpi_spec(x),
            mpi_spec(buf, x.numel()) if root else None,
            dst,
        )
        if not root or buf is out:
            return buf
        return into(out, route.gathered(buf, dim))

    def all_gatherv(
        self, tensor: torch.Tensor, sizes: list[int], out: torch.Tensor | None
    ) -> torch.Tensor:
        """Every rank's rows of ``tensor`` (``sizes[r]`` from rank r) along dim 0, rank order."""
        shape = (sum(sizes), *tensor.shape[1:])
        route = self.route(tensor.device)
        x = route.stage_in(tensor, sync=False)
        buf = out if writes_into(out, x, route) else route.output(shape, x.dtype, sync=False)
        route.ready()
        row = math.prod(x.shape[1:])
        counts = [s * row for s in sizes]
        self.call("all_gatherv", self.comm, "Allgatherv", mpi_spec(x), vector_spec(buf, counts))
        return out if buf is out else into(out, route.result(buf))

    def broadcast(self, tensor: torch.Tensor, src: int, out: torch.Tensor | None) -> torch.Tensor:
        """Rank ``src``'s ``tensor`` on every rank."""
        route = self.route(tensor.device)
        buf = route.output(tuple(tensor.shape), tensor.dtype)
        if self.rank == src:
            buf.copy_(tensor.detach())
            sync_device(buf.device)
        self.call("broadcast", self.comm, "Bcast", mpi_spec(buf), src)
        return into(out, route.result(buf))

    def barrier(self) -> None:
        """Return once every rank has entered it."""
        self.call("barrier", self.comm, "Barrier")

    # ----------------------------------------------------------------- point-to-point (every engine)
    def send(self, tensor: torch.Tensor, dst: int) -> None:
        """Blocking send of ``tensor`` to rank ``dst``."""
        x = self.route(tensor.device).stage_in(tensor)
        self.call("send", self.comm, "Send", byte_spec(x), dst, _P2P_TAG)

    def recv(
        self, shape: tuple[int, ...], dtype: torch.dtype, src: int, device: torch.device
    ) -> torch.Tensor:
        """Blocking receive of a ``shape``/``dtype`` tensor from rank ``src``, on ``device``; a
        message of another byte size is consumed, then raises :class:`CommunicationError`."""
        route = self.route(device)
        out = route.output(shape, dtype)
        call = self.call
        message, status = call.probe("recv", self.comm, src, _P2P_TAG)
        arrived, expected = status.Get_count(MPI.BYTE), out.numel() * dtype.itemsize
        if arrived != expected:
            call("recv", message, "Recv", [np.empty(arrived, np.uint8), MPI.BYTE])
            raise CommunicationError(
                f"recv on group {call.group!r}: the message from rank {src} has "
                f"{arrived} bytes, but size={tuple(shape)} of {dtype} is {expected} bytes",
                operation="recv",
                group=call.group,
            )
        call("recv", message, "Recv", byte_spec(out))
        return route.result(out)

    def all_to_allv(
        self, input_: torch.Tensor, send_rows: list[int], recv_rows: list[int]
    ) -> torch.Tensor:
        """``send_rows[d]`` rows of ``input_`` to rank d; ``recv_rows[s]`` rows from rank s."""
        route = self.route(input_.device)
        x, out = route.stage_in_and_output(input_, (sum(recv_rows), *input_.shape[1:]))
        row = math.prod(x.shape[1:])
        self.call(
            "all_to_allv",
            self.comm,
            "Alltoallv",
            vector_spec(x, [r * row for r in send_rows]),
            vector_spec(out, [r * row for r in recv_rows]),
        )
        return route.result(out)


def writes_into(out: torch.Tensor | None, x: torch.Tensor, route: Route) -> bool:
    """Whether a collective reading the contiguous host ``x`` may write its result straight into
    the caller's ``out`` (already checked: the result's shape and dtype): ``out`` is plain host
    memory MPI or shared memory can write, unstaged, sharing no memory with ``x`` (not even all
    of it: MPI refuses a receive buffer that is the send buffer)."""
    if out is None or not x.is_cpu or route.staged or not writable_into(out, x):
        return False
    return out.data_ptr() != x.data_ptr()


def into(out: torch.Tensor | None, result: torch.Tensor) -> torch.Tensor:
    """``result``, copied into ``out`` first when the caller gave one that is not it."""
    if out is None or out is result:
        return result
    out.copy_(result)
    return out
