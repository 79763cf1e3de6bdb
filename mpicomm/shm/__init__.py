"""Intra-node shared-memory collectives (docs/shm.md): a compiled core (``_core``, optional) and
the per-communicator transport that the communicator uses for host tensors when its whole group
shares a node."""

from .transport import KINDS, Transport, built, open_transport, segment_name

__all__ = ["KINDS", "Transport", "built", "open_transport", "segment_name"]
