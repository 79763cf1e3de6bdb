"""The ``MPICOMM_*`` environment settings, parsed in one place.

==================================  ===========================================================
``MPICOMM_CUDA_AWARE``              ``0``/``1``: override the MPI library's CUDA-awareness answer
``MPICOMM_STAGING``                 ``1``: send every tensor through the host staging buffers,
                                    CPU tensors included (for testing the staging path)
``MPICOMM_VALIDATE``                ``1``: check before each collective that all ranks agree on
                                    operation, dtype, shape, dim, sizes and root
``MPICOMM_TIMEOUT``                 seconds: bound every collective and receive; unset = no bound
``MPICOMM_ALLREDUCE_ALGO``          ``auto`` (default), ``native`` or ``bytes``
``MPICOMM_LOG_LEVEL``               a :mod:`logging` level name for the ``mpicomm`` logger
``MPICOMM_HUGE_PAGES``              ``0``: do not ask Linux for transparent huge pages under large
                                    fresh results (default ``1``; see :func:`mpicomm.buffers.huge_pages`)
``MPICOMM_RECYCLE``                 ``0``: large host results (4 MiB and up) in new memory every time
                                    (default ``1``: in memory recycled from results already freed;
                                    see :class:`mpicomm.buffers.ResultMemory`)
``MPICOMM_HIERARCHICAL``            ``auto`` (default), ``0`` (never) or ``1`` (whenever it applies):
                                    the node-aware all_reduce of :mod:`mpicomm.hierarchical`
``MPICOMM_ABORT_ON_EXCEPTION``      ``0``: do not abort the MPI job on an uncaught exception
                                    (default ``1``; read when an exception arrives)
``MPICOMM_VLLM``                    ``1``: the vLLM platform plugin activates mpicomm
``MPICOMM_VLLM_DEVICE``             ``cpu`` or ``cuda``: force the vLLM platform family
``MPICOMM_VLLM_TORCH_BACKEND``      ``mpicomm``: vLLM's cpu and device groups on the mpicomm torch
                                    backend, no gloo (default ``gloo``: vLLM's own choice)
``MPICOMM_VLLM_EXPERT_MAP_FIX``     ``0``: leave vLLM CPU's MoE experts unpatched (default ``1``:
                                    map expert ids where vLLM ignores ``expert_map``; see
                                    docs/vllm.md)
``MPICOMM_VLLM_PP_FIX``             ``0``: leave vLLM CPU's pipeline stages as they are (default
                                    ``1``: allocate the receive buffer of later stages where the
                                    installed vLLM skips that in eager mode; docs/vllm.md)
``MPICOMM_SHM``                     ``auto`` (default), ``0`` (never) or ``1`` (required): the
                                    intra-node shared-memory collectives of :mod:`mpicomm.shm`
``MPICOMM_SHM_DIRECT``              ``0``: large shared-memory collectives copy through the
                                    segment instead of reading peers' tensors directly (default
                                    ``1`` where the kernel allows it; docs/shm.md)
==================================  ===========================================================

Flags take ``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/``off`` (any case); an empty or
unset variable means the default. A malformed value raises ``ValueError`` naming the variable.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

ALLREDUCE_ALGOS = ("auto", "native", "bytes")
HIERARCHICAL_MODES = ("auto", "0", "1")
VLLM_DEVICES = ("", "cpu", "cuda")
VLLM_TORCH_BACKENDS = ("gloo", "mpicomm")


TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


def parse_flag(raw: str, name: str) -> bool:
    """``raw`` (a variable's or an argument's text) as a bool: one of :data:`TRUE` or
    :data:`FALSE`, any case; anything else raises ``ValueError`` naming ``name``."""
    text = raw.strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise ValueError(
        f"{name} must be 0 or 1 (or {'/'.join(TRUE[1:])}, {'/'.join(FALSE[1:])}), got {raw!r}"
    )


def flag(name: str, default: bool | None) -> bool | None:
    """The boolean variable ``name``; ``default`` when unset or empty."""
    raw = os.environ.get(name, "")
    if raw.strip() == "":
        return default
    return parse_flag(raw, name)


def _seconds(name: str) -> float | None:
    """A finite number of seconds >= 0; unset, empty or zero (in any spelling) mean ``None``."""
    raw = os.environ.get(name, "").strip()
    if raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"{name} must be a finite number of seconds >= 0 (0: no bound), got {raw!r}"
        )
    return value or None


def _log_level(name: str) -> str | None:
    """A :mod:`logging` level name, upper-cased; ``None`` when unset or empty."""
    raw = os.environ.get(name, "").strip().upper()
    if raw == "":
        return None
    if not isinstance(logging.getLevelName(raw), int):
        raise ValueError(
            f"{name} must be a logging level (DEBUG, INFO, WARNING, ERROR, CRITICAL), got {raw!r}"
        )
    return raw


def choice(name: str, choices: tuple[str, ...], default: str) -> str:
    """The variable ``name``, lower-cased, one of ``choices``; ``default`` when unset or empty."""
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
    hierarchical: str = "auto"
    shm: str = "auto"
    shm_direct: bool = True
    recycle: bool = True
    abort_on_exception: bool = True


def settings() -> Settings:
    """Read the ``MPICOMM_*`` variables now. Raises ``ValueError`` naming a malformed variable."""
    return Settings(
        cuda_aware=flag("MPICOMM_CUDA_AWARE", None),
        staging=staging_on(),
        validate=bool(flag("MPICOMM_VALIDATE", False)),
        timeout=_seconds("MPICOMM_TIMEOUT"),
        allreduce_algo=choice("MPICOMM_ALLREDUCE_ALGO", ALLREDUCE_ALGOS, "auto"),
        log_level=_log_level("MPICOMM_LOG_LEVEL"),
        huge_pages=huge_pages_on(),
        hierarchical=hierarchical_mode(),
        shm=shm_mode(),
        shm_direct=shm_direct_on(),
        recycle=recycle_on(),
        abort_on_exception=bool(flag("MPICOMM_ABORT_ON_EXCEPTION", True)),
    )


# The settings ``python -m mpicomm info`` reports one by one (a malformed other one must not hide
# them); settings() reads them through the same functions.
def huge_pages_on() -> bool:
    """``MPICOMM_HUGE_PAGES``: large host results on transparent huge pages (default on)."""
    return bool(flag("MPICOMM_HUGE_PAGES", True))


def recycle_on() -> bool:
    """``MPICOMM_RECYCLE``: large host results in recycled memory (default on)."""
    return bool(flag("MPICOMM_RECYCLE", True))


def shm_mode() -> str:
    """``MPICOMM_SHM``: ``auto``, ``0`` or ``1``."""
    return auto_flag("MPICOMM_SHM")


def staging_on() -> bool:
    """``MPICOMM_STAGING``: every tensor through the host staging buffers (default off)."""
    return bool(flag("MPICOMM_STAGING", False))


def hierarchical_mode() -> str:
    """``MPICOMM_HIERARCHICAL``: ``auto``, ``0`` or ``1``."""
    return auto_flag("MPICOMM_HIERARCHICAL")


def shm_direct_on() -> bool:
    """``MPICOMM_SHM_DIRECT``: large shared-memory messages read peers' tensors (default on)."""
    return bool(flag("MPICOMM_SHM_DIRECT", True))


def auto_flag(name: str) -> str:
    """``auto``, ``0`` or ``1`` from the variable ``name`` (``auto`` or any flag spelling)."""
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("", "auto"):
        return "auto"
    try:
        return "1" if flag(name, None) else "0"
    except ValueError:
        raise ValueError(f"{name} must be auto, 0 or 1, got {raw!r}") from None


def abort_on_exception() -> bool:
    """``MPICOMM_ABORT_ON_EXCEPTION`` (default on). Read on its own: it is consulted inside an
    exception hook, where a malformed unrelated variable must not matter (and a malformed value
    of its own means on; :func:`settings`, read when a communicator is built, refuses it)."""
    try:
        return bool(flag("MPICOMM_ABORT_ON_EXCEPTION", True))
    except ValueError:
        return True


def vllm_enabled() -> bool:
    """``MPICOMM_VLLM``: whether the vLLM platform plugin activates mpicomm (default off)."""
    return bool(flag("MPICOMM_VLLM", False))


def vllm_torch_backend() -> str:
    """``MPICOMM_VLLM_TORCH_BACKEND``: the torch.distributed backend of vLLM's process groups
    under the mpicomm platform: ``gloo`` (default, vLLM's own) or ``mpicomm`` (no gloo at all)."""
    return choice("MPICOMM_VLLM_TORCH_BACKEND", VLLM_TORCH_BACKENDS, "gloo")


def vllm_device() -> str:
    """``MPICOMM_VLLM_DEVICE``: ``cpu``, ``cuda`` or ``""`` (let vLLM detect)."""
    return choice("MPICOMM_VLLM_DEVICE", VLLM_DEVICES, "")


def vllm_expert_map_fix() -> bool:
    """``MPICOMM_VLLM_EXPERT_MAP_FIX`` (default on): map expert ids for vLLM CPU's MoE experts
    where the installed vLLM ignores ``expert_map`` (:mod:`mpicomm.vllm.expert_map`)."""
    return bool(flag("MPICOMM_VLLM_EXPERT_MAP_FIX", True))


def vllm_pp_fix() -> bool:
    """``MPICOMM_VLLM_PP_FIX`` (default on): allocate the activations buffer of later pipeline
    stages where vLLM CPU skips it in eager mode (:mod:`mpicomm.vllm.pipeline_fix`)."""
    return bool(flag("MPICOMM_VLLM_PP_FIX", True))
