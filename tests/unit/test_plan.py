"""mpicomm.plan: which algorithm a sum uses, decided alike on every rank."""

import pytest
import torch
from mpi4py import MPI

from mpicomm import plan
from mpicomm.dtypes import dtype_info
from mpicomm.topology import NodeSplit


def test_flat_algorithm():
    bf16, f32, u32 = (dtype_info(d) for d in (torch.bfloat16, torch.float32, torch.uint32))
    assert plan.flat_algorithm(bf16, 4, "native") == plan.BYTES  # MPI cannot sum bf16
    assert plan.flat_algorithm(f32, 4, "auto") == plan.NATIVE
    assert plan.flat_algorithm(f32, plan.BYTES_ALLREDUCE_FROM, "auto") == plan.BYTES
    assert plan.flat_algorithm(f32, 4, "bytes") == plan.BYTES
    assert plan.flat_algorithm(u32, 1 << 30, "bytes") == plan.NATIVE  # torch cannot add it


class FakeNodes(NodeSplit):
    """A node split without communicators: only ``node_of`` matters to the plan."""

    def __init__(self, node_of):
        null = MPI.COMM_NULL
        super().__init__(MPI.COMM_SELF, null, null, null, tuple(node_of))


TWO_BY_TWO, FOUR_BY_TWO = [0, 0, 1, 1], [0] * 4 + [1] * 4


@pytest.mark.parametrize(
    ("dtype", "nbytes", "mode", "node_of", "node_memory", "want"),
    [
        (torch.bfloat16, 1 << 20, "auto", FOUR_BY_TWO, False, plan.HIERARCHICAL),
        (torch.bfloat16, 1 << 10, "auto", FOUR_BY_TWO, False, plan.BYTES),  # too small
        (torch.bfloat16, 1 << 20, "auto", TWO_BY_TWO, False, plan.BYTES),  # leaders: too few
        (torch.float32, 1 << 20, "auto", FOUR_BY_TWO, False, plan.NATIVE),  # leaders: 16-bit only
        # the two-dimensional sum: any float from 64 KiB, nodes of equal size (2+), node memory
        (torch.bfloat16, 64 << 10, "auto", TWO_BY_TWO, True, plan.HIERARCHICAL),
        (torch.bfloat16, (4 << 20) - 2, "auto", TWO_BY_TWO, True, plan.HIERARCHICAL),
        (torch.float16, 4 << 20, "auto", TWO_BY_TWO, True, plan.BYTES),  # 16-bit: below 4 MiB
        (torch.bfloat16, 4 << 20, "auto", FOUR_BY_TWO, True, plan.HIERARCHICAL),  # 4 per node
        (torch.float32, 4 << 20, "auto", TWO_BY_TWO, True, plan.HIERARCHICAL),
        (torch.float32, 64 << 10, "auto", TWO_BY_TWO, True, plan.HIERARCHICAL),
        (torch.float64, 1 << 20, "auto", [0, 0, 1, 1, 2, 2], True, plan.HIERARCHICAL),
        (torch.float32, (64 << 10) - 4, "auto", TWO_BY_TWO, True, plan.NATIVE),  # too small
        (torch.float32, 1 << 20, "auto", [0, 0, 1, 1, 1], True, plan.NATIVE),  # unequal nodes
        (torch.float32, 1 << 20, "auto", [0, 1], True, plan.NATIVE),  # one rank per node
        (torch.float32, 8, "1", [0, 1], False, plan.HIERARCHICAL),
        (torch.bfloat16, 1 << 20, "0", FOUR_BY_TWO, True, plan.BYTES),
        (torch.int64, 1 << 20, "1", [0, 1], True, plan.NATIVE),  # floats only
        (torch.int64, 1 << 20, "auto", TWO_BY_TWO, True, plan.NATIVE),
        (torch.bfloat16, 1 << 20, "1", [0, 0], True, plan.BYTES),  # one node
    ],
)
def test_all_reduce_algorithm(dtype, nbytes, mode, node_of, node_memory, want):
    nodes = FakeNodes(node_of)
    got = plan.all_reduce_algorithm(dtype_info(dtype), nbytes, "auto", mode, nodes, node_memory)
    assert got == want


@pytest.mark.parametrize(
    ("dtype", "nbytes", "want"),
    [
        (torch.float32, 64 << 20, True),  # sums in its own type: always whole chunks
        (torch.bfloat16, 64 << 10, True),
        (torch.float16, plan.NARROW_ONE_EXCHANGE_BELOW - 2, True),
        (torch.bfloat16, plan.NARROW_ONE_EXCHANGE_BELOW, False),
        (torch.bfloat16, 1 << 20, False),
    ],
)
def test_one_exchange(dtype, nbytes, want):
    """Two nodes: 16-bit sums exchange whole float32 chunks only while small."""
    assert plan.one_exchange(dtype, dtype_info(dtype).accumulate, nbytes) is want


def test_no_split_means_flat():
    info = dtype_info(torch.bfloat16)
    assert plan.all_reduce_algorithm(info, 1 << 30, "auto", "1", None) == plan.BYTES


def test_missing_compiled_core_is_logged_once(monkeypatch, caplog):
    """A group that could use shared memory but finds no compiled core says so, once."""
    monkeypatch.setattr(plan, "_told_not_built", [])
    with caplog.at_level("WARNING", logger="mpicomm.plan"):
        assert plan.shm_wanted("auto", False, 2, True, False) is False
        assert plan.node_shm_wanted("auto", False, 2, False) is False
        assert plan.shm_wanted("auto", False, 4, True, False) is False
    said = [r for r in caplog.records if "not built" in r.getMessage()]
    assert len(said) == 1 and "build_ext" in said[0].getMessage()


@pytest.mark.parametrize(
    "args",
    [("auto", True, 2, True, False), ("0", False, 2, True, False), ("auto", False, 1, True, False)],
)
def test_no_missing_core_warning_where_shm_is_not_wanted_or_built(monkeypatch, caplog, args):
    monkeypatch.setattr(plan, "_told_not_built", [])
    with caplog.at_level("WARNING", logger="mpicomm.plan"):
        plan.shm_wanted(*args)
    assert not [r for r in caplog.records if "not built" in r.getMessage()]


def test_engine_for():
    """One engine per group: shared memory on one node, hierarchical across nodes, else MPI."""
    assert plan.engine_for("auto", True, (0, 0), "auto", False) == plan.SHM
    assert plan.engine_for("auto", False, (0, 0), "auto", False) == plan.MPI_ONLY  # no core
    assert plan.engine_for("auto", True, (0,), "auto", False) == plan.MPI_ONLY  # one rank
    assert plan.engine_for("1", True, (0,), "auto", False) == plan.SHM
    assert plan.engine_for("auto", True, (0, 0), "auto", True) == plan.MPI_ONLY  # staging
    assert plan.engine_for("0", True, (0, 0), "auto", False) == plan.MPI_ONLY
    assert plan.engine_for("auto", True, (0, 1), "auto", False) == plan.HIERARCHICAL
    assert plan.engine_for("0", True, (0, 0, 1, 1), "1", False) == plan.HIERARCHICAL
    assert plan.engine_for("auto", True, (0, 1), "0", False) == plan.MPI_ONLY
    with pytest.raises(ValueError, match="spans nodes"):
        plan.engine_for("1", True, (0, 1), "auto", False)


@pytest.mark.parametrize(
    "args, words",
    [
        (("auto", False, True, False), "not built"),
        (("auto", True, False, False), "spans nodes"),
        (("auto", True, True, True), "MPICOMM_STAGING=1"),
    ],
)
def test_shm_refusal_gives_the_one_reason(args, words):
    """MPICOMM_SHM=1's refusal and the info report word the reason alike: no_segment_reason."""
    reason = plan.no_segment_reason(*args)
    assert words in reason
    mode, built, one_node, staging = args
    with pytest.raises(ValueError) as err:
        plan.shm_wanted("1", built, 2, one_node, staging)
    assert str(err.value).endswith(reason)
    assert plan.no_segment_reason("auto", True, True, False) is None
