"""mpicomm: vLLM's device-communicator interface on MPI, for PyTorch tensors."""

from .errors import CollectiveTimeoutError, CommunicationError

__version__ = "0.1.0"

__all__ = ["CollectiveTimeoutError", "CommunicationError", "__version__"]
