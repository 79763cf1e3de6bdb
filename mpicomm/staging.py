"""How one call's tensors reach MPI: directly, or through pinned host staging memory.

A communicator keeps one :class:`Route` per device it has seen; a collective looks its route up
once (:meth:`Route.for_device` is the only place that decides "staged?") and then asks it for the
memory MPI reads (:meth:`Route.stage_in`), the memory MPI writes (:meth:`Route.output`) and the
caller's fresh result (:meth:`Route.result`).

Staged: CUDA tensors without a CUDA-aware MPI, or every tensor when staging is forced
(``MPICOMM_STAGING=1``, to test this path without a GPU). The staging memory is the communicator's
:class:`~mpicomm.buffers.Workspace` (slots ``in`` and ``out``), reused from call to call.
Direct: host tensors, and CUDA tensors with a CUDA-aware MPI, whose producing stream is
synchronised once before MPI touches device memory.
"""

from __future__ import annotations

import torch

from . import plan, reduction
from .buffers import ResultMemory, Workspace, sync_device
from .dtypes import DTYPES

_HOST = torch.device("cpu")


def readable(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` detached, with lazy views resolved, so that its memory holds its values: the
    memory of ``x.conj()`` (complex) or of a negative view (``x.conj().imag``) holds the
    unconjugated, unnegated values, and MPI or shared memory read memory."""
    if tensor.requires_grad:
        tensor = tensor.detach()
    if tensor.is_conj() or tensor.is_neg():
        tensor = tensor.resolve_conj().resolve_neg()
    return tensor


def writable_into(out: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether a result computed from ``x`` (contiguous, same shape and dtype) may be written
    straight into ``out``'s memory: ``out`` is a contiguous host tensor with no lazy conj/neg bit
    (its memory must hold its values), and it is either ``x``'s own memory (an in-place sum) or
    shares no storage with it (a partial overlap would read elements already overwritten)."""
    if not out.is_cpu or out.is_neg() or out.is_conj() or not out.is_contiguous():
        return False
    return not overlaps_partly(out, x)


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The addresses ``[first, end)`` of the bytes ``t`` can reach (strides >= 0, as torch's)."""
    start = t.data_ptr()
    count = t.numel()
    if count == 0:
        return start, start
    if t.is_contiguous():
        return start, start + count * t.element_size()
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
    return start, start + (last + 1) * t.element_size()


def overlaps_partly(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` share memory without being the same elements (same address,
    shape and strides): a result written into one while the other is read would read elements
    already overwritten. Compares addresses, not storages: two storages (two tensors made from
    one numpy array, say) may cover the same memory."""
    if a is b:  # torch.distributed's in-place calls pass one tensor as input and output
        return False
    if a.device != b.device:
        return False
    a_first, a_end = _span(a)
    b_first, b_end = _span(b)
    if a_end <= b_first or b_end <= a_first:
        return False
    same = a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
    return not (same and a.dtype == b.dtype)


class Route:
    """The memory of one call on ``device``: staged through the host, or handed to MPI directly."""

    __slots__ = ("device", "staged", "on_gpu", "_workspace", "_results")

    def __init__(
        self, device: torch.device, staged: bool, workspace: Workspace, results: ResultMemory
    ) -> None:
        self.device = device
        self.staged = staged
        self.on_gpu = device != _HOST and device.type == "cuda"
        self._workspace = workspace
        self._results = results

    @staticmethod
    def needs_staging(device: torch.device, cuda_aware: bool, forced: bool) -> bool:
        """Whether a tensor on ``device`` goes through host staging memory."""
        return forced or (not cuda_aware and device != _HOST and device.type == "cuda")

    def stage_in(self, tensor: torch.Tensor, slot: str = "in", sync: bool = True) -> torch.Tensor:
        """``tensor`` as a contiguous tensor in memory MPI can read (never one MPI writes).

        Detached: collectives are not recorded by autograd, and MPI cannot read a tensor that
        requires grad (nor may a staging slot join an autograd graph). Lazy views are resolved:
        the memory of ``x.conj()`` (complex) or of a negative view (``x.conj().imag``) holds the
        unconjugated, unnegated values, and MPI reads memory. ``sync=False`` when the caller
        synchronises the device itself (:meth:`ready`) after making its output.
        """
        tensor = readable(tensor)
        if self.staged:
            shape = tuple(tensor.shape)
            host = self._workspace.tensor(slot, shape, tensor.dtype, _HOST, True)
            host.copy_(tensor)
            return host
        tensor = tensor.contiguous()
        if sync and self.on_gpu:
            sync_device(self.device)
        return tensor

    def output(self, shape: tuple[int, ...], dtype: torch.dtype, sync: bool = True):
        """Memory for MPI to write a result of ``shape`` into.

        Direct device memory waits for the stream (kernels still queued may use the block the
        caching allocator just handed out) unless ``sync=False`` (see :meth:`ready`).
        """
        if self.staged:
            return self._workspace.tensor("out", tuple(shape), dtype, _HOST, True)
        if not self.on_gpu:
            return self._results.empty(shape, dtype)
        out = torch.empty(shape, dtype=dtype, device=self.device)
        if sync:
            sync_device(self.device)
        return out

    def stage_in_and_output(self, tensor: torch.Tensor, shape, dtype=None):
        """:meth:`stage_in` and :meth:`output` with one stream synchronisation between them."""
        x = self.stage_in(tensor, sync=False)
        out = self.output(shape, x.dtype if dtype is None else dtype, sync=False)
        self.ready()
        return x, out

    def ready(self) -> None:
        """Wait for the device's stream (direct device memory only)."""
        if self.on_gpu and not self.staged:
            sync_device(self.device)

    def result(self, out: torch.Tensor) -> torch.Tensor:
        """The caller's fresh result: ``out`` itself, or a copy out of the staging memory."""
        if self.staged:
            return out.to(self.device, copy=True)
        return out

    def gathered(self, buf: torch.Tensor, dim: int) -> torch.Tensor:
        """The result of a gather into :func:`stacked_shape` memory: ``torch.cat`` of the W
        blocks along ``dim``, fresh and contiguous."""
        buf = self.result(buf)
        if dim == 0:
            return buf
        world, shape = buf.shape[0], buf.shape[1:]
        merged = (*shape[:dim], world * shape[dim], *shape[dim + 1 :])
        moved = buf.movedim(0, dim)  # (*shape[:dim], W, *shape[dim:]), strided
        if buf.is_cpu:
            out = self._results.empty(merged, buf.dtype)
        else:
            out = torch.empty(merged, dtype=buf.dtype, device=buf.device)
        out.view(moved.shape).copy_(moved)
        return out


def stacked_shape(shape: torch.Size, world: int, dim: int) -> tuple[int, ...]:
    """The shape MPI gathers W blocks of ``shape`` into: the final ``torch.cat`` shape for
    ``dim == 0`` (rank blocks are already in place), else ``(W, *shape)`` to be merged by
    :meth:`Route.gathered`."""
    return (world * shape[0], *shape[1:]) if dim == 0 else (world, *shape)


def staging_needs(
    tensors: list[torch.Tensor], world: int, algo: str
) -> list[tuple[str, int, bool]]:
    """``(slot, bytes, pinned)`` that an all_reduce, reduce_scatter or all_gather (output) of any
    of ``tensors`` takes from the host workspace when staged (for reserving them ahead)."""
    need = {"in": 0, "out": 0, "parts": 0, "accumulate": 0, "widen": 0, "tails": 0}
    for t in tensors:
        info = DTYPES.get(t.dtype)
        if info is None:
            continue
        numel, size = t.numel(), info.itemsize
        need["in"] = need["out"] = max(need["out"], numel * size)
        if plan.flat_algorithm(info, numel * size, algo) == plan.BYTES:
            for slot, nbytes in reduction.bytes_workspace(numel, info, world).items():
                need[slot] = max(need[slot], nbytes)
    return [(slot, n, slot in ("in", "out")) for slot, n in need.items() if n]
