"""Moving results into the caller's tensors, and the memory of point-to-point messages.

torch.distributed collectives write into the tensors their caller passed; the group's
:class:`mpicomm.MPICommunicator` writes into ``out=`` where the caller's tensors are one
contiguous memory (:func:`flat_view`, :func:`joined`); otherwise it returns fresh results, which
:func:`write_back` and :func:`split_into` copy into place. Point-to-point messages are the one
traffic the backend hands to MPI itself (the communicator has no non-blocking send): where MPI can
touch a tensor's memory directly (a contiguous host tensor, or a contiguous CUDA tensor with a
CUDA-aware MPI) it does; otherwise a host copy is sent, or received into and written back (the
staging rule of docs/architecture.md: :meth:`mpicomm.staging.Route.needs_staging`).
"""

from __future__ import annotations

import torch

from ..buffers import sync_device
from ..staging import Route, readable

_HOST = torch.device("cpu")


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` without autograd (collectives are not recorded): itself when it needs none."""
    return tensor.detach() if tensor.requires_grad else tensor


def direct(tensor: torch.Tensor, cuda_aware: bool) -> bool:
    """Whether MPI may use ``tensor``'s own memory (contiguous, not lazily negated or
    conjugated, and not staged)."""
    return (
        tensor.is_contiguous()
        and not tensor.is_neg()
        and not tensor.is_conj()
        and not Route.needs_staging(tensor.device, cuda_aware, False)
    )


def send_buffer(tensor: torch.Tensor, cuda_aware: bool) -> torch.Tensor:
    """``tensor`` (detached) if MPI can read it in place, else a contiguous host copy."""
    tensor = tensor.detach()
    if direct(tensor, cuda_aware):
        if tensor.device != _HOST:
            sync_device(tensor.device)
        return tensor
    return readable(tensor).to(_HOST).contiguous()


def receive_buffer(tensor: torch.Tensor, cuda_aware: bool) -> torch.Tensor:
    """Memory MPI may write a message for ``tensor`` into: the tensor itself where direct, else
    an empty host tensor of its shape and dtype (hand it to :func:`write_back`)."""
    tensor = tensor.detach()
    if direct(tensor, cuda_aware):
        if tensor.device != _HOST:
            sync_device(tensor.device)
        return tensor
    return torch.empty(tensor.shape, dtype=tensor.dtype, device=_HOST)


def write_back(tensor: torch.Tensor, result: torch.Tensor) -> None:
    """Copy ``result`` into ``tensor`` (same number of elements) unless it is that memory."""
    target = plain(tensor)
    if result.data_ptr() == target.data_ptr() and result.device == target.device:
        return
    target.copy_(result if result.shape == target.shape else result.reshape(target.shape))


def flat(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as one dimension (itself when it has one), without autograd."""
    tensor = plain(tensor)
    return tensor if tensor.dim() == 1 else tensor.reshape(-1)


def flat_view(tensor: torch.Tensor) -> torch.Tensor | None:
    """``tensor`` as one dimension sharing its memory (itself when it has one), without
    autograd; ``None`` when it is not contiguous (no such view exists)."""
    tensor = plain(tensor)
    if not tensor.is_contiguous():
        return None
    return tensor if tensor.dim() == 1 else tensor.view(-1)


def joined(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """One flat tensor over the memory of ``tensors`` when they are contiguous, of one dtype, with
    no lazy conj/neg bit, and lie back to back inside the first one's storage (the chunks of one
    buffer, ``list(buf.chunk(W))``): writing it writes them. ``None`` otherwise."""
    first = plain(tensors[0])
    dtype, at, total = first.dtype, first.data_ptr(), 0
    for t in tensors:
        if t.dtype != dtype or t.data_ptr() != at or not t.is_contiguous():
            return None
        if t.is_neg() or t.is_conj():
            return None
        n = t.numel()
        at += n * t.element_size()
        total += n
    if _is_exactly(first._base, first, total):
        return first._base  # the buffer they were chunked from: no view to make
    try:
        return first.as_strided((total,), (1,))  # raises past the first one's storage
    except RuntimeError:
        return None


def _is_exactly(base: torch.Tensor | None, first: torch.Tensor, total: int) -> bool:
    """Whether ``base`` is a plain 1-d tensor of ``first``'s dtype holding exactly the ``total``
    elements from ``first`` on (cheaper to ask than making a view over them)."""
    return (
        base is not None
        and base.dim() == 1
        and base.dtype == first.dtype
        and base.data_ptr() == first.data_ptr()
        and base.numel() == total
        and base.is_contiguous()
        and not (base.requires_grad or base.is_neg() or base.is_conj())
    )


def flat_cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors flattened and concatenated, in order, into one fresh 1-d tensor."""
    return torch.cat([plain(t).reshape(-1) for t in tensors])


def split_into(buf: torch.Tensor, outputs: list[torch.Tensor]) -> None:
    """Copy consecutive pieces of the flat ``buf`` into ``outputs`` (in place, in order)."""
    shapes = {o.shape for o in outputs}
    if len(shapes) == 1:  # one shape: the pieces are the rows of one view
        pieces = buf.view(len(outputs), *shapes.pop()).unbind(0)
    else:
        flat_pieces = buf.split([o.numel() for o in outputs])
        pieces = [p.view(o.shape) for p, o in zip(flat_pieces, outputs, strict=True)]
    torch._foreach_copy_([plain(o) for o in outputs], pieces)
