"""``MPICOMM_LOG_LEVEL`` on the ``mpicomm`` logger."""

from __future__ import annotations

import logging


def apply_log_level(level: str | None) -> None:
    """Set the ``mpicomm`` logger to ``level`` (a :mod:`logging` level name, from
    ``MPICOMM_LOG_LEVEL``) and, when nothing handles its records, print them on stderr."""
    if level is None:
        return
    logger = logging.getLogger("mpicomm")
    logger.setLevel(level)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("mpicomm %(levelname)s: %(message)s"))
        logger.addHandler(handler)
