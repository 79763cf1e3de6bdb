"""vLLM on MPI: a ``vllm.platform_plugins`` entry point that puts mpicomm behind vLLM's groups.

Installing mpicomm registers the entry point ``mpicomm = mpicomm.vllm:register``. vLLM calls
:func:`register` while it picks its platform. Only when ``MPICOMM_VLLM=1`` is set does it return a
platform (vLLM's CPU platform, or its CUDA platform when vLLM detects CUDA) whose device
communicator is :class:`VllmMPICommunicator`; otherwise it returns ``None`` and vLLM behaves as if
mpicomm were not installed.

Names exported here (imported lazily, so that importing this module never imports vLLM):

- :func:`register`: the entry point.
- ``VllmMPICommunicator``: vLLM ``DeviceCommunicatorBase`` subclass delegating to
  :class:`mpicomm.MPICommunicator` (defined in :mod:`mpicomm.vllm.communicator`).
- ``torch_env_from_mpi`` / ``export_torch_env``: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
  MASTER_PORT for vLLM's ``external_launcher`` mode under ``mpirun``/``srun``
  (defined in :mod:`mpicomm.vllm.launch`).
"""

from __future__ import annotations

from .. import config

ENV_ENABLE = "MPICOMM_VLLM"
"""Set to ``1`` to make :func:`register` activate the mpicomm platform."""

ENV_DEVICE = "MPICOMM_VLLM_DEVICE"
"""Optional: ``cpu`` or ``cuda`` forces the platform family instead of vLLM's CUDA detection."""

CPU_PLATFORM = "mpicomm.vllm.platform.MPICpuPlatform"
CUDA_PLATFORM = "mpicomm.vllm.platform_cuda.MPICudaPlatform"
COMMUNICATOR = "mpicomm.vllm.communicator.VllmMPICommunicator"


def enabled() -> bool:
    """True when ``MPICOMM_VLLM`` asks for the mpicomm platform."""
    return config.vllm_enabled()


def _cuda_detected() -> bool:
    forced = config.vllm_device()
    if forced:
        return forced == "cuda"
    try:  # vLLM's own detector: NVML based, does not initialise CUDA in this process
        from vllm.platforms import cuda_platform_plugin
    except ImportError:  # pragma: no cover - vLLM without the builtin detector
        return False
    try:
        return cuda_platform_plugin() is not None
    except Exception:  # detection failure means no usable CUDA platform
        return False


def register() -> str | None:
    """vLLM platform-plugin entry point.

    Returns the dotted name of the mpicomm platform class when ``MPICOMM_VLLM=1`` (the CUDA
    variant when vLLM detects CUDA or ``MPICOMM_VLLM_DEVICE=cuda``), else ``None``. A malformed
    ``MPICOMM_VLLM`` or ``MPICOMM_VLLM_DEVICE`` ends the process with ``SystemExit`` naming the
    variable: vLLM logs a plugin's ordinary exceptions at debug level and carries on with its own
    platform, which would run the job on gloo without a word.
    """
    try:
        if not enabled():
            return None
        return CUDA_PLATFORM if _cuda_detected() else CPU_PLATFORM
    except ValueError as exc:
        raise SystemExit(f"mpicomm vLLM plugin: {exc}") from exc


def __getattr__(name: str):
    if name == "VllmMPICommunicator":
        from .communicator import VllmMPICommunicator

        return VllmMPICommunicator
    if name in ("torch_env_from_mpi", "export_torch_env", "torch_env_from_launcher"):
        from . import launch

        return getattr(launch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "COMMUNICATOR",
    "ENV_DEVICE",
    "ENV_ENABLE",
    "VllmMPICommunicator",
    "enabled",
    "export_torch_env",
    "register",
    "torch_env_from_launcher",
    "torch_env_from_mpi",
]
