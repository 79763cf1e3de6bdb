"""MPICommunicator: the device-communicator interface on MPI.

Every collective follows the same order (docs/architecture.md, "One call"): validate the arguments
(no MPI yet), optionally check that all ranks agree (consistency mode, on the cpu communicator),
then hand the data movement to the group's engine (:mod:`mpicomm.engines`: MPI, shared memory, or
hierarchical; chosen once at construction by :func:`mpicomm.plan.engine_for`), which returns a
fresh tensor on the input's device. The communicator never asks which engine it holds.

Longer than ~400 lines on purpose: this module is the public class, one short method per operation
of docs/contract.md, each in the order above; what the methods share (the engines, staging,
planning, argument checks) lives in its own module.
"""

from __future__ import annotations

import logging
import os
import weakref

import numpy as np
import torch

from . import aborts, consistency, engines, logs, plan, tracking
from ._mpi import MPI
from .base import DeviceCommunicatorBase
from .buffers import ResultMemory, Workspace
from .calls import Caller, created, duplicate
from .config import ALLREDUCE_ALGOS, HIERARCHICAL_MODES, settings
from .cuda import cuda_aware
from .dtypes import dtype_info
from .errors import CommunicationError
from .moe import MANAGERS, make_manager, make_router
from .shm import Transport
from .shm import built as shm_built
from .staging import staging_needs
from .topology import node_labels
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
        seconds = algo = mode = None
        try:
            env = settings()
            seconds = env.timeout if timeout is None else check_seconds(timeout, "timeout")
            super().__init__(cpu_group, device, device_group, unique_name)
            label = label or f"comm{self.ranks}"
            algo, mode = self._check_arguments(
                env, allreduce_algo, validate, staging, shm, all2all_backend
            )
            error = None
        except (TypeError, ValueError) as exc:
            error = exc
        consistency.agree_construction(
            cpu_group,
            label or "?",
            seconds,
            error,
            None if error is not None else self._must_match(seconds, algo, mode),
        )
        self._pid = os.getpid()
        self.cuda_aware = cuda_aware()
        logs.apply_log_level(env.log_level)
        self._results = ResultMemory(env.huge_pages, env.recycle)
        self._call = Caller(label, seconds)
        self._call.validating = self.validate
        self._workspace = Workspace()
        self._destroyed = False
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
        # never runs an untimed one.
        self.node_of = (0,)
        if self.world_size > 1:
            self.node_of = created(
                label, lambda: node_labels(self.device_group, node_of), "the node split"
            )
        built = shm_built()
        kind = plan.engine_for(self.shm, built, self.node_of, mode, self.staging)
        parts = engines.Parts(
            self._call,
            self.device_group,
            self.rank,
            self.world_size,
            self._workspace,
            self._results,
            self.cuda_aware,
            self.staging,
        )
        self._use(
            engines.open_engine(
                kind,
                parts,
                algo,
                mode,
                control=self._control,
                node_of=self.node_of,
                shm=self.shm,
                built=built,
                direct=env.shm_direct,
            )
        )
        log.debug(
            "%s: rank %d of %d on %s, %s engine; CUDA tensors %s",
            label,
            self.rank,
            self.world_size,
            self.device,
            self._engine.kind,
            "go to MPI directly" if self.cuda_aware else "are staged through pinned host memory",
        )
        tracking.track(self, label)  # warned about at exit unless destroyed
        _instances.add(self)

    def _use(self, engine: engines.MPIEngine) -> None:
        """Hold ``engine`` and bind its hot paths once (docs/shm.md, "Per call"): each is the
        engine's bound method or ``None``, and always ``None`` in consistency mode (every call
        then validates first)."""
        self._engine = engine
        fast = not self.validate
        self._sum_fresh = engine.sum_fresh if fast else None
        self._sum_into = engine.sum_into if fast else None
        self._gather_fresh = engine.gather_fresh if fast else None
        self._gatherv_fresh = engine.gatherv_fresh if fast else None
        self._scatter_fresh = engine.scatter_fresh if fast else None

    def _forked(self) -> None:
        """In a child made by ``fork()``: this process is not a rank of the group. Keep the
        engine's MPI parts alone (the hot paths must not run here: the parent's ranks use the
        segment) and refuse every later call."""
        self._use(self._engine.plain())
        self._call.broken = _forked_text(self._pid)
        tracking.untrack(self)

    def _check_arguments(self, env, allreduce_algo, validate, staging, shm, all2all_backend):
        """The checks each rank makes alone at construction (``TypeError``/``ValueError``).
        Returns the sums' settings, which the engine holds: ``allreduce_algo`` and
        ``MPICOMM_HIERARCHICAL`` (auto, 0 or 1)."""
        check_device_type(self.device)
        algo = env.allreduce_algo if allreduce_algo is None else allreduce_algo
        algo = check_choice(algo, ALLREDUCE_ALGOS, "allreduce_algo")
        self.validate = env.validate if validate is None else check_flag(validate, "validate")
        self.staging = env.staging if staging is None else check_flag(staging, "staging")
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
        return algo, env.hierarchical

    def _must_match(
        self, seconds: float | None, algo: str, mode: str
    ) -> dict[str, tuple[object, str]]:
        """Settings every rank of the group must share (compared once, at construction)."""
        timed = "off" if seconds is None else f"{seconds:g} s"
        return {
            "timeout (MPICOMM_TIMEOUT)": (seconds is None, timed),
            "validate (MPICOMM_VALIDATE)": (self.validate, str(int(self.validate))),
            "allreduce_algo (MPICOMM_ALLREDUCE_ALGO)": (algo, algo),
            "MPICOMM_HIERARCHICAL": (mode, mode),
            "shm (MPICOMM_SHM)": (self.shm, self.shm),
            "staging (MPICOMM_STAGING)": (self.staging, str(int(self.staging))),
            "all2all_backend": (self.all2all_backend, self.all2all_backend),
        }

    def _free_groups(self) -> None:
        """Free the communicators this object made (collective)."""
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
        self._engine.timeout_changed()

    @property
    def allreduce_algo(self) -> str:
        """``auto``, ``native`` or ``bytes``: the flat sums' algorithm (:mod:`mpicomm.plan`)."""
        return self._engine.algo

    @allreduce_algo.setter
    def allreduce_algo(self, algo: str) -> None:
        self._engine.algo = check_choice(algo, ALLREDUCE_ALGOS, "allreduce_algo")

    @property
    def hierarchical(self) -> str:
        """``MPICOMM_HIERARCHICAL`` of this group (``auto``, ``0`` or ``1``): whether the sums of
        a group that spans nodes take the node-aware algorithm (:mod:`mpicomm.plan`). Tests
        assign it to force either way."""
        return self._engine.mode

    @hierarchical.setter
    def hierarchical(self, mode: str) -> None:
        self._engine.mode = check_choice(mode, HIERARCHICAL_MODES, "hierarchical")

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
        return self._engine.transport

    @property
    def workspace(self) -> Workspace:
        """The reusable scratch and staging memory (read it; do not write it)."""
        return self._workspace

    def staged(self, device: torch.device | str) -> bool:
        """Whether tensors on ``device`` travel through host staging memory."""
        return self._engine.route(torch.device(device)).staged

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
        if out is None:
            hot = self._sum_fresh  # the hot path of a plain host tensor
            if hot is not None:
                result = hot(input_)
                if result is not None:
                    return result
        elif out is input_:  # an in-place sum (torch.distributed's)
            hot = self._sum_into
            if hot is not None:
                result = hot(input_)
                if result is not None:
                    return result
        info = check_tensor(input_)
        check_device(input_, self.device)
        if out is not None:
            check_out(out, input_)
        self.agree("all_reduce", lambda: consistency.fingerprint("all_reduce", input_))
        return self._engine.all_reduce(input_, out, info)

    def all_reduce_algorithm(self, input_: torch.Tensor) -> str:
        """The algorithm :meth:`all_reduce` would use for ``input_``: ``shm``, ``native``,
        ``bytes`` or ``hierarchical`` (see :mod:`mpicomm.plan`). No MPI call."""
        return self._engine.algorithm(input_, check_tensor(input_))

    def all_gather(
        self, input_: torch.Tensor, dim: int = -1, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``torch.cat([x_0, ..., x_{W-1}], dim)`` on every rank (a 0-d input counts as shape (1,)).

        The result is a fresh tensor, or, with ``out`` (the result's shape, input's dtype and
        device), written into ``out``, which is returned; an ``out`` sharing memory with the
        input (torch.distributed's in-place gather) receives the result through fresh memory.
        """
        hot = self._gather_fresh  # the hot path of a small host tensor
        if hot is not None:
            result = hot(input_, dim, out)
            if result is not None:
                return result
        check_tensor(input_)
        dim = normalize_dim(dim, input_.dim())
        check_device(input_, self.device)
        x = input_.reshape(1) if input_.dim() == 0 else input_
        if out is not None:
            check_out(out, x, _grown(x.shape, dim, x.shape[dim] * self.world_size))
        self.agree("all_gather", lambda: consistency.fingerprint("all_gather", input_, dim))
        return self._engine.all_gather(x, dim, out)

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
        return self._engine.gather(x, dim, dst, out)

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
        hot = self._gatherv_fresh  # the hot path of one tensor
        if hot is not None:
            result = hot(input_, dim, sizes, out)
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
        gatherv = self._engine.all_gatherv
        outs = [gatherv(t, sizes, o) for t, o in zip(tensors, targets, strict=True)]
        return outs[0] if isinstance(input_, torch.Tensor) else outs

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
        hot = self._scatter_fresh  # the hot path
        if hot is not None:
            result = hot(input_, dim, sizes, operation, out)
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
        return self._engine.reduce_scatter(operation, input_, moved, dim, sizes, out, info)

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
        return self._engine.broadcast(tensor, src, out)

    def barrier(self) -> None:
        """Return once every rank of the group has entered it (no data): through the
        shared-memory segment when the group has one, else ``MPI_Barrier`` on the payload
        communicator; bounded by the timeout like any collective."""
        self.agree("barrier", lambda: consistency.fingerprint("barrier", _NOTHING))
        self._engine.barrier()

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
        self._engine.send(tensor, dst)

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
        return self._engine.recv(shape, dtype, src, self.device)

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
        return self._engine.all_to_allv(input_, send_rows, recv_rows)

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
        engine = self._engine
        self._use(engine.plain())  # no hot path may touch the unmapped segment
        self._call.close()
        engine.close()
        self._free_groups()
        tracking.untrack(self)

    def __repr__(self) -> str:
        return (
            f"MPICommunicator({self._call.group!r}, rank={self.rank}/{self.world_size}, "
            f"device={self.device}, ranks={self.ranks})"
        )


_NOTHING = torch.empty(0, dtype=torch.uint8)  # the fingerprinted tensor of a barrier


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
