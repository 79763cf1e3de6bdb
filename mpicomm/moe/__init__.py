"""MoE on top of the communicator: the managers behind ``dispatch``/``combine`` and the top-k
expert routers. Both use only the communicator's public collectives (docs/architecture.md)."""

from .managers import MANAGERS, AllGatherReduceScatter, make_manager
from .routers import ROUTERS, Dispatched, ExpertRouter, GatheredRouter, make_router

__all__ = [
    "MANAGERS",
    "ROUTERS",
    "AllGatherReduceScatter",
    "Dispatched",
    "ExpertRouter",
    "GatheredRouter",
    "make_manager",
    "make_router",
]
