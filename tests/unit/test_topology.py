"""mpicomm.topology: the node split, one rank's view of it, the default device."""

import pytest
import torch
from mpi4py import MPI

from mpicomm import topology


def test_labels_and_topology_on_one_rank():
    assert topology.node_labels(MPI.COMM_SELF) == (0,)
    assert topology.node_labels(MPI.COMM_SELF, lambda r: 42) == (0,)
    topo = topology.node_topology(MPI.COMM_SELF)
    assert (topo.local_rank, topo.local_size, topo.node_index, topo.num_nodes) == (0, 1, 0, 1)
    with pytest.raises(ValueError, match="node_of"):
        topology.node_labels(MPI.COMM_SELF, lambda r: "a")


def test_topology_from_labels():
    labels = (0, 1, 0, 1, 2)
    topo = topology.Topology.from_labels(labels, 2)
    assert (topo.local_rank, topo.local_size, topo.node_index, topo.num_nodes) == (1, 2, 0, 3)
    topo = topology.Topology.from_labels(labels, 4)
    assert (topo.local_rank, topo.local_size, topo.node_index) == (0, 1, 2)


def test_default_device():
    dev = topology.default_device(3)
    if torch.cuda.is_available():
        assert dev == torch.device("cuda", 3 % torch.cuda.device_count())
    else:
        assert dev == torch.device("cpu")


def test_default_device_without_a_local_rank_is_torchs_current(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert topology.default_device() == torch.device("cuda", 2)
    assert topology.default_device(5) == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert topology.default_device() == torch.device("cpu")
