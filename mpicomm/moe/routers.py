"""Expert-parallel routing: tokens go to the ranks that hold their top-k experts, and come back.

Rank r of a group of W ranks owns experts ``[r * E/W, (r+1) * E/W)``. Both routers here share one
API (:class:`ExpertRouter` is the one ``MPICommunicator.expert_router`` returns)::

    recv = router.dispatch(hidden_states, topk_ids, topk_weights)
    # recv.hidden_states (M, H): one row per (token, expert) pair routed to this rank
    # recv.expert_ids (M,): the pair's local expert index in [0, E/W), rows sorted by it per source
    out = router.combine(expert_output)  # (n_tokens, H) back on the token's owner

``out[t] = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(hidden_states[t])``, accumulated in
float32 (float64 for float64) and rounded once to ``expert_output``'s dtype.

``sparse_alltoallv`` (:class:`ExpertRouter`)
    A token's row crosses to each rank holding one of its experts once, with a row index and
    weight per (token, expert) pair; the receiver expands the rows to one per pair, so every row
    it returns is one expert input. Per-(rank, expert) pair counts and per-rank row counts travel
    on the cpu communicator (``Alltoall`` of int64); rows, indices and weights on the device
    communicator (``Alltoallv``; 16-bit floats as their raw bytes). ``combine`` sends back, per
    link, the fewer bytes of: one output per pair, or the expert rank's weighted sum per token in
    the accumulation dtype; the owner adds the links in rank order. Bytes moved scale with
    n_tokens * ranks reached (plus k small entries).
``allgather_reducescatter`` (:class:`GatheredRouter`)
    vLLM's naive scheme through the communicator's ``all_gatherv`` / ``reduce_scatterv``: every
    token (with its top-k) reaches every rank, each rank applies its experts, and the float32
    partial sums are reduce-scattered back. Bytes moved scale with n_tokens * W.

``router.last_bytes`` holds the payload bytes this rank handed to other ranks in the last
``dispatch`` and ``combine`` (rows a rank keeps for itself are not counted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..consistency import fingerprint
from ..dtypes import DTYPES
from ..validation import check_device, check_tensor

if TYPE_CHECKING:
    from ..communicator import MPICommunicator

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTS = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


@dataclass(frozen=True)
class Dispatched:
    """What :meth:`dispatch` delivers to this rank.

    ``hidden_states``: (M, H) rows, input dtype, on the input's device. ``expert_ids``: (M,) int64
    local expert index. ``tokens_per_expert``: (E/W,) int64, rows per local expert.
    """

    hidden_states: torch.Tensor
    expert_ids: torch.Tensor
    tokens_per_expert: torch.Tensor


def _accumulate(dtype: torch.dtype) -> torch.dtype:
    return DTYPES[dtype].accumulate


class _RouterBase:
    """Argument checks and the state a combine needs from its dispatch."""

    name = ""

    def __init__(self, comm: MPICommunicator, num_experts: int) -> None:
        if isinstance(num_experts, bool) or not isinstance(num_experts, int):
            raise TypeError(f"num_experts must be an int, got {type(num_experts).__name__}")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if num_experts % comm.world_size:
            raise ValueError(
                f"num_experts={num_experts} is not divisible by the group size "
                f"{comm.world_size}: every rank must own the same number of experts"
            )
        self.comm = comm
        self.num_experts = num_experts
        self.local_experts = num_experts // comm.world_size
        self.first_expert = comm.rank * self.local_experts
        self.last_bytes = {"dispatch": 0, "combine": 0}
        self._pending: dict | None = None

    def _check_dispatch(self, hidden_states, topk_ids, topk_weights) -> None:
        check_tensor(hidden_states, "hidden_states")
        check_tensor(topk_ids, "topk_ids")
        check_tensor(topk_weights, "topk_weights")
        if hidden_states.dim() != 2:
            raise ValueError(
                f"hidden_states must be (n_tokens, hidden), got shape {tuple(hidden_states.shape)}"
            )
        if topk_ids.dtype not in _INTS:
            raise TypeError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
        if topk_weights.dtype not in FLOATS:
            raise TypeError(f"topk_weights must be a float tensor, got {topk_weights.dtype}")
        n = hidden_states.shape[0]
        if topk_ids.dim() != 2 or topk_ids.shape[0] != n or topk_ids.shape[1] < 1:
            raise ValueError(
                f"topk_ids must be (n_tokens={n}, k>=1), got shape {tuple(topk_ids.shape)}"
            )
        if topk_weights.shape != topk_ids.shape:
            raise ValueError(
                f"topk_weights must have the shape of topk_ids {tuple(topk_ids.shape)}, got "
                f"{tuple(topk_weights.shape)}"
            )
        for name, t in (("hidden_states", hidden_states), ("topk_ids", topk_ids)):
            check_device(t, self.comm.device, name)
        check_device(topk_weights, self.comm.device, "topk_weights")
        if topk_ids.numel():
            low, high = int(topk_ids.min()), int(topk_ids.max())
            if low < 0 or high >= self.num_experts:
                raise ValueError(
                    f"topk_ids must lie in [0, num_experts={self.num_experts}), got values in "
                    f"[{low}, {high}]"
                )
        self.comm.agree(
            "expert_dispatch",
            lambda: fingerprint("dispatch", hidden_states, 0, [self.num_experts], rows_vary=True),
        )

    def _check_combine(self, expert_output) -> dict:
        pending = self._pending
        if pending is None:
            raise ValueError("combine() called before dispatch(): no routing to send back")
        check_tensor(expert_output, "expert_output")
        if expert_output.dtype not in FLOATS:
            raise TypeError(f"expert_output must be a float tensor, got {expert_output.dtype}")
        rows = pending["rows"]
        if expert_output.dim() != 2 or expert_output.shape[0] != rows:
            raise ValueError(
                f"expert_output must be (M={rows}, hidden) for the {rows} rows of the last "
                f"dispatch, got shape {tuple(expert_output.shape)}"
            )
        check_device(expert_output, self.comm.device, "expert_output")
        self.comm.agree(
            "expert_combine",
            lambda: fingerprint("combine", expert_output, 0, rows_vary=True),
        )
        return pending

    @staticmethod
    def _weighted_sum(rows, tokens, weights, n_tokens, device) -> torch.Tensor:
        """(n_tokens, H) in the accumulate dtype: ``sum weights[i] * rows[i]`` into ``tokens[i]``."""
        out = torch.zeros((n_tokens, rows.shape[1]), dtype=_accumulate(rows.dtype), device=device)
        return _add_weighted(out, tokens, rows, weights)


class ExpertRouter(_RouterBase):
    """Sparse routing on ``MPI_Alltoallv``: only the rows a rank's experts need reach it."""

    name = "sparse_alltoallv"

    def dispatch(self, hidden_states, topk_ids, topk_weights) -> Dispatched:
        """Send each token's row once to every rank holding one of its experts; that rank
        expands it to one row per (token, expert) pair. Collective over the group.

        ``hidden_states`` (n, H) any dtype mpicomm moves; ``topk_ids`` (n, k) integer in [0, E);
        ``topk_weights`` (n, k) float. ``n`` may differ between ranks (and be 0).
        """
        self._check_dispatch(hidden_states, topk_ids, topk_weights)
        comm, world, device = self.comm, self.comm.world_size, hidden_states.device
        n, k = topk_ids.shape
        ids = topk_ids.reshape(-1).to(device=device, dtype=torch.int64)
        order = torch.argsort(ids, stable=True)  # pairs by expert, hence by destination rank
        pair_tokens = order // k
        pair_dest = ids[order] // self.local_experts
        # One row per (destination, token), destination-major; each pair points at its row.
        span = max(n, 1)
        unique, pair_row = torch.unique(
            pair_dest * span + pair_tokens, sorted=True, return_inverse=True
        )
        row_tokens = unique % span
        rows_to = torch.bincount(unique // span, minlength=world)
        pair_row -= (torch.cumsum(rows_to, 0) - rows_to)[pair_dest]  # index within the block

        per_expert = torch.bincount(ids, minlength=self.num_experts).reshape(world, -1)
        counts = torch.cat([per_expert, rows_to.unsqueeze(1)], 1).cpu().numpy()
        incoming = comm.exchange_counts(counts)  # (W, E/W + 1): pairs per local expert, then rows
        send_pairs = counts[:, :-1].sum(1).tolist()
        recv_pairs = incoming[:, :-1].sum(1).tolist()
        send_rows, recv_rows = counts[:, -1].tolist(), incoming[:, -1].tolist()

        hidden = hidden_states.shape[1]
        rows = comm.all_to_allv(hidden_states.index_select(0, row_tokens), send_rows, recv_rows)
        pair_weights = topk_weights.reshape(-1).to(device)[order]
        # Each pair's row index and weight (float64 bits: exact for every float weight dtype).
        meta = torch.stack([pair_row, pair_weights.to(torch.float64).view(torch.int64)], 1)
        meta = comm.all_to_allv(meta, send_pairs, recv_pairs)
        where = meta[:, 0]
        # Rows from source s start at the sum of the earlier sources' rows.
        recv_rows_t = torch.tensor(recv_rows, dtype=torch.int64, device=device)
        recv_pairs_t = torch.tensor(recv_pairs, dtype=torch.int64, device=device)
        starts = torch.cumsum(recv_rows_t, 0) - recv_rows_t
        received = rows.index_select(0, where + starts.repeat_interleave(recv_pairs_t))

        per_local = torch.from_numpy(incoming[:, :-1].copy())
        local = torch.arange(self.local_experts).repeat(world)
        expert_ids = torch.repeat_interleave(local, per_local.reshape(-1)).to(device)
        remote_rows = sum(send_rows) - send_rows[comm.rank]
        remote_pairs = sum(send_pairs) - send_pairs[comm.rank]
        self.last_bytes = {
            "dispatch": remote_rows * hidden * hidden_states.element_size() + remote_pairs * 16,
            "combine": 0,
        }
        self._pending = {
            "rows": received.shape[0],
            "n_tokens": n,
            # as the token owner: what went to each rank
            "send_pairs": send_pairs,
            "send_rows": send_rows,
            "pair_tokens": pair_tokens,
            "pair_weights": pair_weights,
            "row_tokens": row_tokens,
            # as the expert rank: what came from each rank
            "recv_pairs": recv_pairs,
            "recv_rows": recv_rows,
            "where": where,
            "recv_weights": meta[:, 1].contiguous().view(torch.float64),
        }
        return Dispatched(received, expert_ids, per_local.sum(0).to(device))

    def combine(self, expert_output: torch.Tensor) -> torch.Tensor:
        """(M, H) expert outputs for the last dispatch's rows -> (n_tokens, H) on the owner.

        Collective over the group. Result: ``expert_output``'s dtype, on its device. Each link
        (expert rank -> owner) carries whichever is smaller: the per-pair outputs, weighted and
        summed by the owner, or the expert rank's weighted per-token sums in the accumulation
        dtype. Both ends decide alike from the counts of the last dispatch.
        """
        pending = self._check_combine(expert_output)
        comm, world, device = self.comm, self.comm.world_size, expert_output.device
        hidden, dtype = expert_output.shape[1], expert_output.dtype
        acc = _accumulate(dtype)
        x = expert_output.detach().contiguous()  # summed where it lives; staged once packed
        weights, where = pending["recv_weights"], pending["where"]
        blocks, first = [], 0
        for owner in range(world):
            pairs, rows = pending["recv_pairs"][owner], pending["recv_rows"][owner]
            block = x[first : first + pairs]
            if _summed_link(rows, pairs, acc, dtype):
                part = torch.zeros((rows, hidden), dtype=acc, device=device)
                span = slice(first, first + pairs)
                block = _add_weighted(part, where[span], block, weights[span])
            blocks.append(block.reshape(-1).view(torch.uint8))
            first += pairs
        sent = [b.numel() for b in blocks]
        links = list(zip(pending["send_pairs"], pending["send_rows"], strict=True))
        summed = [_summed_link(rows, pairs, acc, dtype) for pairs, rows in links]
        expect = [
            hidden * (rows * acc.itemsize if summed_link else pairs * dtype.itemsize)
            for (pairs, rows), summed_link in zip(links, summed, strict=True)
        ]
        back = comm.all_to_allv(torch.cat(blocks), sent, expect)
        self.last_bytes["combine"] = sum(sent) - sent[comm.rank]

        out = torch.zeros((pending["n_tokens"], hidden), dtype=acc, device=device)
        offset = first_pair = first_row = 0
        for rank in range(world):  # rank order: the sum is the same on every run
            pairs, rows = links[rank]
            chunk = back[offset : offset + expect[rank]]
            if offset % acc.itemsize:
                chunk = chunk.clone()  # views to wider dtypes need aligned memory
            if summed[rank]:
                tokens = pending["row_tokens"][first_row : first_row + rows]
                out.index_add_(0, tokens, chunk.view(acc).view(rows, hidden))
            else:
                span = slice(first_pair, first_pair + pairs)
                outputs = chunk.view(dtype).view(pairs, hidden)
                _add_weighted(
                    out, pending["pair_tokens"][span], outputs, pending["pair_weights"][span]
                )
            offset += expect[rank]
            first_pair += pairs
            first_row += rows
        return out.to(dtype)


def _add_weighted(out: torch.Tensor, index: torch.Tensor, rows: torch.Tensor, weights):
    """``out[index[i]] += weights[i] * rows[i]`` in ``out``'s (accumulation) dtype; returns ``out``.

    bf16/fp16 rows times float32 weights promote to float32 inside the one multiply.
    """
    return out.index_add_(0, index, rows * weights.to(out.dtype).unsqueeze(1))


def _summed_link(rows: int, pairs: int, acc: torch.dtype, dtype: torch.dtype) -> bool:
    """Whether a combine link carries per-token sums (``rows`` of ``acc``) rather than per-pair
    outputs (``pairs`` of ``dtype``): the fewer bytes; ties go to the per-pair outputs."""
    return rows * acc.itemsize < pairs * dtype.itemsize


class GatheredRouter(_RouterBase):
    """vLLM's naive scheme behind the router API: all-gather everything, reduce-scatter back."""

    name = "allgather_reducescatter"

    def dispatch(self, hidden_states, topk_ids, topk_weights) -> Dispatched:
        """Every rank's tokens to every rank; keep the pairs routed to this rank's experts."""
        self._check_dispatch(hidden_states, topk_ids, topk_weights)
        comm, device = self.comm, hidden_states.device
        n, k = topk_ids.shape
        sizes = comm.exchange_rows(n)
        ids = topk_ids.to(device=device, dtype=torch.int64)
        weights = topk_weights.to(device=device, dtype=_accumulate(hidden_states.dtype))
        every, all_ids, all_weights = comm.all_gatherv([hidden_states, ids, weights], 0, sizes)
        flat = all_ids.reshape(-1) - self.first_expert
        mine = torch.nonzero((flat >= 0) & (flat < self.local_experts)).reshape(-1)
        mine = mine[torch.argsort(flat[mine], stable=True)]
        tokens = mine // k
        expert_ids = flat[mine]
        row = hidden_states.shape[1] * hidden_states.element_size() + k * (8 + weights.itemsize)
        self.last_bytes = {"dispatch": n * row * (comm.world_size - 1), "combine": 0}
        self._pending = {
            "rows": mine.numel(),
            "sizes": sizes,
            "tokens": tokens,
            "weights": all_weights.reshape(-1)[mine],
            "n_tokens": every.shape[0],
        }
        per_local = torch.bincount(expert_ids, minlength=self.local_experts)
        return Dispatched(every.index_select(0, tokens), expert_ids, per_local)

    def combine(self, expert_output: torch.Tensor) -> torch.Tensor:
        """Weighted partial sums of every token (float32) reduce-scattered to the owners."""
        pending = self._check_combine(expert_output)
        comm, device = self.comm, expert_output.device
        partial = self._weighted_sum(
            expert_output, pending["tokens"], pending["weights"], pending["n_tokens"], device
        )
        sizes = pending["sizes"]
        others = pending["n_tokens"] - sizes[comm.rank]
        self.last_bytes["combine"] = others * partial.shape[1] * partial.element_size()
        return comm.reduce_scatterv(partial, 0, sizes).to(expert_output.dtype)


ROUTERS = {ExpertRouter.name: ExpertRouter, GatheredRouter.name: GatheredRouter}


def make_router(name: str, comm: MPICommunicator, num_experts: int):
    """The router called ``name`` (see :data:`ROUTERS`) for ``comm``'s group."""
    try:
        cls = ROUTERS[name]
    except KeyError:
        raise ValueError(f"backend must be one of {', '.join(ROUTERS)}, got {name!r}") from None
    return cls(comm, num_experts)
