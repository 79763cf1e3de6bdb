"""mpicomm: vLLM's device-communicator interface on MPI, for PyTorch tensors.

>>> comm = mpicomm.MPICommunicator(cpu_group=MPI.COMM_WORLD)
>>> groups = mpicomm.initialize_model_parallel(tensor_parallel_size=2)
"""

from . import distributed as distributed  # registers the torch.distributed backend
from .base import DeviceCommunicatorBase
from .communicator import MPICommunicator
from .errors import CollectiveTimeoutError, CommunicationError
from .groups import ParallelGroups, initialize_model_parallel

__version__ = "0.1.0"

__all__ = [
    "CollectiveTimeoutError",
    "CommunicationError",
    "DeviceCommunicatorBase",
    "MPICommunicator",
    "ParallelGroups",
    "__version__",
    "initialize_model_parallel",
]
