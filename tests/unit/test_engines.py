"""mpicomm.engines in one process: the engine a communicator holds and its hot paths, bound once
at construction (none in consistency mode, none after destroy)."""

from __future__ import annotations

import pytest
import torch

import mpicomm
from mpicomm import plan
from mpicomm.shm import Transport, built

pytestmark = pytest.mark.skipif(not built(), reason="the compiled core is not built here")


@pytest.mark.parametrize("shm", ["0", "1"])
def test_every_engine_gives_the_same_results(shm):
    c = mpicomm.MPICommunicator(shm=shm)
    try:
        assert (c.transport is not None) == (shm == "1")
        x = torch.randn(4, 3)
        assert (c.all_reduce_algorithm(x) == plan.SHM) == (shm == "1")
        assert torch.equal(c.all_reduce(x), x)
        out = torch.empty_like(x)
        assert c.all_reduce(x, out=out) is out and torch.equal(out, x)
        assert torch.equal(c.all_gather(x, dim=1), x)
        assert torch.equal(c.gather(x, 0, dim=0), x)
        assert torch.equal(c.all_gatherv([x, x.int()], sizes=[4])[1], x.int())
        assert torch.equal(c.reduce_scatterv(x, dim=1, sizes=[3]), x)
        assert torch.equal(c.broadcast(x, 0), x)
        c.barrier()
    finally:
        c.destroy()
    assert c.transport is None


def _spy(monkeypatch) -> list:
    calls, real = [], Transport.sum_fresh

    def spy(self, x):
        calls.append(x)
        return real(self, x)

    monkeypatch.setattr(Transport, "sum_fresh", spy)
    return calls


@pytest.mark.parametrize("validate", [False, True])
def test_hot_path_only_without_consistency_checks(monkeypatch, validate):
    calls = _spy(monkeypatch)
    c = mpicomm.MPICommunicator(shm="1", validate=validate)
    try:
        x = torch.ones(8)
        assert torch.equal(c.all_reduce(x), x)
        assert len(calls) == (0 if validate else 1)
    finally:
        c.destroy()


def test_no_hot_path_after_destroy(monkeypatch):
    calls = _spy(monkeypatch)
    c = mpicomm.MPICommunicator(shm="1")
    c.destroy()
    with pytest.raises(mpicomm.CommunicationError, match="destroyed"):
        c.all_reduce(torch.ones(8))
    assert not calls  # the unmapped segment is never touched
    assert c.all_reduce_algorithm(torch.ones(8)) != plan.SHM
