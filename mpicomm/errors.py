"""Exceptions raised by mpicomm.

Invalid arguments raise the built-in ``TypeError`` / ``ValueError`` (before any MPI call, so every
rank raises alike). Failures inside MPI raise :class:`CommunicationError`; a wait that outlives the
configured timeout raises :class:`CollectiveTimeoutError`.
"""

from __future__ import annotations


class CommunicationError(RuntimeError):
    """An MPI operation failed. The message names the operation and the group."""

    def __init__(self, message: str, *, operation: str | None = None, group: str | None = None):
        super().__init__(message)
        self.operation = operation
        self.group = group


class CollectiveTimeoutError(CommunicationError):
    """A collective or receive did not complete within the configured timeout.

    ``missing`` lists the group ranks known not to have arrived, when that is knowable.
    """

    def __init__(
        self,
        message: str,
        *,
        operation: str | None = None,
        group: str | None = None,
        timeout: float | None = None,
        missing: list[int] | None = None,
    ):
        super().__init__(message, operation=operation, group=group)
        self.timeout = timeout
        self.missing = missing
