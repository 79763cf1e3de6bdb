"""A minimal stand-in for ``mpicomm.MPICommunicator``, used only while the core is absent.

It implements the CONTRACT.md methods the benchmark calls, directly on mpi4py, including the
"bytes" all-reduce (all-to-all of raw bytes, torch sum in rank order, all-gather). The harness
marks every figure taken with it as ``standin`` in the JSON: they are not mpicomm's numbers.
"""

from __future__ import annotations

import math
import os

import torch
from mpi4py import MPI

_MPI = {
    torch.float32: MPI.FLOAT,
    torch.float64: MPI.DOUBLE,
    torch.int32: MPI.INT32_T,
    torch.int64: MPI.INT64_T,
    torch.int8: MPI.INT8_T,
    torch.uint8: MPI.UINT8_T,
    torch.int16: MPI.INT16_T,
}
_CARRIER = {torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _spec(t: torch.Tensor) -> list:
    flat = t.reshape(-1)
    flat = flat.view(_CARRIER.get(t.dtype, t.dtype))
    return [flat.numpy(), _MPI[flat.dtype]]


class StandinCommunicator:
    """CPU-only stand-in with the public method names of ``MPICommunicator``."""

    def __init__(self, cpu_group=None, device=None, device_group=None, unique_name=""):
        self.cpu_group = cpu_group or MPI.COMM_WORLD
        self.device_group = self.cpu_group.Dup()
        self.rank = self.rank_in_group = self.cpu_group.rank
        self.world_size = self.cpu_group.size
        self.allreduce_algo = os.environ.get("MPICOMM_ALLREDUCE_ALGO", "auto")
        self._sizes = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        algo = self.allreduce_algo
        if x.dtype in _CARRIER or algo == "bytes" or (algo == "auto" and x.nbytes >= 1 << 20):
            return self._bytes_all_reduce(x)
        out = torch.empty_like(x)
        self.device_group.Allreduce(_spec(x), _spec(out), MPI.SUM)
        return out

    def _bytes_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        n = self.world_size
        flat = x.reshape(-1)
        chunk = -(-flat.numel() // n)
        padded = torch.zeros(chunk * n, dtype=x.dtype)
        padded[: flat.numel()] = flat
        parts = torch.empty_like(padded)
        self.device_group.Alltoall(_spec(padded), _spec(parts))
        acc = torch.float32 if x.dtype in _CARRIER else x.dtype
        mine = parts.view(n, chunk)[0].to(acc)
        for r in range(1, n):
            mine += parts.view(n, chunk)[r]
        mine = mine.to(x.dtype)
        out = torch.empty_like(padded)
        self.device_group.Allgather(_spec(mine), _spec(out))
        return out[: flat.numel()].view(x.shape)

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        out = torch.empty((self.world_size * x.shape[0], *x.shape[1:]), dtype=x.dtype)
        self.device_group.Allgather(_spec(x.contiguous()), _spec(out))
        return out

    def all_gatherv(self, x: torch.Tensor, dim: int = 0, sizes=None) -> torch.Tensor:
        row = math.prod(x.shape[1:])
        counts = [s * row for s in sizes]
        out = torch.empty((sum(sizes), *x.shape[1:]), dtype=x.dtype)
        buf, dt = _spec(out)
        self.device_group.Allgatherv(_spec(x.contiguous()), [buf, counts, dt])
        return out

    def reduce_scatter(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        n = self.world_size
        return self.reduce_scatterv(x, dim, [x.shape[0] // n] * n)

    def reduce_scatterv(self, x: torch.Tensor, dim: int = -1, sizes=None) -> torch.Tensor:
        row = math.prod(x.shape[1:])
        out = torch.empty((sizes[self.rank], *x.shape[1:]), dtype=x.dtype)
        if x.dtype in _CARRIER:
            full = self._bytes_all_reduce(x)
            start = sum(sizes[: self.rank])
            return full[start : start + sizes[self.rank]].clone()
        self.device_group.Reduce_scatter(
            _spec(x.contiguous()), _spec(out), [s * row for s in sizes], MPI.SUM
        )
        return out

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        out = x.clone() if self.rank == src else torch.empty_like(x)
        self.device_group.Bcast(_spec(out), root=src)
        return out

    def send(self, x: torch.Tensor, dst: int | None = None) -> None:
        self.device_group.Send(_spec(x.contiguous()), dest=dst)

    def recv(self, size, dtype, src: int | None = None) -> torch.Tensor:
        out = torch.empty(size, dtype=dtype)
        self.device_group.Recv(_spec(out), source=src)
        return out

    def dispatch(
        self, hidden_states, router_logits, is_sequence_parallel=False, extra_tensors=None
    ):
        sizes = self.cpu_group.allgather(hidden_states.shape[0])
        self._sizes = sizes
        return (
            self.all_gatherv(hidden_states, 0, sizes),
            self.all_gatherv(router_logits, 0, sizes),
        )

    def combine(self, hidden_states, is_sequence_parallel=False):
        return self.reduce_scatterv(hidden_states, 0, self._sizes)

    def destroy(self) -> None:
        self.device_group.Free()
