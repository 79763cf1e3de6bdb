"""The memory MPI reads and writes for the torch.distributed backend's in-place collectives.

torch.distributed collectives write into the caller's tensors. Where MPI can touch a tensor's
memory directly (a contiguous host tensor, or a contiguous CUDA tensor with a CUDA-aware MPI) it
does; otherwise the call goes through a host copy that is written back afterwards (the staging
rule of docs/architecture.md, "Who owns which decision": :meth:`mpicomm.staging.Route.needs_staging`).
"""

from __future__ import annotations

import torch

from ..buffers import sync_device
from ..staging import Route

_HOST = torch.device("cpu")


def direct(tensor: torch.Tensor, cuda_aware: bool) -> bool:
    """Whether MPI may use ``tensor``'s own memory (contiguous and not staged)."""
    return tensor.is_contiguous() and not Route.needs_staging(tensor.device, cuda_aware, False)


def readable(tensor: torch.Tensor, cuda_aware: bool) -> torch.Tensor:
    """``tensor`` (detached) if MPI can read it in place, else a contiguous host copy."""
    tensor = tensor.detach()
    if direct(tensor, cuda_aware):
        if tensor.device != _HOST:
            sync_device(tensor.device)
        return tensor
    return tensor.to(_HOST).contiguous()


def writable(tensor: torch.Tensor, cuda_aware: bool) -> torch.Tensor:
    """Memory MPI may write the result for ``tensor`` into: the tensor itself where direct, else
    an empty host tensor of its shape and dtype (hand it to :func:`write_back`)."""
    tensor = tensor.detach()
    if direct(tensor, cuda_aware):
        if tensor.device != _HOST:
            sync_device(tensor.device)
        return tensor
    return torch.empty(tensor.shape, dtype=tensor.dtype, device=_HOST)


def write_back(tensor: torch.Tensor, result: torch.Tensor) -> None:
    """Copy ``result`` into ``tensor`` (same number of elements) unless it is that memory."""
    target = tensor.detach()
    if result.data_ptr() == target.data_ptr() and result.device == target.device:
        return
    target.copy_(result.reshape(target.shape))


def host_stack(tensors: list[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """The tensors flattened and concatenated into one contiguous host tensor (dim 0 = rank)."""
    dtype = dtype or tensors[0].dtype
    flat = [t.detach().reshape(-1).to(_HOST, dtype) for t in tensors]
    return torch.cat(flat) if flat else torch.empty(0, dtype=dtype)


def split_into(buf: torch.Tensor, outputs: list[torch.Tensor]) -> None:
    """Copy consecutive pieces of the flat ``buf`` into ``outputs`` (in place, in order)."""
    offset = 0
    for out in outputs:
        n = out.numel()
        out.detach().copy_(buf[offset : offset + n].reshape(out.shape))
        offset += n
