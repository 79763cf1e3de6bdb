"""vLLM CUDA platform whose process groups use :class:`mpicomm.vllm.VllmMPICommunicator`.

Imported by vLLM only when ``MPICOMM_VLLM=1`` and CUDA is present (importing vLLM's CUDA platform
needs ``vllm._C`` and NVML). Collectives then run through MPI: with a CUDA-aware MPI directly on
device buffers, otherwise staged through host memory (see :mod:`mpicomm.buffers`). Host-side MPI
calls cannot be captured in CUDA graphs: run vLLM with ``enforce_eager=True`` (or
``cudagraph_mode=NONE``).
"""

from __future__ import annotations

from vllm.platforms.cuda import CudaPlatform

from . import COMMUNICATOR


class MPICudaPlatform(CudaPlatform):
    """vLLM's CUDA platform with mpicomm as the device communicator of every group."""

    @classmethod
    def get_device_communicator_cls(cls) -> str:
        return COMMUNICATOR
