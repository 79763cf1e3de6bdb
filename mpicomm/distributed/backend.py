"""The ``"mpicomm"`` torch.distributed process group: an adapter over one MPICommunicator.

One :class:`MPIProcessGroup` per torch group holds one :class:`mpicomm.MPICommunicator` over the
group's ranks, and every collective goes through it: on one node that is the shared-memory
segment, elsewhere MPI, with the communicator's numerics, staging, argument checks, consistency
mode (``MPICOMM_VALIDATE``), timeouts (the group's ``timeout=``) and broken state. The group holds
at most three MPI communicators (the communicator adopts the group's own as its payload
communicator) and at most one shared-memory segment. Point-to-point messages travel on the
payload communicator (MPI never matches them with collectives' traffic) as non-blocking requests
that the group keeps alive until they complete.

torch calls these methods with its own argument layout (lists of tensors, ``*Options``); the
in-place semantics are torch's: results are written into the tensors the caller passed. Arguments
are checked here, before the communicator's first call, as gloo checks them. Which names torch
calls for which public function: docs/distributed.md ("How it hooks into torch").

Longer than ~400 lines on purpose: torch looks every hook up on this one class (one short method
per hook, plus the aliases older torch releases call); the reduce ops, tensor copies, work objects
and monitored_barrier live in their own modules.
"""

from __future__ import annotations

import math
import zlib
from datetime import timedelta

import torch
import torch.distributed as dist

from .._mpi import MPI
from ..buffers import byte_spec
from ..communicator import MPICommunicator
from ..cuda import cuda_aware
from ..errors import CommunicationError
from ..groups import ranks_communicator
from ..topology import default_device
from ..validation import check_rank
from . import ops
from .monitor import MONITOR_TAG, install_torch_monitored_barrier, monitored_barrier
from .tensors import (
    flat,
    flat_cat,
    flat_view,
    joined,
    plain,
    receive_buffer,
    send_buffer,
    split_into,
    write_back,
)
from .work import PendingWork, completed

NAME = "mpicomm"
# Requests MPI may still use when their group is shut down (never freed).
_ORPHANED: list = []


def _seconds(timeout) -> float | None:
    if timeout is None:
        return None
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
    return seconds if seconds > 0 else None


class MPIProcessGroup(dist.ProcessGroup):
    """A torch process group of the ``COMM_WORLD`` ranks ``ranks`` (in group order) whose
    collectives run on one :class:`mpicomm.MPICommunicator` (destroyed by :meth:`shutdown`).
    ``timeout`` (seconds or ``None``) bounds every wait."""

    def __init__(self, ranks: list[int], timeout: float | None, name: str) -> None:
        comm = ranks_communicator(ranks, name)
        super().__init__(comm.Get_rank(), comm.Get_size())
        self.communicator = MPICommunicator(
            cpu_group=comm,
            device=default_device(),  # torch's current CUDA device, else cpu
            unique_name=name,
            timeout=0 if timeout is None else timeout,
            own_cpu_group=True,
        )
        self.timeout = timeout
        self.label = name
        self.cuda_aware = cuda_aware()
        self._world = comm.Get_size()
        self._rank = comm.Get_rank()
        self._shut = False
        self._group_name = name
        self._group_desc = ""
        self._pending: list[PendingWork] = []  # point-to-point works, alive until complete
        self._abandoned: list[tuple] = []
        self._finished = completed([])

    # ----------------------------------------------------------------- identity
    def getBackendName(self) -> str:  # noqa: N802 - torch's name
        return NAME

    @property
    def world(self) -> int:
        return self._world

    @property
    def comm(self) -> MPI.Comm:
        """The MPI communicator carrying the group's payload and point-to-point messages."""
        return self.communicator.device_group

    @property
    def group_name(self) -> str:
        return self._group_name

    def _set_group_name(self, name: str) -> None:
        self._group_name = name

    @property
    def group_desc(self) -> str:
        return self._group_desc

    def _set_group_desc(self, desc: str) -> None:
        self._group_desc = desc

    def __repr__(self) -> str:
        return f"MPIProcessGroup({self.label!r}, rank={self._rank}/{self.world})"

    def _done(self, result, opts):
        """The work to return: a shared finished one for a synchronous call (torch only waits on
        it), else a fresh one whose future holds ``result``."""
        if opts is not None and not getattr(opts, "asyncOp", True):
            return self._finished
        return completed(result)

    # ----------------------------------------------------------------- reductions
    def allreduce(self, tensors, opts=None):
        """``tensors[i]`` <- the reduction of ``tensors[i]`` over the group, on every rank."""
        name = ops.SUM if opts is None else ops.op_name(opts.reduceOp, "all_reduce")
        for t in tensors:
            ops.check(name, t.dtype, "all_reduce")
        communicator = self.communicator
        for t in tensors:
            x = plain(t)
            if name == ops.SUM:
                communicator.all_reduce(x, out=x)  # in place
            elif name == ops.AVG:
                ops.average(communicator.all_reduce(x, out=x), self._world)
            else:
                write_back(x, ops.all_reduce(communicator, x, name))
        return self._done(list(tensors), opts)

    def allreduce_coalesced(self, tensors, opts=None):
        return self.allreduce(tensors, opts)

    def reduce(self, tensors, opts):
        """``tensors[0]`` on ``opts.rootRank`` <- the reduction; other ranks' tensors unchanged."""
        root = check_rank(opts.rootRank, self.world, "dst")
        name = ops.op_name(opts.reduceOp, "reduce")
        x = plain(tensors[0])
        ops.check(name, x.dtype, "reduce")
        if name in (ops.SUM, ops.AVG):
            summed = self.communicator.all_reduce(x)
            if self._rank == root:
                write_back(x, ops.average(summed, self.world) if name == ops.AVG else summed)
        else:
            out = ops.reduce(self.communicator, x, name, root)
            if out is not None:
                write_back(x, out)
        return self._done(list(tensors), opts)

    def reduce_scatter(self, outputs, input_lists, opts=None):
        """``outputs[0]`` <- the reduction over ranks of ``input_lists[0][rank]``."""
        inputs, out = input_lists[0], outputs[0]
        _one_list("reduce_scatter", "input_list", inputs, self.world)
        _same_dtype("reduce_scatter", [out, *inputs])
        if any(t.numel() != out.numel() for t in inputs):
            raise ValueError(
                f"reduce_scatter: every tensor of input_list must have the output's "
                f"{out.numel()} elements, got {[t.numel() for t in inputs]}"
            )
        self._reduce_scatter_into("reduce_scatter", out, flat_cat(inputs), opts)
        return self._done(list(outputs), opts)

    def reduce_scatter_single(self, output, input_, opts=None):
        """``output`` <- this rank's W-th (dim 0) of the reduction of ``input_``."""
        _same_dtype("reduce_scatter_tensor", [input_, output])
        if input_.numel() != output.numel() * self.world:
            raise ValueError(
                f"reduce_scatter_tensor: input has {input_.numel()} elements, expected "
                f"{self.world} x output's {output.numel()}"
            )
        self._reduce_scatter_into("reduce_scatter_tensor", output, input_, opts)
        return self._done([output], opts)

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter_single_coalesced(self, outputs, inputs, opts=None):
        for out, inp in zip(outputs, inputs, strict=True):
            self.reduce_scatter_single(out, inp, opts)
        return completed(list(outputs))

    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced

    def _reduce_scatter_into(self, operation, output, input_, opts) -> None:
        """``output`` <- this rank's W-th of the reduction of every rank's ``input_`` (checked:
        W x output's elements, output's dtype)."""
        name = ops.SUM if opts is None else ops.op_name(opts.reduceOp, operation)
        ops.check(name, input_.dtype, operation)
        x = flat(input_)
        if name == ops.SUM or name == ops.AVG:
            target = flat_view(output)  # written in place when it is one memory
            mine = self.communicator.reduce_scatter(x, dim=0, out=target)
            if name == ops.AVG:
                ops.average(mine, self._world)
            if target is not None:
                return
        else:
            mine = ops.reduce_scatter(self.communicator, x, name)
        write_back(output, mine)

    # ----------------------------------------------------------------- data movement
    def broadcast(self, tensors, opts=None):
        """``tensors[i]`` <- rank ``opts.rootRank``'s ``tensors[i]`` on every rank."""
        root = check_rank(0 if opts is None else opts.rootRank, self.world, "src")
        for t in tensors:
            x = plain(t)
            self.communicator.broadcast(x, root, out=x)
        return self._done(list(tensors), opts)

    def allgather(self, output_lists, inputs, opts=None):
        """``output_lists[0][r]`` <- rank r's ``inputs[0]`` (sizes may differ between ranks)."""
        for outs, inp in zip(output_lists, inputs, strict=True):
            self._check_gather_list(outs, inp)
        for outs, inp in zip(output_lists, inputs, strict=True):
            x = flat(inp)
            counts = [o.numel() for o in outs]
            if len(set(counts)) == 1:
                target = joined(outs)  # the chunks of one buffer: gathered into it
                got = self.communicator.all_gather(x, dim=0, out=target)
                if target is None:
                    split_into(got, outs)
            else:
                self._agree_on_sizes(counts)
                target = joined(outs)
                got = self.communicator.all_gatherv(x, dim=0, sizes=counts, out=target)
                if target is None:
                    split_into(got, outs)
        return self._done(list(output_lists), opts)

    def _check_gather_list(self, outs, inp) -> None:
        """All-gather's output list: one tensor per rank of ``inp``'s dtype; this rank's of
        ``inp``'s size, and every one of that size unless the sizes differ (checked locally, as
        gloo checks, before any MPI call)."""
        _one_list("all_gather", "tensor_list", outs, self.world)
        _same_dtype("all_gather", [inp, *outs])
        counts = [o.numel() for o in outs]
        mine = counts[self._rank]
        if mine != inp.numel():
            raise ValueError(
                f"all_gather: tensor_list[{self._rank}] (this rank's) has {mine} elements, "
                f"the input has {inp.numel()}"
            )

    def _agree_on_sizes(self, counts: list[int]) -> None:
        """An all-gather of unequal sizes: ``ValueError`` on every rank unless every rank's
        output list has the same sizes (one exchange on the control communicator)."""
        key = zlib.crc32(str(counts).encode())
        every = self.communicator.exchange_rows(key)
        if len(set(every)) > 1:
            raise ValueError(
                f"all_gather on group {self.label!r}: the ranks' tensor_list sizes differ "
                f"(this rank's: {counts}); every rank must pass the same sizes"
            )

    def allgather_coalesced(self, output_lists, inputs, opts=None):
        """``output_lists[r][i]`` <- rank r's ``inputs[i]``."""
        _one_list("all_gather_coalesced", "output_tensor_lists", output_lists, self.world)
        for i, inp in enumerate(inputs):
            self.allgather([[outs[i] for outs in output_lists]], [inp], opts)
        return completed(list(output_lists))

    def all_gather_single(self, output, input_, opts=None):
        """``output`` (W x input's elements, dim 0 = rank) <- every rank's ``input_``."""
        _same_dtype("all_gather_into_tensor", [input_, output])
        if output.numel() != input_.numel() * self.world:
            raise ValueError(
                f"all_gather_into_tensor: output has {output.numel()} elements, expected "
                f"{self.world} x input's {input_.numel()}"
            )
        target = flat_view(output)  # written in place when it is one memory
        got = self.communicator.all_gather(flat(input_), dim=0, out=target)
        if target is None:
            write_back(output, got)
        return self._done([output], opts)

    _allgather_base = all_gather_single

    def all_gather_single_coalesced(self, outputs, inputs, opts=None):
        for out, inp in zip(outputs, inputs, strict=True):
            self.all_gather_single(out, inp)
        return completed(list(outputs))

    allgather_into_tensor_coalesced = all_gather_single_coalesced

    def gather(self, output_lists, inputs, opts):
        """On ``opts.rootRank``: ``output_lists[0][r]`` <- rank r's ``inputs[0]``."""
        root = check_rank(opts.rootRank, self.world, "dst")
        x = plain(inputs[0])
        target = None
        if self._rank == root:
            outs = output_lists[0] if output_lists else []
            _one_list("gather", "gather_list", outs, self.world)
            _same_dtype("gather", [x, *outs])
            if any(o.numel() != x.numel() for o in outs):
                raise ValueError(f"gather: expected {self.world} outputs of {x.numel()} elements")
            target = joined(outs)  # the chunks of one buffer: gathered into it
        out = self.communicator.gather(flat(x), dst=root, dim=0, out=target)
        if out is not None and target is None:
            split_into(out, output_lists[0])
        return self._done(list(output_lists), opts)

    def scatter(self, outputs, input_lists, opts):
        """``outputs[0]`` <- rank ``opts.rootRank``'s ``input_lists[0][rank]``: the root sends
        piece d to rank d, the others nothing (an all-to-all of the communicator)."""
        root = check_rank(opts.rootRank, self.world, "src")
        out = outputs[0]
        n = out.numel()
        if self._rank == root:
            ins = input_lists[0] if input_lists else []
            _one_list("scatter", "scatter_list", ins, self.world)
            _same_dtype("scatter", [out, *ins])
            if any(t.numel() != n for t in ins):
                raise ValueError(f"scatter: expected {self.world} inputs of {n} elements")
            send, send_rows = flat_cat(ins).reshape(self.world, n), [1] * self.world
        else:
            send, send_rows = torch.empty(0, n, dtype=out.dtype), [0] * self.world
        # one row of n elements per piece: the consistency mode compares n across ranks
        recv_rows = [int(s == root) for s in range(self.world)]
        write_back(out, self.communicator.all_to_allv(send, send_rows, recv_rows))
        return self._done(list(outputs), opts)

    def alltoall(self, outputs, inputs, opts=None):
        """``outputs[s]`` <- rank s's ``inputs[rank]`` (sizes may differ)."""
        _one_list("all_to_all", "input_tensor_list", inputs, self.world)
        _one_list("all_to_all", "output_tensor_list", outputs, self.world)
        _same_dtype("all_to_all", [*inputs, *outputs])
        got = self.communicator.all_to_allv(
            flat_cat(inputs), [t.numel() for t in inputs], [o.numel() for o in outputs]
        )
        split_into(got, outputs)
        return self._done(list(outputs), opts)

    def all_to_all_single(self, output, input_, output_split_sizes, input_split_sizes, opts=None):
        """Rows (dim 0) of ``input_`` to every rank, ``input_split_sizes[d]`` to rank d (an even
        split when empty); ``output`` <- ``output_split_sizes[s]`` rows from rank s, in order."""
        _same_dtype("all_to_all_single", [input_, output])
        x = plain(input_)
        x = x.reshape(1) if x.dim() == 0 else x
        y = output.reshape(1) if output.dim() == 0 else output
        send_rows = _splits("input_split_sizes", input_split_sizes, x, self.world)
        recv_rows = _splits("output_split_sizes", output_split_sizes, y, self.world)
        row_in, row_out = math.prod(x.shape[1:]), math.prod(y.shape[1:])
        if row_in != row_out:
            raise ValueError(
                f"all_to_all_single: output rows of {row_out} elements, input rows of "
                f"{row_in}: they must match"
            )
        write_back(output, self.communicator.all_to_allv(x, send_rows, recv_rows))
        return self._done([output], opts)

    alltoall_base = all_to_all_single

    def barrier(self, opts=None):
        """Returns once every rank of the group has entered it."""
        self.communicator.barrier()
        return self._done([], opts)

    def monitored_barrier(self, timeout=None, wait_all_ranks: bool = False) -> None:
        """A barrier whose failure names the ranks that did not arrive within ``timeout``.

        Rank 0 waits for a message from every other rank, then answers each; a rank missing
        at the deadline raises :class:`~mpicomm.CollectiveTimeoutError` on rank 0 (listing every
        missing rank with ``wait_all_ranks``, else the first) and, by its own deadline, on the
        ranks waiting for rank 0's answer.
        """
        monitored_barrier(self, _seconds(timeout) or self.timeout, wait_all_ranks)

    # ----------------------------------------------------------------- point-to-point
    def _p2p(self, operation, tensor, peer: int | None, tag: int, receive: bool) -> PendingWork:
        """Start an ``Irecv`` (``peer=None``: from any rank) or ``Isend`` of ``tensor``.

        The group keeps the work (its request and buffers) until the request completes, whether
        or not the caller waits on it: MPI may read or write the buffers until then.
        """
        if peer is not None:
            peer = check_rank(peer, self.world, "src" if receive else "dst")
        if not 0 <= tag < MONITOR_TAG:
            raise ValueError(f"{operation}: tag must be in [0, {MONITOR_TAG}), got {tag}")
        broken = self.communicator.broken
        if broken is not None:
            raise CommunicationError(
                f"{operation} on group {self.label!r}: the group is unusable after an earlier "
                f"failure ({broken})",
                operation=operation,
                group=self.label,
            )
        self._pending = [w for w in self._pending if not w.is_completed()]
        finish = None
        if receive:
            buf = receive_buffer(tensor, self.cuda_aware)
            source = MPI.ANY_SOURCE if peer is None else peer
            request = self.comm.Irecv(byte_spec(buf), source, tag)

            def finish(status, tensor=tensor, buf=buf):
                write_back(tensor, buf)

        else:
            buf = send_buffer(tensor, self.cuda_aware)
            request = self.comm.Isend(byte_spec(buf), peer, tag)
        work = PendingWork(
            request,
            (buf, tensor),
            finish,
            operation=operation,
            group=self.label,
            peer=-1 if peer is None else peer,
            timeout=self.timeout,
            result=[tensor],
        )
        self._pending.append(work)
        return work

    def send(self, tensors, dst: int, tag: int = 0):
        """Start sending ``tensors[0]`` to group rank ``dst``; the work completes the send."""
        return self._p2p("send", tensors[0], dst, tag, receive=False)

    def recv(self, tensors, src: int, tag: int = 0):
        """Start receiving into ``tensors[0]`` from group rank ``src``; ``wait()`` fills it."""
        return self._p2p("recv", tensors[0], src, tag, receive=True)

    def recv_anysource(self, tensors, tag: int = 0):
        """Like :meth:`recv` from whichever rank sends first (``work._source_rank()``)."""
        return self._p2p("recv", tensors[0], None, tag, receive=True)

    # ----------------------------------------------------------------- groups and lifetime
    def new_group(self, ranks, timeout=None, pg_options=None, group_name=None, group_desc=None):
        """The group of ``ranks`` (ranks of this group), on an MPI communicator made by the
        members only (``MPI_Comm_create_group``); ``None`` on the other ranks."""
        ranks = list(range(self.world)) if ranks is None else [int(r) for r in ranks]
        if self._rank not in ranks:
            return None
        name = str(group_name or f"{self.label}:{ranks}")
        members = [self.communicator.ranks[r] for r in ranks]
        seconds = _seconds(timeout) if timeout is not None else self.timeout
        pg = MPIProcessGroup(members, seconds, name)
        pg._set_group_name(name)
        if group_desc:
            pg._set_group_desc(group_desc)
        return pg

    def shutdown(self) -> None:
        """Destroy the communicator (collective over the group; idempotent). Point-to-point
        requests still in flight keep their buffers for the rest of the process."""
        if self._shut:
            return
        self._shut = True
        _ORPHANED.extend(w for w in self._pending if not w.is_completed())
        self._pending.clear()
        self.communicator.destroy()

    def keep_alive(self, *objects) -> None:
        """Hold requests and buffers MPI may still use after a timeout (never freed)."""
        self._abandoned.append(objects)

    def abort(self) -> None:
        self.shutdown()


def _one_list(operation: str, argument: str, tensors, world: int) -> None:
    """``tensors`` must hold one tensor per rank of the group."""
    if len(tensors) != world:
        raise ValueError(
            f"{operation}: {argument} has {len(tensors)} tensors, the group has {world} ranks"
        )


def _same_dtype(operation: str, tensors) -> None:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        names = ", ".join(sorted(str(d) for d in dtypes))
        raise TypeError(f"{operation}: all tensors must have one dtype, got {names}")


def _splits(argument: str, sizes, tensor: torch.Tensor, world: int) -> list[int]:
    rows = tensor.shape[0]
    if not sizes:
        if rows % world:
            raise ValueError(f"all_to_all_single: {rows} rows do not split evenly over {world}")
        return [rows // world] * world
    sizes = [int(s) for s in sizes]
    if len(sizes) != world or sum(sizes) != rows or min(sizes) < 0:
        raise ValueError(
            f"all_to_all_single: {argument}={sizes} must be {world} non-negative sizes "
            f"summing to the {rows} rows of the tensor"
        )
    return sizes


def create(options, backend_options=None) -> MPIProcessGroup:
    """torch's creator for the ``"mpicomm"`` backend (``extended_api=True``).

    The group's members are ``options.global_ranks_in_group`` (all of ``COMM_WORLD`` for the
    default group). The rank torch's rendezvous gave must be the MPI rank: under ``env://`` a
    launcher numbering processes differently from MPI is refused.
    """
    world = MPI.COMM_WORLD
    ranks = list(options.global_ranks_in_group) or list(range(world.Get_size()))
    if ranks == list(range(world.Get_size())) and (
        options.group_rank != world.Get_rank() or options.group_size != world.Get_size()
    ):
        raise ValueError(
            f"the mpicomm backend takes rank and world size from MPI: torch's rendezvous "
            f"gave rank {options.group_rank} of {options.group_size}, MPI.COMM_WORLD says "
            f"{world.Get_rank()} of {world.Get_size()} (use init_method='mpi://', or "
            f"RANK/WORLD_SIZE equal to MPI's)"
        )
    pg = MPIProcessGroup(ranks, _seconds(options.timeout), str(options.group_id))
    install_torch_monitored_barrier(MPIProcessGroup)
    return pg
