"""The ``"mpicomm"`` torch.distributed process group: every collective on MPI.

One :class:`MPIProcessGroup` per torch group, over its own MPI communicator (a duplicate of
``COMM_WORLD`` for the default group, ``MPI_Comm_create_group`` of the members for
``dist.new_group``). Sums (``SUM``/``AVG``) go through an :class:`mpicomm.MPICommunicator` on that
communicator (its numerics and staging); data movement (broadcast, gathers, scatters,
all-to-all) and the other reduce operations are MPI calls made through :class:`mpicomm.calls.Caller`
(errors as :class:`~mpicomm.CommunicationError`, waits bounded by the group's ``timeout=`` as
:class:`~mpicomm.CollectiveTimeoutError`). Point-to-point traffic uses a second duplicate, so a
message never matches a collective's.

torch calls these methods with its own argument layout (lists of tensors, ``*Options``); the
in-place semantics are torch's: results are written into the tensors the caller passed. Which
names torch calls for which public function: docs/distributed.md ("How it hooks into torch").

Longer than ~400 lines on purpose: torch looks every hook up on this one class (one short method
per hook, plus the aliases older torch releases call); the reduce ops, memory, work objects and
monitored_barrier live in their own modules.
"""

from __future__ import annotations

import zlib
from datetime import timedelta

import torch
import torch.distributed as dist

from .._mpi import MPI
from ..buffers import byte_spec, mpi_spec, vector_spec
from ..calls import Caller
from ..communicator import MPICommunicator
from ..cuda import cuda_aware
from ..validation import check_rank
from . import ops
from .monitor import MONITOR_TAG, install_torch_monitored_barrier, monitored_barrier
from .tensors import host_stack, readable, split_into, writable, write_back
from .work import PendingWork, completed

NAME = "mpicomm"
_MAX_TAG = MONITOR_TAG


def _seconds(timeout) -> float | None:
    if timeout is None:
        return None
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
    return seconds if seconds > 0 else None


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class MPIProcessGroup(dist.ProcessGroup):
    """A torch process group whose collectives run on the MPI communicator ``comm`` (owned: freed
    by :meth:`shutdown`). ``timeout`` (seconds or ``None``) bounds every wait."""

    def __init__(self, comm: MPI.Comm, timeout: float | None, name: str) -> None:
        super().__init__(comm.Get_rank(), comm.Get_size())
        self.comm = comm
        self.timeout = timeout
        self.label = name
        self.cuda_aware = cuda_aware()
        self.caller = Caller(name, timeout)
        self.caller.prepare(comm)
        self.sums = MPICommunicator(
            cpu_group=comm,
            device=_device(),
            unique_name=name,
            timeout=0 if timeout is None else timeout,
        )
        self.p2p = comm.Dup()
        self._shut = False
        self._group_name = name
        self._group_desc = ""
        self._abandoned: list[tuple] = []
        self._finished = completed([])

    # ----------------------------------------------------------------- identity
    def getBackendName(self) -> str:  # noqa: N802 - torch's name
        return NAME

    @property
    def world(self) -> int:
        return self.size()

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
        return f"MPIProcessGroup({self.label!r}, rank={self.rank()}/{self.world})"

    def _run(self, operation: str, method: str, *args) -> None:
        self.caller(operation, self.comm, method, *args)

    # ----------------------------------------------------------------- reductions
    def _reduce_into(self, operation: str, tensor: torch.Tensor, reduce_op, root=None) -> None:
        name = ops.op_name(reduce_op, operation)
        ops.check(name, tensor.dtype, operation)
        if name in (ops.SUM, ops.AVG):
            # an all_reduce sums in place (no fresh result, no copy back); a reduce leaves
            # the other ranks' tensors as they were
            target = tensor.detach() if root is None else None
            summed = self.sums.all_reduce(tensor, out=target)
            if name == ops.AVG:
                ops.average(summed, self.world)
            if summed is not target and (root is None or self.rank() == root):
                write_back(tensor, summed)
            return
        out = ops.reduce(self.caller, operation, self.comm, tensor, name, root)
        if out is not None:
            write_back(tensor, out.to(tensor.dtype))

    def _done(self, result, opts):
        """The work to return: a shared finished one for a synchronous call (torch only waits on
        it), else a fresh one whose future holds ``result``."""
        if opts is not None and not getattr(opts, "asyncOp", True):
            return self._finished
        return completed(result)

    def allreduce(self, tensors, opts=None):
        """``tensors[i]`` <- the reduction of ``tensors[i]`` over the group, on every rank."""
        op = dist.ReduceOp.SUM if opts is None else opts.reduceOp
        for t in tensors:
            self._reduce_into("all_reduce", t, op)
        return self._done(list(tensors), opts)

    def allreduce_coalesced(self, tensors, opts=None):
        return self.allreduce(tensors, opts)

    def reduce(self, tensors, opts):
        """``tensors[0]`` on ``opts.rootRank`` <- the reduction; other ranks' tensors unchanged."""
        root = check_rank(opts.rootRank, self.world, "dst")
        self._reduce_into("reduce", tensors[0], opts.reduceOp, root)
        return completed(list(tensors))

    def reduce_scatter(self, outputs, input_lists, opts=None):
        """``outputs[0]`` <- the reduction over ranks of ``input_lists[0][rank]``."""
        stacked = host_stack(input_lists[0])
        self._reduce_scatter_into("reduce_scatter", outputs[0], stacked, opts)
        return completed(list(outputs))

    def reduce_scatter_single(self, output, input_, opts=None):
        """``output`` <- this rank's W-th (dim 0) of the reduction of ``input_``."""
        self._reduce_scatter_into("reduce_scatter_tensor", output, input_, opts)
        return completed([output])

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter_single_coalesced(self, outputs, inputs, opts=None):
        for out, inp in zip(outputs, inputs, strict=True):
            self._reduce_scatter_into("reduce_scatter_tensor", out, inp, opts)
        return completed(list(outputs))

    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced

    def _reduce_scatter_into(self, operation, output, input_, opts) -> None:
        reduce_op = dist.ReduceOp.SUM if opts is None else opts.reduceOp
        name = ops.op_name(reduce_op, operation)
        ops.check(name, input_.dtype, operation)
        if input_.numel() != output.numel() * self.world:
            raise ValueError(
                f"{operation}: input has {input_.numel()} elements, expected "
                f"{self.world} x output's {output.numel()}"
            )
        if name in (ops.SUM, ops.AVG):
            rows = input_.detach().reshape(self.world, -1)
            mine = self.sums.reduce_scatter(rows, dim=0)
            if name == ops.AVG:
                ops.average(mine, self.world)
        else:
            flat = input_.detach().reshape(-1)
            mine = ops.reduce_scatter(self.caller, operation, self.comm, flat, name)
        write_back(output, mine.to(output.dtype))

    # ----------------------------------------------------------------- data movement
    def broadcast(self, tensors, opts=None):
        """``tensors[i]`` <- rank ``opts.rootRank``'s ``tensors[i]`` on every rank."""
        root = check_rank(0 if opts is None else opts.rootRank, self.world, "src")
        for t in tensors:
            buf = (
                readable(t, self.cuda_aware)
                if self.rank() == root
                else writable(t, self.cuda_aware)
            )
            self._run("broadcast", "Bcast", mpi_spec(buf), root)
            write_back(t, buf)
        return self._done(list(tensors), opts)

    def _gather_flat(self, operation: str, input_: torch.Tensor, counts: list[int], into):
        """All-gather ``input_`` (``counts[r]`` elements from rank r) into the flat tensor
        ``into`` (``sum(counts)`` elements, of ``input_``'s dtype)."""
        if input_.numel() != counts[self.rank()]:
            raise ValueError(
                f"{operation}: input has {input_.numel()} elements, the outputs expect "
                f"{counts[self.rank()]} from rank {self.rank()}"
            )
        x = readable(input_, self.cuda_aware)
        if len(set(counts)) == 1:
            self._run(operation, "Allgather", mpi_spec(x), mpi_spec(into, counts[0]))
        else:
            self._run(operation, "Allgatherv", mpi_spec(x), vector_spec(into, counts))

    def allgather(self, output_lists, inputs, opts=None):
        """``output_lists[0][r]`` <- rank r's ``inputs[0]`` (sizes may differ between ranks)."""
        for outs, inp in zip(output_lists, inputs, strict=True):
            _same_dtype("all_gather", [inp, *outs])
            counts = [o.numel() for o in outs]
            buf = torch.empty(sum(counts), dtype=inp.dtype)
            self._gather_flat("all_gather", inp, counts, buf)
            split_into(buf, outs)
        return completed(list(output_lists))

    def allgather_coalesced(self, output_lists, inputs, opts=None):
        """``output_lists[r][i]`` <- rank r's ``inputs[i]``."""
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
        buf = writable(output, self.cuda_aware)
        self._gather_flat("all_gather_into_tensor", input_, [input_.numel()] * self.world, buf)
        write_back(output, buf)
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
        x = readable(inputs[0], self.cuda_aware)
        if self.rank() == root:
            outs = output_lists[0]
            _same_dtype("gather", [x, *outs])
            if any(o.numel() != x.numel() for o in outs) or len(outs) != self.world:
                raise ValueError(f"gather: expected {self.world} outputs of {x.numel()} elements")
            buf = torch.empty(x.numel() * self.world, dtype=x.dtype)
            self._run("gather", "Gather", mpi_spec(x), mpi_spec(buf, x.numel()), root)
            split_into(buf, outs)
        else:
            self._run("gather", "Gather", mpi_spec(x), None, root)
        return completed(list(output_lists))

    def scatter(self, outputs, input_lists, opts):
        """``outputs[0]`` <- rank ``opts.rootRank``'s ``input_lists[0][rank]``."""
        root = check_rank(opts.rootRank, self.world, "src")
        out = outputs[0]
        buf = writable(out, self.cuda_aware)
        if self.rank() == root:
            ins = input_lists[0]
            _same_dtype("scatter", [out, *ins])
            if any(t.numel() != out.numel() for t in ins) or len(ins) != self.world:
                raise ValueError(f"scatter: expected {self.world} inputs of {out.numel()} elements")
            send = host_stack(ins)
            self._run("scatter", "Scatter", mpi_spec(send, out.numel()), mpi_spec(buf), root)
        else:
            self._run("scatter", "Scatter", None, mpi_spec(buf), root)
        write_back(out, buf)
        return completed(list(outputs))

    def alltoall(self, outputs, inputs, opts=None):
        """``outputs[s]`` <- rank s's ``inputs[rank]`` (sizes may differ)."""
        _same_dtype("all_to_all", [*inputs, *outputs])
        send = host_stack(inputs)
        recv = torch.empty(sum(o.numel() for o in outputs), dtype=send.dtype)
        self._run(
            "all_to_all",
            "Alltoallv",
            vector_spec(send, [t.numel() for t in inputs]),
            vector_spec(recv, [o.numel() for o in outputs]),
        )
        split_into(recv, outputs)
        return completed(list(outputs))

    def all_to_all_single(self, output, input_, output_split_sizes, input_split_sizes, opts=None):
        """Rows (dim 0) of ``input_`` to every rank, ``input_split_sizes[d]`` to rank d (an even
        split when empty); ``output`` <- ``output_split_sizes[s]`` rows from rank s, in order."""
        _same_dtype("all_to_all_single", [input_, output])
        send_rows = _splits("input_split_sizes", input_split_sizes, input_, self.world)
        recv_rows = _splits("output_split_sizes", output_split_sizes, output, self.world)
        row_in = input_[0].numel() if input_.dim() and input_.shape[0] else 1
        row_out = output[0].numel() if output.dim() and output.shape[0] else 1
        x = readable(input_, self.cuda_aware)
        buf = writable(output, self.cuda_aware)
        self._run(
            "all_to_all_single",
            "Alltoallv",
            vector_spec(x.reshape(-1), [r * row_in for r in send_rows]),
            vector_spec(buf.reshape(-1), [r * row_out for r in recv_rows]),
        )
        write_back(output, buf)
        return completed([output])

    alltoall_base = all_to_all_single

    def barrier(self, opts=None):
        """Returns once every rank of the group has entered it."""
        self._run("barrier", "Barrier")
        return completed([])

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
        """Start an ``Irecv`` (``peer=None``: from any rank) or ``Isend`` of ``tensor``."""
        if peer is not None:
            peer = check_rank(peer, self.world, "src" if receive else "dst")
        if not 0 <= tag < MONITOR_TAG:
            raise ValueError(f"{operation}: tag must be in [0, {MONITOR_TAG}), got {tag}")
        finish = None
        if receive:
            buf = writable(tensor, self.cuda_aware)
            source = MPI.ANY_SOURCE if peer is None else peer
            request = self.p2p.Irecv(byte_spec(buf), source, tag)

            def finish(status, tensor=tensor, buf=buf):
                write_back(tensor, buf)

        else:
            buf = readable(tensor, self.cuda_aware)
            request = self.p2p.Isend(byte_spec(buf), peer, tag)
        return PendingWork(
            request,
            (buf, tensor),
            finish,
            operation=operation,
            group=self.label,
            peer=-1 if peer is None else peer,
            timeout=self.timeout,
            result=[tensor],
        )

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
        """The group of ``ranks`` (ranks of this group), on an MPI sub-communicator made by the
        members only (``MPI_Comm_create_group``); ``None`` on the other ranks."""
        ranks = list(range(self.world)) if ranks is None else [int(r) for r in ranks]
        if self.rank() not in ranks:
            return None
        name = str(group_name or f"{self.label}:{ranks}")
        members = self.comm.Get_group().Incl(ranks)
        try:
            tag = zlib.crc32(name.encode()) % _MAX_TAG
            sub = self.comm.Create_group(members, tag)
        finally:
            members.Free()
        seconds = _seconds(timeout) if timeout is not None else self.timeout
        pg = MPIProcessGroup(sub, seconds, name)
        pg._set_group_name(name)
        if group_desc:
            pg._set_group_desc(group_desc)
        return pg

    def shutdown(self) -> None:
        """Free the communicators (collective over the group; idempotent)."""
        if self._shut:
            return
        self._shut = True
        self.sums.destroy()
        self.caller.close()
        for c in (self.p2p, self.comm):
            if c != MPI.COMM_NULL:
                c.Free()

    def keep_alive(self, *objects) -> None:
        """Hold requests and buffers MPI may still use after a timeout (never freed)."""
        self._abandoned.append(objects)

    def abort(self) -> None:
        self.shutdown()


def _same_dtype(operation: str, tensors) -> None:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        names = ", ".join(sorted(str(d) for d in dtypes))
        raise TypeError(f"{operation}: all tensors must have one dtype, got {names}")


def _splits(argument: str, sizes, tensor: torch.Tensor, world: int) -> list[int]:
    rows = tensor.shape[0] if tensor.dim() else 1
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
    if ranks == list(range(world.Get_size())):
        if options.group_rank != world.Get_rank() or options.group_size != world.Get_size():
            raise ValueError(
                f"the mpicomm backend takes rank and world size from MPI: torch's rendezvous "
                f"gave rank {options.group_rank} of {options.group_size}, MPI.COMM_WORLD says "
                f"{world.Get_rank()} of {world.Get_size()} (use init_method='mpi://', or "
                f"RANK/WORLD_SIZE equal to MPI's)"
            )
        comm = world.Dup()
    else:
        members = world.Get_group().Incl(ranks)
        try:
            comm = world.Create_group(members, zlib.crc32(str(ranks).encode()) % _MAX_TAG)
        finally:
            members.Free()
    pg = MPIProcessGroup(comm, _seconds(options.timeout), str(options.group_id))
    install_torch_monitored_barrier(MPIProcessGroup)
    return pg
