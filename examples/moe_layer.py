"""A mixture-of-experts layer run expert-parallel with mpicomm, checked against one process.

    timeout 120 mpiexec -n 4 python examples/moe_layer.py [--backend NAME] [--dtype float32]

The layer: a router linear, softmax, top-k (weights renormalised), and ``num_experts`` small MLPs
(``silu(x @ w1[e]) @ w2[e]``). Every rank builds the same layer from one seed and owns experts
``[r*E/W, (r+1)*E/W)``. Two expert-parallel forwards, one per all2all backend:

* ``sparse_alltoallv``: route locally, ``router.dispatch`` sends each token only to the ranks of
  its top-k experts, each rank runs its experts, ``router.combine`` returns the weighted sums.
* ``allgather_reducescatter``: vLLM's naive path, ``comm.dispatch(x, router_logits)`` gathers
  every token everywhere, each rank adds its experts' weighted outputs (float32) for all tokens,
  ``comm.combine`` reduce-scatters them back to the owners.

Each rank compares its output with the single-process layer on its own tokens (float32: 1e-5;
bfloat16: bf16 tolerance). One rank has no tokens and the last expert is never chosen (its router
bias is -1e4). Prints ``MOE LAYER OK`` per rank; any mismatch aborts the job.
"""

from __future__ import annotations

import argparse
import sys
import traceback

import torch
import torch.nn.functional as F
from mpi4py import MPI

import mpicomm

TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 2e-2)}


class MoELayer(torch.nn.Module):
    """Router + top-k + ``num_experts`` MLPs; ``forward`` is the single-process reference."""

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.top_k = top_k
        self.gate = torch.nn.Linear(hidden, num_experts)
        with torch.no_grad():
            self.gate.weight.copy_(torch.randn(num_experts, hidden, generator=g) / hidden**0.5)
            self.gate.bias.zero_()
            self.gate.bias[-1] = -1e4  # the last expert is never chosen
        self.w1 = torch.nn.Parameter(torch.randn(num_experts, hidden, ffn, generator=g) / 4)
        self.w2 = torch.nn.Parameter(torch.randn(num_experts, ffn, hidden, generator=g) / 8)

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, E) logits -> (n, k) float32 weights (renormalised softmax) and int64 expert ids."""
        probs = torch.softmax(logits.float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        return weights / weights.sum(-1, keepdim=True), ids

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on rows ``x`` (n, H) -> (n, H) in x's dtype."""
        return F.silu(x @ self.w1[e].to(x.dtype)) @ self.w2[e].to(x.dtype)

    def weighted_experts(self, x, weights, ids, experts) -> torch.Tensor:
        """float32 (n, H): sum over the top-k slots whose expert is in ``experts``."""
        out = torch.zeros(x.shape, dtype=torch.float32)
        for e in experts:
            rows, slots = torch.nonzero(ids == e, as_tuple=True)
            if rows.numel():
                y = self.expert(e, x[rows]).float() * weights[rows, slots, None]
                out.index_add_(0, rows, y)
        return out

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(self.gate(x.float()))
        return self.weighted_experts(x, weights, ids, range(self.num_experts)).to(x.dtype)


@torch.no_grad()
def forward_expert_parallel(layer: MoELayer, x: torch.Tensor, comm) -> torch.Tensor:
    """The layer with experts split over ``comm``'s ranks, through its all2all backend."""
    per_rank = layer.num_experts // comm.world_size
    mine = range(comm.rank * per_rank, (comm.rank + 1) * per_rank)
    logits = layer.gate(x.float())
    if comm.all2all_manager.name == "sparse_alltoallv":
        weights, ids = layer.route(logits)
        router = comm.expert_router(layer.num_experts)
        recv = router.dispatch(x, ids, weights)
        y = torch.empty_like(recv.hidden_states)
        for local, e in enumerate(mine):
            rows = recv.expert_ids == local
            if rows.any():
                y[rows] = layer.expert(e, recv.hidden_states[rows])
        return router.combine(y)
    every_x, every_logits = comm.dispatch(x, logits)
    weights, ids = layer.route(every_logits)
    partial = layer.weighted_experts(every_x, weights, ids, mine)
    return comm.combine(partial).to(x.dtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["sparse_alltoallv", "allgather_reducescatter"])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, default=12, help="max tokens per rank")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    world, rank = MPI.COMM_WORLD.Get_size(), MPI.COMM_WORLD.Get_rank()
    layer = MoELayer(hidden=32, ffn=48, num_experts=12, top_k=2)
    backends = [args.backend] if args.backend else ["sparse_alltoallv", "allgather_reducescatter"]
    dtypes = [getattr(torch, args.dtype)] if args.dtype else [torch.float32, torch.bfloat16]
    for backend in backends:
        comm = mpicomm.MPICommunicator(all2all_backend=backend, timeout=60)
        for dtype in dtypes:
            g = torch.Generator().manual_seed(1000 + rank)
            n = int(torch.randint(1, args.tokens, (1,), generator=g))
            n = 0 if rank == world - 1 and world > 1 else n  # a rank without tokens
            x = torch.randn(n, 32, generator=g).to(dtype)
            got = forward_expert_parallel(layer, x, comm)
            want = layer(x)
            rtol, atol = TOLERANCE[dtype]
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
            ids = layer.route(layer.gate(x.float()))[1].reshape(-1)
            used = comm.all_reduce(torch.bincount(ids, minlength=layer.num_experts))
            assert int(used[-1]) == 0 and int(used.sum()) > 0, used
            diff = (got.float() - want.float()).abs()
            print(
                f"MOE LAYER OK rank {rank}/{world} {backend} {str(dtype)[6:]}: {n} tokens, "
                f"max |diff| {float(diff.max()) if n else 0.0:.2e}",
                flush=True,
            )
        comm.destroy()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)
