"""The one place where tensors become MPI buffers.

Everything that hands tensor memory to MPI goes through :func:`mpi_spec`: the carrier datatype
from :mod:`mpicomm.dtypes`, contiguity, and the CUDA stream
synchronisation that mpi4py does not do itself. Host memory goes to MPI by address, device memory
by DLPack. :class:`Workspace` holds the reusable scratch and pinned staging memory, grown on demand
and never reallocated per call; :class:`ResultMemory` makes fresh host results (large ones in
recycled memory, on huge pages).
"""

from __future__ import annotations

import ctypes
import functools
import math
import sys
import threading

import torch

from ._mpi import MPI
from .dtypes import DTYPES

_HOST = torch.device("cpu")
_MAX_VIEWS = 64  # cached workspace views (shapes vary with token counts: keep the set bounded)


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """A 1-d view of a contiguous tensor with unit stride.

    torch calls a tensor of 0 or 1 elements contiguous whatever its strides; those get stride 1
    so that views to other element sizes work.
    """
    flat = tensor.reshape(-1)
    if flat.numel() <= 1 and flat.stride(0) != 1:
        flat = flat.as_strided((flat.numel(),), (1,))
    return flat


class Spec(list):
    """An mpi4py buffer spec, ``[memory, (count,) datatype]``, that keeps its tensor alive.

    Host memory is handed to mpi4py by address (no numpy view: half the cost per buffer), so the
    spec itself must own the tensor: a request abandoned after a timeout keeps its specs, and with
    them the memory MPI may still write.
    """

    __slots__ = ("tensor",)


def _spec(tensor: torch.Tensor, items: tuple) -> Spec:
    spec = Spec(items)
    spec.tensor = tensor
    return spec


def mpi_spec(tensor: torch.Tensor, count: int | None = None) -> Spec:
    """``[memory, (count,) datatype]`` for a contiguous ``tensor``, as mpi4py's buffer API takes it.

    ``count`` defaults to every element (mpi4py reads it off the memory's size); gathers pass the
    count one rank contributes. The caller guarantees, for device memory, that the producing
    stream has been synchronised (:func:`sync_device`).
    """
    info = DTYPES[tensor.dtype]
    memory = _memory(tensor, info.carrier)
    return _spec(tensor, (memory, info.mpi) if count is None else (memory, count, info.mpi))


def _memory(tensor: torch.Tensor, carrier: torch.dtype):
    """What mpi4py is handed for a contiguous tensor's memory.

    Host memory: its address and size (MPI reads bytes; the datatype says what they are). Device
    memory: see :func:`_device_memory`.
    """
    if not tensor.is_contiguous():
        raise RuntimeError("mpicomm internal error: a non-contiguous tensor reached MPI")
    if tensor.is_cpu:
        return MPI.buffer.fromaddress(tensor.data_ptr(), tensor.nbytes)
    return _device_memory(tensor, carrier)


def _device_memory(tensor: torch.Tensor, carrier: torch.dtype) -> torch.Tensor:
    """The 1-d tensor itself, viewed as ``carrier`` (a dtype DLPack knows), which mpi4py takes by
    DLPack without synchronising. Tests hand host tensors this way to cover it on CPU."""
    flat = _flat(tensor)
    return flat if carrier is flat.dtype else flat.view(carrier)


# Fresh host results from this size up are backed by transparent huge pages. New memory faults
# once per page on its first write, and 2 MiB pages fault 512 times less (benchmarks/local_steps.py).
# Recycled results gain too: peers read a result through process_vm_readv, which pins it page by
# page (measured: benchmarks/results/history/2026-12-03-shared-memory.md).
HUGE_PAGES_FROM = 4 << 20
_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # Linux <sys/mman.h>


@functools.cache
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def thp_mode() -> str | None:
    """Linux's transparent-huge-page mode (``always``, ``madvise`` or ``never``); ``None`` where
    it cannot be read (not Linux)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def huge_pages(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (fresh, not yet written host memory), with Linux asked to back the 2 MiB pages
    inside it by huge pages when it is at least ``HUGE_PAGES_FROM`` bytes. Where transparent huge
    pages are off the request changes nothing; the memory is valid either way."""
    nbytes = tensor.nbytes
    if nbytes < HUGE_PAGES_FROM:
        return tensor
    madvise = _madvise()
    if madvise is not None:
        address = tensor.data_ptr()
        start = -(-address // _HUGE_PAGE) * _HUGE_PAGE
        end = (address + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        if end > start:
            madvise(start, end - start, _MADV_HUGEPAGE)
    return tensor


# Host results of at least this many bytes come from recycled memory (_Recycler). glibc serves
# blocks above its mmap threshold (at most 32 MiB) as new memory, and trims the heap's top above
# twice that, so large blocks are often new memory: every first write faults and the kernel zeroes
# the page first, one more pass over the result than the collective itself makes. Smaller results
# glibc reuses itself about as fast (measured side by side, each result kept until the next call
# returns as a model keeps an activation: benchmarks/results/history/2026-12-03-shared-memory.md).
RECYCLE_FROM = 4 << 20
# Host results below this many bytes are plain torch.empty_like: neither recycled nor advised.
SMALL_RESULT = min(RECYCLE_FROM, HUGE_PAGES_FROM)
# Extra bytes of a recycled storage whose result starts at a 2 MiB boundary (_Recycler.tensor).
_ALIGN_PAD = _HUGE_PAGE - 64

_use_count = getattr(torch._C, "_storage_Use_Count", None)  # strong references to a storage


class _Recycler:
    """Process-wide memory for large host results: the storages of earlier results, taken back
    once nothing uses them.

    A result is an ordinary ``torch.empty`` tensor (resizable, pinnable, picklable: everything a
    fresh tensor allows, docs/contract.md "Results"). The recycler keeps a reference to its
    storage, and a later result of the same size reuses that storage only when the reference is
    the last one: no tensor, view or storage object of the user's still holds it, and its size is
    unchanged (a user may have resized it). So every result is fresh memory to its user (with
    huge pages, its storage is up to 2 MiB longer than the result, which starts at a 2 MiB
    boundary: ``storage_offset()`` > 0). At most
    ``per_size`` storages of one size and ``max_bytes`` in all are held (in use or not); the least
    recently reused sizes are let go first.
    """

    available = _use_count is not None  # whether results are recycled here
    per_size = 4
    max_bytes = 256 << 20

    def __init__(self) -> None:
        self._rings: dict[int, list] = {}  # by nbytes; least recently reused size first
        self._held = 0  # bytes of the storages in _rings
        self._lock = threading.Lock()  # threads share the rings
        self._refs = 0
        for storage in [torch.empty(1, dtype=torch.uint8).untyped_storage()]:
            self._refs = self._count(storage)  # a storage only the recycler holds, as _idle sees it
        self.reused = 0  # results served from a recycled storage so far (for tests)

    @staticmethod
    def _count(storage) -> int:
        return sys.getrefcount(storage)

    def _idle(self, storage, nbytes: int) -> bool:
        """Whether only the recycler holds ``storage`` (no tensor, view or storage object of a
        user's), still ``nbytes`` long (as it was made)."""
        return (
            _use_count(storage._cdata) == 1
            and sys.getrefcount(storage) <= self._refs
            and storage.nbytes() == nbytes
        )

    @property
    def free_bytes(self) -> int:
        """Bytes of held storages that no result uses now."""
        with self._lock:
            return sum(
                n for n, ring in self._rings.items() for storage in ring if self._idle(storage, n)
            )

    def tensor(self, nbytes: int, shape, dtype: torch.dtype, huge: bool) -> torch.Tensor:
        """A fresh contiguous tensor of ``shape`` and ``dtype`` (``nbytes`` bytes) in an idle
        held storage of its size, or else in new memory. With ``huge`` (from
        ``HUGE_PAGES_FROM`` bytes) the storage is ``_ALIGN_PAD`` bytes longer and the tensor
        starts at its first 2 MiB boundary, advised onto huge pages: torch's memory starts
        anywhere in a 2 MiB frame, and only whole aligned frames can be huge pages (a 4 MiB
        result would get one of its two)."""
        pad = _ALIGN_PAD if huge and nbytes >= HUGE_PAGES_FROM else 0
        size = nbytes + pad
        with self._lock:
            ring = self._rings.get(size)
            if ring is not None:
                for storage in ring:
                    if self._idle(storage, size):
                        self.reused += 1
                        self._rings[size] = self._rings.pop(size)  # most recently reused
                        return _at_boundary(storage, pad, shape, dtype)
        storage = torch.empty(size, dtype=torch.uint8).untyped_storage()
        out = _at_boundary(storage, pad, shape, dtype)
        if pad:
            huge_pages(out)
        self._hold(storage, size)
        return out

    def _hold(self, storage, nbytes: int) -> None:
        """Keep ``storage`` (a new result's) for reuse, letting go of what the bounds exclude:
        storages resized by their users, the oldest of this size, the least recently reused
        sizes."""
        if nbytes > self.max_bytes:
            return
        with self._lock:
            ring = [s for s in self._rings.pop(nbytes, ()) if s.nbytes() == nbytes]
            ring = ring[len(ring) - self.per_size + 1 :] if len(ring) >= self.per_size else ring
            ring.append(storage)
            self._rings[nbytes] = ring
            self._held = sum(n * len(r) for n, r in self._rings.items())
            while self._held > self.max_bytes:
                oldest = next(iter(self._rings))
                del self._rings[oldest][0]
                if not self._rings[oldest]:
                    del self._rings[oldest]
                self._held -= oldest

    def clear(self) -> None:
        """Let go of every held storage (the memory of those no result uses is freed)."""
        with self._lock:
            self._rings.clear()
            self._held = 0


def _at_boundary(storage, pad: int, shape, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous ``shape``/``dtype`` tensor in ``storage``: at its start, or with ``pad``, at
    its first 2 MiB boundary (within ``pad`` bytes of the start: torch aligns memory to 64)."""
    offset = -storage.data_ptr() % _HUGE_PAGE if pad else 0
    if offset > pad or offset % dtype.itemsize:
        offset = 0  # not where torch's alignment puts it: valid, only not aligned
    return torch.empty(0, dtype=dtype).set_(storage, offset // dtype.itemsize, shape)


recycler = _Recycler()


class ResultMemory:
    """Where a communicator's fresh host results come from: ``torch.empty`` for small ones;
    recycled storages from ``RECYCLE_FROM`` bytes when ``recycle`` (``MPICOMM_RECYCLE``); huge
    pages under large new memory when ``huge`` (``MPICOMM_HUGE_PAGES``)."""

    __slots__ = ("huge", "recycle")

    def __init__(self, huge: bool = True, recycle: bool = True) -> None:
        self.huge = huge
        self.recycle = recycle

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """A fresh contiguous host tensor of ``shape`` and ``dtype``, not yet written."""
        nbytes = math.prod(shape) * dtype.itemsize
        if self.recycle and recycler.available and nbytes >= RECYCLE_FROM:
            return recycler.tensor(nbytes, tuple(shape), dtype, self.huge)
        out = torch.empty(shape, dtype=dtype)
        return huge_pages(out) if self.huge else out

    def empty_like(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`empty` of a contiguous ``x``'s shape and dtype (small: ``torch.empty_like``,
        the cheapest allocation torch has)."""
        if x.numel() * x.itemsize < SMALL_RESULT:
            return torch.empty_like(x)
        return self.empty(x.shape, x.dtype)


def sync_device(device: torch.device) -> None:
    """Wait for the current stream of a CUDA ``device``; a no-op for CPU."""
    if device != _HOST and device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class Workspace:
    """Reusable memory: scratch space and (for CUDA without a CUDA-aware MPI) pinned host staging.

    Memory is kept per ``(slot, device)`` and grown on demand: after the first call of a given size
    no further allocation happens. ``allocations`` counts the real allocations (for tests).
    """

    def __init__(self) -> None:
        self._slots: dict[tuple[str, str], torch.Tensor] = {}
        self._streams: dict[tuple[str, str], torch.cuda.Stream] = {}
        self._views: dict[tuple, torch.Tensor] = {}
        self.allocations = 0

    def raw(
        self, slot: str, nbytes: int, device: torch.device, pinned: bool = False
    ) -> torch.Tensor:
        """A uint8 tensor of exactly ``nbytes`` on ``device``, backed by the slot's memory."""
        key = (slot, str(device))
        on_gpu = device.type == "cuda"
        if on_gpu:
            self._claim(key, device)
        held = self._slots.get(key)
        if held is None or held.numel() < nbytes:
            if on_gpu:
                # Queued kernels may still use the block being dropped, or the one the caching
                # allocator hands out next (freed in stream order); MPI would write it at once.
                sync_device(device)
            size = max(nbytes, 2 * held.numel() if held is not None else 0, 64)
            pin = pinned and device.type == "cpu" and torch.cuda.is_available()
            held = torch.empty(size, dtype=torch.uint8, device=device, pin_memory=pin)
            self._slots[key] = held
            self._views.clear()  # views of the old memory must not be handed out again
            self.allocations += 1
        return held[:nbytes]

    def _claim(self, key: tuple[str, str], device: torch.device) -> None:
        """Device slots are used by queued kernels (the rank-order sum) and written by MPI, which
        knows no streams: before a slot serves another stream than last time, wait for that one."""
        stream = torch.cuda.current_stream(device)
        last = self._streams.get(key)
        if last is not None and last != stream:
            last.synchronize()
        self._streams[key] = stream

    def tensor(
        self,
        slot: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        pinned: bool = False,
    ) -> torch.Tensor:
        """A contiguous tensor of ``shape`` and ``dtype`` living in the slot's memory.

        The same call again returns the same view (made once: slicing and viewing cost ~5 us).
        """
        key = (slot, device, shape, dtype)
        view = self._views.get(key)
        if view is None:
            numel = 1
            for n in shape:
                numel *= n
            view = self.raw(slot, numel * dtype.itemsize, device, pinned).view(dtype).view(shape)
            if len(self._views) >= _MAX_VIEWS:
                self._views.clear()
            self._views[key] = view
        elif device != _HOST and device.type == "cuda":
            self._claim((slot, str(device)), device)
        return view

    def reserve(
        self, nbytes: int, device: torch.device, pinned: bool, slots: tuple[str, ...]
    ) -> None:
        """Grow each of ``slots`` to at least ``nbytes`` now, so the first real call does not."""
        for slot in slots:
            self.raw(slot, nbytes, device, pinned)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() for t in self._slots.values())

    @property
    def held(self) -> dict[tuple[str, str], torch.Tensor]:
        """The memory held, by ``(slot, device)`` (a copy of the mapping, for inspection)."""
        return dict(self._slots)

    def clear(self) -> None:
        """Drop every slot, once the streams that used device slots have finished with them."""
        for stream in set(self._streams.values()):
            stream.synchronize()
        self._slots.clear()
        self._streams.clear()
        self._views.clear()


def byte_spec(tensor: torch.Tensor) -> Spec:
    """``[buffer, nbytes, MPI.BYTE]`` for a contiguous tensor of any dtype (point-to-point)."""
    nbytes = tensor.nbytes
    return _spec(tensor, (_memory(tensor, torch.uint8), nbytes, MPI.BYTE))


def vector_spec(tensor: torch.Tensor, counts: list[int]) -> Spec:
    """``[buffer, (counts, displacements), datatype]`` for the v-collectives, in elements."""
    displs = [0] * len(counts)
    for i in range(1, len(counts)):
        displs[i] = displs[i - 1] + counts[i - 1]
    info = DTYPES[tensor.dtype]
    return _spec(tensor, (_memory(tensor, info.carrier), (counts, displs), info.mpi))
