"""MPICommunicator: the device-communicator interface on MPI.

Every collective follows the same order (docs/architecture.md, "One call"): validate the arguments
(no MPI yet), optionally check that all ranks agree (consistency mode, on the cpu communicator),
look up the call's :class:`~mpicomm.staging.Route` (direct or staged), bring the input to memory
MPI can read, run MPI on the device communicator, and return a fresh tensor on the input's device.
Sums take the algorithm :mod:`mpicomm.plan` chooses.

Longer than ~400 lines on purpose: this module is the public class, one short method per operation
of docs/contract.md, each in the order above; what the methods share (staging, planning, the sums,
argument checks) lives in its own module.
"""

from __future__ import annotations

import logging
import math
import os
import weakref

import numpy as np
import torch

from . import aborts, consistency, hierarchical, logs, plan, reduction, tracking
from ._mpi import MPI
from .base import DeviceCommunicatorBase
from .buffers import ResultMemory, Workspace, byte_spec, mpi_spec, sync_device, vector_spec
from .calls import Caller, created, duplicate
from .config import ALLREDUCE_ALGOS, HIERARCHICAL_MODES, settings
from .cuda import cuda_aware
from .dtypes import dtype_info
from .errors import CommunicationError
from .moe import MANAGERS, make_manager, make_router
from .shm import Transport, open_transport
from .shm import built as shm_built
from .staging import (
    Route,
    overlaps_partly,
    readable,
    stacked_shape,
    staging_needs,
    writable_into,
)
from .topology import NodeSplit, node_labels
from .validation import (
    check_choice,
    check_comm,
    check_device,
    check_device_type,
    check_flag,
    check_out,
    check_peer,
    check_rank,
    check_row_tensors,
    check_seconds,
    check_shape,
    check_sizes,
    check_tensor,
    even_sizes,
    normalize_dim,
)

log = logging.getLogger("mpicomm")

_P2P_TAG = 7


class MPICommunicator(DeviceCommunicatorBase):
    """The collectives of one group, over MPI.

    Parameters
    ----------
    cpu_group:
        ``mpi4py.MPI.Comm`` (an intracommunicator) naming the group. Default ``COMM_WORLD``. The
        control traffic (row counts, fingerprints) runs on a private duplicate made here and freed
        by :meth:`destroy`, so communicators sharing a ``cpu_group`` never cross messages.
    device:
        ``torch.device`` or string; default ``cpu``. CUDA inputs must be on this GPU; CPU inputs
        are always accepted. Results land on the input's device.
    device_group:
        ``mpi4py.MPI.Comm`` with the same members in the same order, for tensor payloads. ``None``:
        a duplicate of ``cpu_group`` is made here (collectively) and freed by :meth:`destroy`.
    unique_name:
        Name used in errors and logs, e.g. ``"tp:0"``.
    timeout:
        Seconds bounding every collective and receive (``0``: no bound). Default: ``MPICOMM_TIMEOUT``.
    validate:
        Check before each collective that all ranks agree on its arguments. Default:
        ``MPICOMM_VALIDATE``.
    allreduce_algo:
        ``"auto"``, ``"native"`` or ``"bytes"`` (see :mod:`mpicomm.reduction`). Default:
        ``MPICOMM_ALLREDUCE_ALGO``.
    staging:
        Send every tensor through the host staging buffers, CPU tensors too (tests the staging
        path without a GPU). Default: ``MPICOMM_STAGING``.
    all2all_backend:
        The MoE manager behind :meth:`dispatch` / :meth:`combine` (see :mod:`mpicomm.moe`).
    node_of:
        ``rank -> node label`` overriding MPI's shared-memory node detection (tests pretend one
        host is several nodes with it; sites whose MPI cannot tell nodes apart may use it too).
    shm:
        ``"auto"``, ``"0"`` or ``"1"`` (or a bool): host tensors of a group on one node go
        through shared memory (:mod:`mpicomm.shm`, :func:`mpicomm.plan.shm_wanted`). Default:
        ``MPICOMM_SHM``.
    own_cpu_group:
        ``cpu_group`` was made for this communicator alone (e.g. by ``MPI_Comm_create_group``)
        and nothing else sends on it: with ``device_group=None`` it carries the payload itself
        (no duplicate is made) and :meth:`destroy` frees it. A front end holding one
        communicator per group (the torch.distributed backend) saves one MPI communicator so.
    """

    def __init__(
        self,
        cpu_group: MPI.Comm | None = None,
        device: torch.device | str | None = None,
        device_group: MPI.Comm | None = None,
        unique_name: str = "",
        *,
        timeout: float | None = None,
        validate: bool | None = None,
        allreduce_algo: str | None = None,
        staging: bool | None = None,
        all2all_backend: str = "allgather_reducescatter",
        node_of=None,
        shm: str | bool | None = None,
        own_cpu_group: bool = False,
    ) -> None:
        # The constructor is collective. Each rank first checks what it can alone, then all
        # ranks agree on the outcome and on the settings that must match (a bounded exchange in
        # which a rank that failed still takes part), so every rank raises alike instead of
        # some waiting forever for a rank that gave up (docs/reliability.md).
        aborts.install_abort_on_exception()  # an uncaught exception on any rank ends the job
        cpu_group = MPI.COMM_WORLD if cpu_group is None else cpu_group
        check_comm(cpu_group, "cpu_group")  # no group, no one to agree with
        label = unique_name if isinstance(unique_name, str) and unique_name else None
        seconds = None
        try:
            env = settings()
            seconds = env.timeout if timeout is None else check_seconds(timeout, "timeout")
            super().__init__(cpu_group, device, device_group, unique_name)
            label = label or f"comm{self.ranks}"
            self._check_arguments(env, allreduce_algo, validate, staging, shm, all2all_backend)
            error = None
        except (TypeError, ValueError) as exc:
            error = exc
        consistency.agree_construction(
            cpu_group,
            label or "?",
            seconds,
            error,
            None if error is not None else self._must_match(seconds),
        )
        self._pid = os.getpid()
        self.cuda_aware = cuda_aware()
        logs.apply_log_level(env.log_level)
        self._results = ResultMemory(env.huge_pages, env.recycle)
        self._call = Caller(label, seconds)
        self._call.validating = self.validate
        self._workspace = Workspace()
        self._routes: dict[torch.device, Route] = {}
        self._destroyed = False
        self._nodes: NodeSplit | None = None
        self._owns_device_group = device_group is None
        self._control = duplicate(self.cpu_group, label, "its control communicator", seconds)
        if device_group is None and own_cpu_group:
            self.device_group = self.cpu_group
        elif device_group is None:
            try:
                self.device_group = duplicate(
                    self.cpu_group, label, "its payload communicator", seconds
                )
            except CommunicationError:
                self._control.Free()
                raise
        self._call.prepare(self._control)
        self.all2all_manager = make_manager(all2all_backend, self)
        # The node split is made here, where every rank is already in a collective: a data call
        # never runs an untimed one. Node and leader communicators exist only for groups that
        # span nodes and may use the hierarchical all_reduce.
        self.node_of = (0,)
        if self.world_size > 1:
            self.node_of = created(
                label, lambda: node_labels(self.device_group, node_of), "the node split"
            )
        if max(self.node_of) > 0 and self.hierarchical != "0":
            self._nodes = created(
                label, lambda: NodeSplit.create(self.device_group, self.node_of), "node groups"
            )
        self._shm: Transport | None = None
        self._node_shm: Transport | None = None  # this node's ranks, for hierarchical steps
        if self._nodes is not None and plan.node_shm_wanted(
            self.shm, shm_built(), self._nodes.local_size, self.staging
        ):
            self._node_shm = open_transport(
                self._nodes.local, self._call, self._results, env.shm_direct
            )
        if plan.shm_wanted(
            self.shm, shm_built(), self.world_size, max(self.node_of) == 0, self.staging
        ):
            self._shm = open_transport(self._control, self._call, self._results, env.shm_direct)
            if self._shm is None and self.shm == "1":
                raise CommunicationError(f"{label}: MPICOMM_SHM=1, but no segment could be made")
        log.debug(
            "%s: rank %d of %d on %s; CUDA tensors %s",
            label,
            self.rank,
            self.world_size,
            self.device,
            "go to MPI directly" if self.cuda_aware else "are staged through pinned host memory",
        )
        tracking.track(self, label)  # warned about at exit unless destroyed
        _instances.add(self)

    def _forked(self) -> None:
        """In a child made by ``fork()``: this process is not a rank of the group. Drop the
        shared-memory transports (their hot paths must not run here: the parent's ranks use the
        segment) and refuse every later call."""
        self._shm = self._node_shm = None
        self._call.broken = _forked_text(self._pid)
        tracking.untrack(self)

    def _check_arguments(self, env, allreduce_algo, validate, staging, shm, all2all_backend):
        """The checks each rank makes alone at construction (``TypeError``/``ValueError``)."""
        check_device_type(self.device)
        algo = env.allreduce_algo if allreduce_algo is None else allreduce_algo
        self.allreduce_algo = check_choice(algo, ALLREDUCE_ALGOS, "allreduce_algo")
        self.validate = env.validate if validate is None else check_flag(validate, "validate")
        self.staging = env.staging if staging is None else check_flag(staging, "staging")
        self.hierarchical = env.hierarchical  # MPICOMM_HIERARCHICAL: auto, 0 or 1
        shm = env.shm if shm is None else shm
        if isinstance(shm, str) and shm.strip().lower() != "auto":
            shm = check_flag(shm, "shm")
        self.shm = check_choice(
            str(int(shm)) if isinstance(shm, bool) else shm, HIERARCHICAL_MODES, "shm"
        )  # MPICOMM_SHM: auto, 0 or 1
        if all2all_backend not in MANAGERS:
            raise ValueError(
                f"all2all_backend must be one of {', '.join(MANAGERS)}, got {all2all_backend!r}"
            )
        self.all2all_backend = all2all_backend
        if self.device_group is not None:
            relation = MPI.Comm.Compare(self.cpu_group, self.device_group)
            if relation == MPI.IDENT:
                raise ValueError(
                    "device_group must be a communicator of its own (e.g. cpu_group.Dup()): "
                    "control and payload traffic never share one"
                )
            if relation != MPI.CONGRUENT:
                raise ValueError(
                    "device_group must have the members of cpu_group in the same order"
                )

    def _must_match(self, seconds: float | None) -> dict[str, tuple[object, str]]:
        """Settings every rank of the group must share (compared once, at construction)."""
        timed = "off" if seconds is None else f"{seconds:g} s"
        return {
            "timeout (MPICOMM_TIMEOUT)": (seconds is None, timed),
            "validate (MPICOMM_VALIDATE)": (self.validate, str(int(self.validate))),
            "allreduce_algo (MPICOMM_ALLREDUCE_ALGO)": (self.allreduce_algo, self.allreduce_algo),
            "MPICOMM_HIERARCHICAL": (self.hierarchical, self.hierarchical),
            "shm (MPICOMM_SHM)": (self.shm, self.shm),
            "staging (MPICOMM_STAGING)": (self.staging, str(int(self.staging))),
            "all2all_backend": (self.all2all_backend, self.all2all_backend),
        }

    def _free_groups(self) -> None:
        """Free the communicators this object made (collective)."""
        if self._nodes is not None:
            self._nodes.free()
        self._control.Free()
        if self._owns_device_group and self.device_group != MPI.COMM_NULL:
            self.device_group.Free()

    @property
    def timeout(self) -> float | None:
        """Seconds bounding each call, or ``None``."""
        return self._call.timeout

    @timeout.setter
    def timeout(self, seconds: float | None) -> None:
        self._call.timeout = None if seconds is None else check_seconds(seconds, "timeout")
        for transport in (self._shm, self._node_shm):
            if transport is not None:
                transport.timeout = self._call.timeout

    @property
    def broken(self) -> str | None:
        """Why the communicator is unusable (a timeout or an interrupted wait), or ``None``."""
        return self._call.broken

    @property
    def outstanding(self) -> int:
        """MPI requests this communicator still holds (abandoned after a timeout, or arrival
        notices in flight): a leak shows as growth here."""
        return self._call.outstanding

    @property
    def transport(self) -> Transport | None:
        """The shared-memory transport of this group (host tensors, :mod:`mpicomm.shm`), or
        ``None`` where collectives use MPI alone."""
        return self._shm

    @property
    def workspace(self) -> Workspace:
        """The reusable scratch and staging memory (read it; do not write it)."""
        return self._workspace

    def staged(self, device: torch.device | str) -> bool:
        """Whether tensors on ``device`` travel through host staging memory."""
        return self._route(torch.device(device)).staged

    def _route(self, device: torch.device) -> Route:
        route = self._routes.get(device)
        if route is None:
            staged = Route.needs_staging(device, self.cuda_aware, self.staging)
            route = Route(device, staged, self._workspace, self._results)
            self._routes[device] = route
        return route

    def agree(self, operation: str, fingerprint=None) -> None:
        """Refuse a destroyed communicator; in consistency mode, make all ranks agree first.

        ``fingerprint``: a function returning this rank's
        :class:`~mpicomm.consistency.Fingerprint` of the call, evaluated only in consistency mode
        (then collective on the cpu communicator: every rank raises the same ``ValueError`` if
        any differs). Layers built on the communicator (MoE routers) call it before their first
        collective, as the communicator's own methods do.
        """
        if self._destroyed:
            raise CommunicationError(
                f"{operation} on group {self._call.group!r}: the communicator was destroyed",
                operation=operation,
                group=self._call.group,
            )
        if self._pid != os.getpid():
            raise CommunicationError(
                f"{operation} on group {self._call.group!r}: {_forked_text(self._pid)}",
                operation=operation,
                group=self._call.group,
            )
        if self.validate and fingerprint is not None:
            consistency.agree(self._call, self._control, operation, fingerprint())

    # ----------------------------------------------------------------- collectives
    def all_reduce(self, input_: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elementwise sum over the group; every rank gets the same bits, shape and dtype as input.

        16-bit and 8-bit floats are summed in float32 in rank order and rounded once; bool sums
        are logical or; integer sums wrap like torch's. The result is a fresh tensor, or, with
        ``out`` (input's shape, dtype and device; ``input_`` itself for an in-place sum, as
        torch.distributed's all_reduce), written into ``out``, which is returned.
        """
        if self._shm is not None and not self.validate:
            if out is None:
                result = self._shm.sum_fresh(input_)  # the hot path of a plain host tensor
                if result is not None:
                    return result
            elif out is input_:  # an in-place sum (torch.distributed's)
                result = self._shm.sum_into(input_)
                if result is not None:
                    return result
        info = check_tensor(input_)
        check_device(input_, self.device)
        target = out
        if out is not None:
            check_out(out, input_)
            if overlaps_partly(out, input_):
                target = None  # summed into fresh memory, then copied into out
        self.agree("all_reduce", lambda: consistency.fingerprint("all_reduce", input_))
        if self._shm is not None and input_.is_cpu:
            result = self._shm.all_reduce(input_, target)
            if result is not None:
                return _into(out, result)
        route = self._route(input_.device)
        algo = self._plan(info, input_.nbytes, route)
        comm, call = self.device_group, self._call
        if out is not None and algo == plan.NATIVE and input_.is_cpu and not route.staged:
            x = route.stage_in(input_)
            if writable_into(out, x):
                reduction.all_reduce_native(call, "all_reduce", comm, x, out, info)
                return out
        x, buf = route.stage_in_and_output(input_, input_.shape)
        if algo == plan.NATIVE:
            reduction.all_reduce_native(call, "all_reduce", comm, x, buf, info)
        elif algo == plan.BYTES:
            reduction.all_reduce_bytes(call, "all_reduce", comm, x, buf, info, self._workspace)
        else:
            hierarchical.all_reduce(
                call, "all_reduce", self._nodes, x, buf, info, self._workspace, self._node_shm
            )
        return _into(out, route.result(buf))

    def _plan(self, info, nbytes: int, route: Route) -> str:
        host = route.staged or route.device.type == "cpu"
        return plan.all_reduce_algorithm(
            info,
            nbytes,
            self.allreduce_algo,
            self.hierarchical,
            self._nodes,
            self._node_shm is not None and host,
        )

    def all_reduce_algorithm(self, input_: torch.Tensor) -> str:
        """The algorithm :meth:`all_reduce` would use for ``input_``: ``shm``, ``native``,
        ``bytes`` or ``hierarchical`` (see :mod:`mpicomm.plan`). No MPI call."""
        info = check_tensor(input_)
        if self._shm is not None and input_.is_cpu and self._shm.sums(input_.dtype):
            return plan.SHM
        return self._plan(info, input_.nbytes, self._route(input_.device))

    def all_gather(
        self, input_: torch.Tensor, dim: int = -1, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``torch.cat([x_0, ..., x_{W-1}], dim)`` on every rank (a 0-d input counts as shape (1,)).

        The result is a fresh tensor, or, with ``out`` (the result's shape, input's dtype and
        device), written into ``out``, which is returned; an ``out`` sharing memory with the
        input (torch.distributed's in-place gather) receives the result through fresh memory.
        """
        if self._shm is not None and not self.validate:
            result = self._shm.gather_fresh(input_, dim, out)  # the hot path of a small host tensor
            if result is not None:
                return result
        check_tensor(input_)
        dim = normalize_dim(dim, input_.dim())
        check_device(input_, self.device)
        x = input_.reshape(1) if input_.dim() == 0 else input_
        if out is not None:
            check_out(out, x, _grown(x.shape, dim, x.shape[dim] * self.world_size))
        self.agree("all_gather", lambda: consistency.fingerprint("all_gather", input_, dim))
        route = self._route(input_.device)
        shape = stacked_shape(x.shape, self.world_size, dim)
        if self._shm is not None and x.is_cpu:
            x = readable(x).contiguous()
            if dim == 0 and _writes_into(out, x, route):
                return self._shm.all_gather(x, shape, out=out)
            return _into(out, route.gathered(self._shm.all_gather(x, shape), dim))
        x = route.stage_in(x, sync=False)
        if dim == 0 and _writes_into(out, x, route):
            buf = out
        else:
            buf = route.output(shape, x.dtype, sync=False)
        route.ready()
        self._call(
            "all_gather", self.device_group, "Allgather", mpi_spec(x), mpi_spec(buf, x.numel())
        )
        return out if buf is out else _into(out, route.gathered(buf, dim))

    def gather(
        self,
        input_: torch.Tensor,
        dst: int = 0,
        dim: int = -1,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """``all_gather(input_, dim)`` on rank ``dst`` of the group; ``None`` on the others.

        With ``out`` (checked as :meth:`all_gather` checks it, on every rank that passes one),
        rank ``dst`` receives the result in ``out`` and returns it; the others leave it alone.
        """
        check_tensor(input_)
        dim = normalize_dim(dim, input_.dim())
        dst = check_rank(dst, self.world_size, "dst")
        check_device(input_, self.device)
        x = input_.reshape(1) if input_.dim() == 0 else input_
        if out is not None:
            check_out(out, x, _grown(x.shape, dim, x.shape[dim] * self.world_size))
        self.agree("gather", lambda: consistency.fingerprint("gather", input_, dim, root=dst))
        route = self._route(input_.device)
        root = self.rank == dst
        if self._shm is not None and x.is_cpu:
            shape = stacked_shape(x.shape, self.world_size, dim)
            x = readable(x).contiguous()
            target = out if root and dim == 0 and _writes_into(out, x, route) else None
            counts = [x.numel()] * self.world_size
            buf = self._shm.gatherv(x, counts, x.itemsize, shape, dst, out=target)
            if not root or buf is target:
                return buf
            return _into(out, route.gathered(buf, dim))
        if root:
            x = route.stage_in(x, sync=False)
            if dim == 0 and _writes_into(out, x, route):
                buf = out
            else:
                shape = stacked_shape(x.shape, self.world_size, dim)
                buf = route.output(shape, x.dtype, sync=False)
            route.ready()
        else:
            x, buf = route.stage_in(x), None
        self._call(
            "gather",
            self.device_group,
            "Gather",
            mpi_spec(x),
            mpi_spec(buf, x.numel()) if root else None,
            dst,
        )
        if not root or buf is out:
            return buf
        return _into(out, route.gathered(buf, dim))

    def all_gatherv(
        self,
        input_: torch.Tensor | list[torch.Tensor],
        dim: int = 0,
        sizes: list[int] | None = None,
        out: torch.Tensor | list[torch.Tensor] | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """All-gather along dim 0 with ``sizes[i]`` rows from rank i.

        ``input_`` is a tensor or a list of tensors with ``sizes[r]`` rows each (dtypes and
        trailing shapes may differ between list entries). Output per tensor: rank 0's rows, then
        rank 1's, ...; a list in gives a list out. ``sizes=None``: every rank has the same rows.
        ``out``: a tensor (a list, one per input, for a list in) of the result's shape and the
        input's dtype and device, written and returned as :meth:`all_gather` does it.
        """
        if self._shm is not None and not self.validate:
            # the hot path of one tensor
            result = self._shm.gatherv_fresh(input_, dim, sizes, out)
            if result is not None:
                return result
        tensors, sizes = check_row_tensors(input_, dim, sizes, self.world_size, self.rank)
        for i, t in enumerate(tensors):
            check_device(t, self.device, "input_" if len(tensors) == 1 else f"input_[{i}]")
        targets = [None] * len(tensors)
        if out is not None:
            targets = [out] if isinstance(input_, torch.Tensor) else out
            if not isinstance(targets, list | tuple) or len(targets) != len(tensors):
                raise TypeError(f"out must be a list of {len(tensors)} tensors, one per input")
            for t, o in zip(tensors, targets, strict=True):
                check_out(o, t, (sum(sizes), *t.shape[1:]))
        self.agree(
            "all_gatherv",
            lambda: consistency.fingerprint("all_gatherv", tensors, 0, sizes, rows_vary=True),
        )
        outs = [self._gatherv(t, sizes, o) for t, o in zip(tensors, targets, strict=True)]
        return outs[0] if isinstance(input_, torch.Tensor) else outs

    def _gatherv(
        self, tensor: torch.Tensor, sizes: list[int], out: torch.Tensor | None
    ) -> torch.Tensor:
        shape = (sum(sizes), *tensor.shape[1:])
        route = self._route(tensor.device)
        if self._shm is not None and tensor.is_cpu:
            x = readable(tensor).contiguous()
            row = math.prod(x.shape[1:]) * x.itemsize
            target = out if _writes_into(out, x, route) else None
            return _into(out, self._shm.gatherv(x, sizes, row, shape, -1, out=target))
        x = route.stage_in(tensor, sync=False)
        buf = out if _writes_into(out, x, route) else route.output(shape, x.dtype, sync=False)
        route.ready()
        row = math.prod(x.shape[1:])
        counts = [s * row for s in sizes]
        self._call(
            "all_gatherv", self.device_group, "Allgatherv", mpi_spec(x), vector_spec(buf, counts)
        )
        return out if buf is out else _into(out, route.result(buf))

    def reduce_scatter(
        self, input_: torch.Tensor, dim: int = -1, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``torch.chunk(sum_over_ranks(input_), W, dim)[r]``; ``input_.shape[dim]`` divisible by W.

        The result is a fresh tensor, or, with ``out`` (the result's shape, input's dtype and
        device), written into ``out``, which is returned (through fresh memory when ``out``
        shares memory with the input).
        """
        return self._reduce_scatter("reduce_scatter", input_, dim, None, out)

    def reduce_scatterv(
        self,
        input_: torch.Tensor,
        dim: int = -1,
        sizes: list[int] | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sum over ranks; rank r keeps rows ``[sum(sizes[:r]), +sizes[r])`` along ``dim``.

        ``len(sizes)`` must be W and ``sum(sizes)`` must be ``input_.shape[dim]``; ``None`` means
        an even split. ``out`` as in :meth:`reduce_scatter`.
        """
        return self._reduce_scatter("reduce_scatterv", input_, dim, sizes, out)

    def _reduce_scatter(self, operation, input_, dim, sizes, out) -> torch.Tensor:
        if self._shm is not None and not self.validate:
            result = self._shm.scatter_fresh(input_, dim, sizes, operation, out)  # the hot path
            if result is not None:
                return result
        info = check_tensor(input_)
        dim = normalize_dim(dim, input_.dim())
        check_device(input_, self.device)
        if input_.dim() == 0:
            moved = input_.reshape(1)
        else:
            moved = input_ if dim == 0 else input_.movedim(dim, 0)
        total = moved.shape[0]
        if sizes is None:
            sizes = even_sizes(total, self.world_size, dim)
        else:
            sizes = check_sizes(sizes, self.world_size, total=total, whole=f"input_.shape[{dim}]")
        if out is not None:
            mine = () if input_.dim() == 0 else _grown(input_.shape, dim, sizes[self.rank])
            check_out(out, input_, mine)
        self.agree(operation, lambda: consistency.fingerprint(operation, input_, dim, sizes))
        shape = (sizes[self.rank], *moved.shape[1:])
        counts = [s * math.prod(moved.shape[1:]) for s in sizes]
        route = self._route(input_.device)
        x = readable(moved).contiguous() if moved.is_cpu else moved
        target = out if dim == 0 and input_.dim() > 0 and _writes_into(out, x, route) else None
        result = None
        if self._shm is not None and moved.is_cpu:
            result = self._shm.reduce_scatter(x, counts, shape, operation, out=target)
        if result is None:
            x = route.stage_in(moved, sync=False)
            buf = route.output(shape, x.dtype, sync=False) if target is None else target
            route.ready()
            algo = plan.flat_algorithm(info, x.nbytes, self.allreduce_algo)
            comm = self.device_group
            if algo == plan.NATIVE:
                reduction.reduce_scatter_native(self._call, operation, comm, x, counts, buf, info)
            else:
                reduction.reduce_scatter_bytes(
                    self._call, operation, comm, x, counts, buf, info, self._workspace
                )
            result = route.result(buf)
        if result is target:
            return result
        if input_.dim() == 0:
            return _into(out, result.reshape(()))
        return _into(out, result if dim == 0 else result.movedim(0, dim).contiguous())

    def broadcast(
        self, tensor: torch.Tensor, src: int = 0, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rank ``src``'s tensor on every rank (all ranks pass the same shape and dtype).

        The result is a fresh tensor, or, with ``out`` (tensor's shape, dtype and device;
        ``tensor`` itself for torch.distributed's in-place broadcast), written into ``out``,
        which is returned.
        """
        check_tensor(tensor, "tensor")
        src = check_rank(src, self.world_size, "src")
        check_device(tensor, self.device, "tensor")
        if out is not None:
            check_out(out, tensor)
        self.agree("broadcast", lambda: consistency.fingerprint("broadcast", tensor, root=src))
        if self._shm is not None and tensor.is_cpu:
            if out is not None and _plain_host(out) and writable_into(out, tensor):
                return self._shm.broadcast(tensor, src, out)
            return _into(out, self._shm.broadcast(tensor, src))
        route = self._route(tensor.device)
        buf = route.output(tuple(tensor.shape), tensor.dtype)
        if self.rank == src:
            buf.copy_(tensor.detach())
            sync_device(buf.device)
        self._call("broadcast", self.device_group, "Bcast", mpi_spec(buf), src)
        return _into(out, route.result(buf))

    def barrier(self) -> None:
        """Return once every rank of the group has entered it (no data): through the
        shared-memory segment when the group has one, else ``MPI_Barrier`` on the payload
        communicator; bounded by the timeout like any collective."""
        self.agree("barrier", lambda: consistency.fingerprint("barrier", _NOTHING))
        if self._shm is not None:
            if self.broken is not None:
                raise CommunicationError(
                    f"barrier on group {self._call.group!r}: the communicator is unusable "
                    f"after an earlier failure ({self.broken})",
                    operation="barrier",
                    group=self._call.group,
                )
            self._shm.barrier()
            return
        self._call("barrier", self.device_group, "Barrier")

    # ----------------------------------------------------------------- point-to-point
    def send(self, tensor: torch.Tensor, dst: int | None = None) -> None:
        """Blocking send of ``tensor`` to group rank ``dst`` (default: the next rank). Sending to
        this rank itself raises ``ValueError`` (as torch.distributed does), also in a group of
        one rank: a blocking send to oneself cannot complete before its receive is posted."""
        check_tensor(tensor, "tensor")
        check_device(tensor, self.device, "tensor")
        dst = (self.rank + 1) % self.world_size if dst is None else dst
        dst = check_peer(dst, self.world_size, self.rank, "dst")
        self.agree("send")
        x = self._route(tensor.device).stage_in(tensor)
        self._call("send", self.device_group, "Send", byte_spec(x), dst, _P2P_TAG)

    def recv(
        self, size: torch.Size | tuple[int, ...], dtype: torch.dtype, src: int | None = None
    ) -> torch.Tensor:
        """Blocking receive of a ``size``/``dtype`` tensor from group rank ``src`` (default: the
        previous rank), returned on the communicator's device. A message of another byte size
        raises :class:`CommunicationError` (after it is consumed); nothing is truncated."""
        shape = check_shape(size)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
        dtype_info(dtype, "dtype")
        src = (self.rank - 1) % self.world_size if src is None else src
        src = check_peer(src, self.world_size, self.rank, "src")
        self.agree("recv")
        route = self._route(self.device)
        out = route.output(shape, dtype)
        message, status = self._call.probe("recv", self.device_group, src, _P2P_TAG)
        arrived, expected = status.Get_count(MPI.BYTE), out.numel() * dtype.itemsize
        if arrived != expected:
            self._call("recv", message, "Recv", [np.empty(arrived, np.uint8), MPI.BYTE])
            raise CommunicationError(
                f"recv on group {self._call.group!r}: the message from rank {src} has "
                f"{arrived} bytes, but size={tuple(shape)} of {dtype} is {expected} bytes",
                operation="recv",
                group=self._call.group,
            )
        self._call("recv", message, "Recv", byte_spec(out))
        return route.result(out)

    # ----------------------------------------------------------------- MoE
    def dispatch(
        self,
        hidden_states: torch.Tensor,
        router_logits: torch.Tensor,
        is_sequence_parallel: bool = False,
        extra_tensors: list[torch.Tensor] | None = None,
        *,
        sizes: list[int] | None = None,
    ):
        """Bring every rank's tokens to every rank (see the all2all manager in use).

        Returns ``(hidden_states, router_logits)``, or ``(..., extras)`` when ``extra_tensors`` is
        given; row counts come from ``sizes`` or are exchanged on the cpu communicator.
        """
        return self.all2all_manager.dispatch(
            hidden_states, router_logits, is_sequence_parallel, extra_tensors, sizes=sizes
        )

    def combine(self, hidden_states: torch.Tensor, is_sequence_parallel: bool = False):
        """Sum expert outputs back to the ranks that own the tokens of the last dispatch."""
        return self.all2all_manager.combine(hidden_states, is_sequence_parallel)

    def expert_router(self, num_experts: int, backend: str = "sparse_alltoallv"):
        """A router for ``num_experts`` experts, rank r owning ``[r*E/W, (r+1)*E/W)``.

        ``router.dispatch(hidden_states, topk_ids, topk_weights)`` sends each token only to the
        ranks of its top-k experts (``MPI_Alltoallv``); ``router.combine(expert_output)`` returns
        the weighted sums to the token's owner. ``backend="allgather_reducescatter"`` gives the
        same API on all-gather/reduce-scatter. See :mod:`mpicomm.moe.routers`. No MPI call:
        ``num_experts`` not divisible by the group size raises ``ValueError`` on every rank.
        """
        return make_router(backend, self, num_experts)

    def exchange_rows(self, rows: int) -> list[int]:
        """Every rank's ``rows`` (group order), exchanged on the cpu communicator."""
        self.agree("exchange_rows")
        mine = np.array([rows], dtype=np.int64)
        every = np.empty(self.world_size, dtype=np.int64)
        self._call("exchange_rows", self._control, "Allgather", mine, every)
        return every.tolist()

    def exchange_counts(self, counts: np.ndarray) -> np.ndarray:
        """All-to-all of int64 counts on the cpu communicator: ``counts`` is (W, k), row d goes to
        rank d; returns (W, k) whose row s came from rank s. For MoE routing metadata."""
        counts = np.ascontiguousarray(counts, dtype=np.int64)
        if counts.ndim != 2 or counts.shape[0] != self.world_size:
            raise ValueError(f"counts must be ({self.world_size}, k), got shape {counts.shape}")
        self.agree("exchange_counts")
        incoming = np.empty_like(counts)
        self._call("exchange_counts", self._control, "Alltoall", counts, incoming)
        return incoming

    def all_to_allv(
        self, input_: torch.Tensor, send_rows: list[int], recv_rows: list[int]
    ) -> torch.Tensor:
        """Rows (dim 0) to every rank: ``send_rows[d]`` consecutive rows of ``input_`` to rank d,
        in rank order; returns a fresh ``(sum(recv_rows), *input_.shape[1:])`` tensor holding
        ``recv_rows[s]`` rows from rank s, in rank order. Every rank's trailing shape and dtype
        must match, and ``recv_rows`` must mirror what the peers send (e.g. from
        :meth:`exchange_counts`)."""
        check_tensor(input_)
        check_device(input_, self.device)
        if input_.dim() == 0:
            raise ValueError("all_to_allv needs a tensor with at least one dimension (rows)")
        send_rows = check_sizes(
            send_rows, self.world_size, "send_rows", input_.shape[0], "input_.shape[0]"
        )
        recv_rows = check_sizes(recv_rows, self.world_size, "recv_rows")
        self.agree(
            "all_to_allv",
            lambda: consistency.fingerprint(
                "all_to_allv", input_, 0, rows_vary=True, splits=(send_rows, recv_rows)
            ),
        )
        route = self._route(input_.device)
        x, out = route.stage_in_and_output(input_, (sum(recv_rows), *input_.shape[1:]))
        row = math.prod(x.shape[1:])
        self._call(
            "all_to_allv",
            self.device_group,
            "Alltoallv",
            vector_spec(x, [r * row for r in send_rows]),
            vector_spec(out, [r * row for r in recv_rows]),
        )
        return route.result(out)

    # ----------------------------------------------------------------- lifetime
    def prepare_communication_buffer_for_model(self, model: torch.nn.Module) -> None:
        """Grow the staging buffers to the model's largest tensor, so the first call allocates none.

        Only does something where CUDA tensors are staged (no CUDA-aware MPI) or staging is forced.
        """
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        tensors = [*model.parameters(), *model.buffers()]
        if not tensors or not self.staged(self.device):
            return
        for slot, nbytes, pinned in staging_needs(tensors, self.world_size, self.allreduce_algo):
            self._workspace.reserve(nbytes, torch.device("cpu"), pinned, (slot,))
        self.all2all_manager.prepare(model)

    def destroy(self) -> None:
        """Free the payload communicator if this object made it, and all buffers. Collective when
        it frees; idempotent."""
        if self._destroyed:
            return
        self._destroyed = True
        if self._pid != os.getpid():
            return  # a forked child: the MPI communicators are the parent's to free
        self.all2all_manager.destroy()
        self._workspace.clear()
        for transport in (self._shm, self._node_shm):
            if transport is not None:
                transport.close()
        self._shm = self._node_shm = None
        self._call.close()
        self._free_groups()
        tracking.untrack(self)

    def __repr__(self) -> str:
        return (
            f"MPICommunicator({self._call.group!r}, rank={self.rank}/{self.world_size}, "
            f"device={self.device}, ranks={self.ranks})"
        )


_NOTHING = torch.empty(0, dtype=torch.uint8)  # the fingerprinted tensor of a barrier


def _plain_host(tensor: torch.Tensor) -> bool:
    """A dense host tensor (what the shared-memory calls take without further checks)."""
    return tensor.is_cpu and tensor.layout is torch.strided and not tensor.is_nested


def _forked_text(pid: int) -> str:
    return (
        f"the communicator was built in process {pid} and this is a child it forked "
        f"({os.getpid()}): MPI and the shared-memory segment belong to the parent's ranks. Build "
        f"communicators in processes that MPI started (a forked child cannot start MPI either)"
    )


_instances: weakref.WeakSet[MPICommunicator] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for comm in list(_instances):
        comm._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)  # no MPI call: only marks the objects


def _grown(shape: torch.Size, dim: int, size: int) -> tuple[int, ...]:
    """``shape`` with entry ``dim`` replaced by ``size`` (a gather's or reduce_scatter's result)."""
    return (*shape[:dim], size, *shape[dim + 1 :])


def _writes_into(out: torch.Tensor | None, x: torch.Tensor, route) -> bool:
    """Whether a collective reading the contiguous host ``x`` may write its result straight into
    the caller's ``out`` (already checked: the result's shape and dtype): ``out`` is plain host
    memory MPI or shared memory can write, unstaged, sharing no memory with ``x`` (not even all
    of it: MPI refuses a receive buffer that is the send buffer)."""
    if out is None or not x.is_cpu or route.staged or not writable_into(out, x):
        return False
    return out.data_ptr() != x.data_ptr()


def _into(out: torch.Tensor | None, result: torch.Tensor) -> torch.Tensor:
    """``result``, copied into ``out`` first when the caller gave one that is not it."""
    if out is None or out is result:
        return result
    out.copy_(result)
    return out
