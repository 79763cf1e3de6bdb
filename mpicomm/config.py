"""The ``MPICOMM_*`` environment settings, parsed in one place.

=============================  ===========================================================
``MPICOMM_CUDA_AWARE``         ``0``/``1``: override the MPI library's CUDA-awareness answer
``MPICOMM_STAGING``            ``1``: send every tensor through the host staging buffers,
                               CPU tensors included (for testing the staging path)
``MPICOMM_VALIDATE``           ``1``: check before each collective that all ranks agree on
                               operation, dtype, shape, dim, sizes and root
``MPICOMM_TIMEOUT``            seconds: bound every collective and receive; unset = no bound
``MPICOMM_ALLREDUCE_ALGO``     ``auto`` (default), ``native`` or ``bytes``
``MPICOMM_LOG_LEVEL``          a :mod:`logging` level name for the ``mpicomm`` logger
``MPICOMM_HUGE_PAGES``         ``0``: do not ask Linux for transparent huge pages under large
                               fresh results (default ``1``; see :func:`mpicomm.buffers.huge_pages`)
=============================  ===========================================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ALLREDUCE_ALGOS = ("auto", "native", "bytes")


def _flag(name: str, default: bool | None) -> bool | None:
    raw = os.environ.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 0 or 1, got {raw!r}")


def _seconds(name: str) -> float | None:
    raw = os.environ.get(name, "").strip()
    if raw == "" or raw == "0":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {raw!r}")
    return value


def _choice(name: str, choices: tuple[str, ...], default: str) -> str:
    raw = os.environ.get(name, "").strip().lower() or default
    if raw not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw


@dataclass(frozen=True)
class Settings:
    """A snapshot of the environment settings; communicators copy what they need at creation."""

    cuda_aware: bool | None
    staging: bool
    validate: bool
    timeout: float | None
    allreduce_algo: str
    log_level: str | None
    huge_pages: bool = True


def settings() -> Settings:
    """Read the ``MPICOMM_*`` variables now. Raises ``ValueError`` naming a malformed variable."""
    return Settings(
        cuda_aware=_flag("MPICOMM_CUDA_AWARE", None),
        staging=bool(_flag("MPICOMM_STAGING", False)),
        validate=bool(_flag("MPICOMM_VALIDATE", False)),
        timeout=_seconds("MPICOMM_TIMEOUT"),
        allreduce_algo=_choice("MPICOMM_ALLREDUCE_ALGO", ALLREDUCE_ALGOS, "auto"),
        log_level=os.environ.get("MPICOMM_LOG_LEVEL") or None,
        huge_pages=bool(_flag("MPICOMM_HUGE_PAGES", True)),
    )
