"""MoE managers behind :meth:`MPICommunicator.dispatch` and :meth:`~MPICommunicator.combine`.

Chosen by name (``all2all_backend``), as vLLM selects its all2all managers. A manager uses only its
communicator's public collectives.

Both names give vLLM's naive manager: ``dispatch`` all-gathers (variable rows per rank) the hidden
states, the router logits and any extra tensors so every rank sees every token; ``combine``
reduce-scatters the expert outputs back with the sizes of the last dispatch. They differ in the
top-k router :meth:`AllGatherReduceScatter.router` returns: ``allgather_reducescatter`` (default)
gives the router with the same scheme, ``sparse_alltoallv`` the router that sends only routed rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..validation import check_flag, check_sizes, check_tensor
from .routers import make_router

if TYPE_CHECKING:
    from ..communicator import MPICommunicator


class AllGatherReduceScatter:
    """Every token to every rank; expert outputs summed back to the token's owner."""

    def __init__(self, comm: MPICommunicator, name: str = "allgather_reducescatter") -> None:
        self.comm = comm
        self.name = name
        self.sizes: list[int] | None = None

    def dispatch(
        self,
        hidden_states: torch.Tensor,
        router_logits: torch.Tensor,
        is_sequence_parallel: bool = False,
        extra_tensors: list[torch.Tensor] | None = None,
        *,
        sizes: list[int] | None = None,
    ):
        """(tokens_r, ...) per rank -> (sum_r tokens_r, ...) on every rank, rank-major rows.

        In consistency mode the ranks also agree on the number of tensors and on each one's
        dtype and trailing shape (the fingerprint of the list that ``all_gatherv`` takes)."""
        self.comm.agree("dispatch")  # a destroyed communicator says so, naming dispatch
        check_flag(is_sequence_parallel, "is_sequence_parallel")
        if extra_tensors is not None and not isinstance(extra_tensors, list | tuple):
            raise TypeError(
                f"extra_tensors must be a list of tensors or None, got "
                f"{type(extra_tensors).__name__}"
            )
        tensors = [hidden_states, router_logits, *(extra_tensors or [])]
        names = ["hidden_states", "router_logits"]
        names += [f"extra_tensors[{i}]" for i in range(len(tensors) - 2)]
        for name, t in zip(names, tensors, strict=True):
            check_tensor(t, name)
            if t.dim() == 0 or t.shape[0] != hidden_states.shape[0]:
                raise ValueError(
                    f"{name} must have the {hidden_states.shape[0]} token rows of hidden_states, "
                    f"got shape {tuple(t.shape)}"
                )
        rows = hidden_states.shape[0]
        if sizes is None:
            sizes = self.comm.exchange_rows(rows)
        else:
            sizes = check_sizes(sizes, self.comm.world_size)
            if sizes[self.comm.rank] != rows:
                raise ValueError(
                    f"sizes[{self.comm.rank}]={sizes[self.comm.rank]} but hidden_states has "
                    f"{rows} rows"
                )
        gathered = self.comm.all_gatherv(tensors, 0, sizes)
        self.sizes = sizes
        if extra_tensors is not None:
            return gathered[0], gathered[1], gathered[2:]
        return gathered[0], gathered[1]

    def combine(self, hidden_states: torch.Tensor, is_sequence_parallel: bool = False):
        """(sum_r tokens_r, H) expert outputs -> this rank's (tokens_r, H), summed over ranks."""
        self.comm.agree("combine")  # after destroy(): "destroyed", not "before dispatch"
        check_flag(is_sequence_parallel, "is_sequence_parallel")
        if self.sizes is None:
            raise ValueError("combine() called before dispatch(): no token counts to return to")
        check_tensor(hidden_states, "hidden_states")
        rows = hidden_states.shape[0] if hidden_states.dim() else 1  # as reduce_scatterv counts
        if rows != sum(self.sizes):
            raise ValueError(
                f"hidden_states has {rows} rows, but the last dispatch returned "
                f"{sum(self.sizes)} (every rank's tokens): combine takes one row per dispatched row"
            )
        return self.comm.reduce_scatterv(hidden_states, 0, self.sizes)

    def router(self, num_experts: int):
        """The top-k router this manager's name selects (``ValueError`` if E % W != 0)."""
        return make_router(self.name, self.comm, num_experts)

    def get_handle(self, kwargs: dict):
        """vLLM's name for :meth:`router`: ``kwargs["num_experts"]`` experts."""
        return self.router(kwargs["num_experts"])

    def prepare(self, model: torch.nn.Module) -> None:
        """Nothing to size ahead for this manager."""

    def destroy(self) -> None:
        self.sizes = None


MANAGERS = ("allgather_reducescatter", "sparse_alltoallv")


def make_manager(name: str, comm: MPICommunicator) -> AllGatherReduceScatter:
    """The manager called ``name`` for ``comm``; ``ValueError`` listing the names for another."""
    if name not in MANAGERS:
        raise ValueError(f"all2all_backend must be one of {', '.join(MANAGERS)}, got {name!r}")
    return AllGatherReduceScatter(comm, name)
