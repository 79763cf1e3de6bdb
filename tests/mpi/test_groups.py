"""initialize_model_parallel: the vLLM rank layout for every factorisation of the world."""

import itertools

import pytest
import torch
from mpi4py import MPI

import mpicomm
from tests.helpers import everywhere

pytestmark = pytest.mark.mpi


def layouts(world):
    for tp, pp, dp in itertools.product(range(1, world + 1), repeat=3):
        if world % (tp * pp * dp) == 0:
            yield tp, pp, dp


def expected_groups(rank, world, tp, pp, dp):
    """Members of this rank's groups from the formula global = ((dp*PP + pp)*TP + tp)."""
    block = tp * pp * dp
    base = rank - rank % block
    inner = rank % block
    t, p, d = inner % tp, (inner // tp) % pp, inner // (tp * pp)

    def at(d_, p_, t_):
        return base + (d_ * pp + p_) * tp + t_

    return {
        "tp": [at(d, p, i) for i in range(tp)],
        "pp": [at(d, i, t) for i in range(pp)],
        "dp": [at(i, p, t) for i in range(dp)],
        "ep": [at(i, p, j) for i in range(dp) for j in range(tp)],
        "world": list(range(world)),
    }


def test_every_layout():
    world, rank = MPI.COMM_WORLD.Get_size(), MPI.COMM_WORLD.Get_rank()
    for tp, pp, dp in layouts(world):
        groups = mpicomm.initialize_model_parallel(tp, pp, dp, enable_expert_parallel=True)
        try:
            want = expected_groups(rank, world, tp, pp, dp)
            got = {n: getattr(groups, n).ranks for n in ("tp", "pp", "dp", "ep", "world")}
            names = {n: getattr(groups, n).unique_name for n in got}
            ok = got == want and names == {n: f"{n}:0" for n in got}
            # each group really works: summing the global ranks gives the members' sum
            for name, members in want.items():
                total = getattr(groups, name).all_reduce(torch.tensor([rank]))
                ok = ok and total.item() == sum(members)
        finally:
            groups.destroy()
        assert everywhere(ok), (tp, pp, dp, got, want)


def test_expert_parallel_off_by_default():
    groups = mpicomm.initialize_model_parallel()
    try:
        assert everywhere(groups.ep is None and groups.tp.world_size == 1)
        topo = groups.topology
        assert everywhere(0 <= topo.local_rank < topo.local_size and topo.num_nodes >= 1)
        assert everywhere(groups.world.device == torch.device("cpu"))
    finally:
        groups.destroy()


def test_size_that_does_not_divide_raises_everywhere():
    world = MPI.COMM_WORLD.Get_size()
    for bad in (world + 1, 2 * world):
        try:
            mpicomm.initialize_model_parallel(tensor_parallel_size=bad)
            ok = False
        except ValueError as exc:
            ok = "does not divide" in str(exc)
        assert everywhere(ok)
    for args, exc in (((0,), ValueError), (("2",), TypeError), ((1, 1, 1.5), TypeError)):
        try:
            mpicomm.initialize_model_parallel(*args)
            ok = False
        except exc:
            ok = True
        assert everywhere(ok)
