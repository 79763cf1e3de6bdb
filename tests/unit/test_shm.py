"""mpicomm.shm in one process: the compiled sums against torch, segment names and lifetime, the
1-rank transport, the decision of plan.shm_wanted, and the fallback where the core is missing (under mpiexec: tests/jobs/test_shm.py)."""

from __future__ import annotations

import os

import pytest
import torch

from mpicomm import plan
from mpicomm.shm import transport

core = pytest.importorskip("mpicomm.shm._core", reason="the compiled core is not built here")

SUMMED = list(transport.KINDS)
SIGNED = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}
SPECIALS = [0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan"), 1e-40, -3e38, 3e38]


def rank_inputs(dtype: torch.dtype, world: int, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return [torch.randint(0, 2, (n,), generator=g).bool() for _ in range(world)]
    if dtype.is_floating_point or dtype.is_complex:
        xs = [(torch.randn(n, generator=g, dtype=torch.float64) * 1e3) for _ in range(world)]
        if dtype.is_complex:
            xs = [torch.complex(x, x.flip(0)) for x in xs]
        return [x.to(dtype) for x in xs]
    signed = SIGNED.get(dtype, dtype)
    info = torch.iinfo(signed)
    return [
        torch.randint(info.min, info.max, (n,), generator=g, dtype=torch.int64)
        .to(signed)
        .view(dtype)
        for _ in range(world)
    ]


def reference(parts: list[torch.Tensor]) -> torch.Tensor:
    """docs/contract.md "Sums": rank order; 16-bit floats in float32, rounded once by torch."""
    dtype = parts[0].dtype
    if dtype == torch.bool:
        out = parts[0].clone()
        for p in parts[1:]:
            out |= p
        return out
    if dtype in SIGNED:  # torch cannot add these; a wrapping sum has the signed sum's bits
        return reference([p.view(SIGNED[dtype]) for p in parts]).view(dtype)
    acc_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    acc = parts[0].to(acc_dtype).clone()
    for p in parts[1:]:
        acc += p.to(acc_dtype)
    return acc.to(dtype)


def core_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    kind, scale = transport.KINDS[parts[0].dtype]
    out = torch.empty_like(parts[0])
    core.sum(out.data_ptr(), tuple(p.data_ptr() for p in parts), parts[0].numel() * scale, kind)
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Identical bytes, except that a NaN may have any payload where the other has a NaN (torch's
    own NaN payloads differ between its vector and scalar code: docs/shm.md)."""
    if a.dtype.is_floating_point or a.dtype.is_complex:
        an, bn = torch.isnan(a), torch.isnan(b)
        if not torch.equal(an, bn):
            return False
        a, b = a.clone(), b.clone()
        a[an], b[bn] = 0, 0
    return a.reshape(-1).view(torch.uint8).tolist() == b.reshape(-1).view(torch.uint8).tolist()


@pytest.mark.parametrize("dtype", SUMMED, ids=str)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sum_random(dtype, world):
    for n in (0, 1, 15, 257, 4099):
        parts = rank_inputs(dtype, world, n, seed=n + world)
        assert same_bits(core_sum(parts), reference(parts)), (dtype, world, n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("world", [2, 3])
def test_sum_special_values(dtype, world):
    values = torch.tensor(SPECIALS, dtype=torch.float64)
    grid = torch.cartesian_prod(*([values] * world)).T.contiguous()  # every combination
    parts = [row.to(dtype).contiguous() for row in grid]
    got, want = core_sum(parts), reference(parts)
    assert same_bits(got, want)


def test_bf16_nan_and_rounding_bits():
    # ties round to even; every NaN becomes 0xFFFF, as torch's vectorised conversion gives
    a = torch.tensor([0x3F80, 0x3F81, 0x7FC1, 0xFF80], dtype=torch.uint16).view(torch.bfloat16)
    b = torch.tensor([0x3380, 0x3480, 0x3F80, 0x7F80], dtype=torch.uint16).view(torch.bfloat16)
    got = core_sum([a, b]).view(torch.int16).tolist()
    want = reference([a, b]).view(torch.int16).tolist()
    assert got[:2] == want[:2]
    assert got[2] & 0xFFFF == 0xFFFF and got[3] & 0xFFFF == 0xFFFF


def test_float16_nan_payload_like_torch_vector_code():
    a = torch.tensor([0x7E01] * 64, dtype=torch.int16).view(torch.float16)
    one = torch.ones(64, dtype=torch.float16)
    got = core_sum([a, one])
    assert got.view(torch.int16)[0].item() == 0x7E01
    assert torch.isnan(got).all()


def test_segment_name_is_unique_and_valid():
    a = transport.segment_name(123, 0, "abc")
    b = transport.segment_name(123, 1, "abc")
    assert a != b and a.startswith("/mpicomm-") and "/" not in a[1:] and len(a) < 255


def test_segment_lifetime_leaves_no_file():
    """The creator removes the name as soon as the object exists; peers open it through the
    creator's descriptor (/proc/<pid>/fd/<fd>), which the creator keeps until close_fd()."""
    name = transport.segment_name(os.getpid(), 999, "unit")
    seg = core.Segment(name, 1, 0, 4096, True)
    assert not os.path.exists(f"/dev/shm{name}") and seg.fd >= 0
    peer = core.Segment(f"/proc/{os.getpid()}/fd/{seg.fd}", 1, 0, 4096, False)
    assert peer.fd == -1
    seg.close_fd()
    assert seg.fd == -1
    peer.close()
    held = os.open(f"/dev/shm{name}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        with pytest.raises(FileExistsError):
            core.Segment(name, 1, 0, 4096, True)  # exclusive creation: never two owners
    finally:
        os.close(held)
        os.unlink(f"/dev/shm{name}")
    seg.start()
    assert seg.pids() == (os.getpid(),)
    seg.close()
    with pytest.raises(core.WaitError):
        seg.barrier()  # closed


def test_bad_segment_arguments():
    with pytest.raises(ValueError):
        core.Segment("/mpicomm-unit-bad", 2, 2, 4096, True)
    with pytest.raises(ValueError):
        core.Segment("/mpicomm-unit-bad", 1, 0, 100, True)
    assert not os.path.exists("/dev/shm/mpicomm-unit-bad")


def test_one_rank_transport_round_trips(monkeypatch):
    """A 1-rank group forced onto shared memory: every collective is a fresh copy (or sum)."""
    import mpicomm

    c = mpicomm.MPICommunicator(shm="1")
    try:
        x = torch.randn(5, 3)
        assert c.all_reduce_algorithm(x) == plan.SHM
        for dtype in (torch.bfloat16, torch.int64, torch.float8_e4m3fn):
            y = c.all_reduce(x.to(dtype))
            assert y.dtype == dtype and torch.equal(y.float(), x.to(dtype).float())
        assert c.all_reduce_algorithm(x.to(torch.float8_e4m3fn)) != plan.SHM
        big = torch.randn(3 << 20)  # streams through the slots in several rounds
        out = c.all_reduce(big)
        assert torch.equal(out, big) and out.data_ptr() != big.data_ptr()
        assert torch.equal(c.all_gather(x, dim=1), x)
        assert torch.equal(c.gather(x, 0, dim=0), x)
        assert torch.equal(c.all_gatherv(x, sizes=[5]), x)
        assert torch.equal(c.reduce_scatter(x, dim=0), x)
        assert torch.equal(c.broadcast(x, 0), x)
        t = x.t()  # not contiguous
        assert torch.equal(c.all_reduce(t), t)
    finally:
        c.destroy()
    mine = transport.segment_name(os.getpid(), 0, "x")[1:-3]  # with SLURM_JOB_ID too
    assert mine.endswith(f"-{os.getpid()}-")
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(mine)]


def test_timeout_property_follows_communicator():
    import mpicomm

    c = mpicomm.MPICommunicator(shm="1", timeout=5)
    try:
        assert c.transport.timeout == 5
        c.timeout = 2.5
        assert c.transport.timeout == 2.5
        c.timeout = None
        assert c.transport.timeout is None
    finally:
        c.destroy()


def test_shm_wanted():
    assert plan.shm_wanted("auto", True, 2, True, False)
    assert not plan.shm_wanted("auto", True, 1, True, False)
    assert not plan.shm_wanted("auto", False, 2, True, False)
    assert not plan.shm_wanted("auto", True, 2, False, False)
    assert not plan.shm_wanted("auto", True, 2, True, True)
    assert not plan.shm_wanted("0", True, 2, True, False)
    assert plan.shm_wanted("1", True, 1, True, False)
    for args, why in (((False, 2, True, False), "not built"), ((True, 2, False, False), "spans")):
        with pytest.raises(ValueError, match=why):
            plan.shm_wanted("1", *args)


def test_fallback_without_core(monkeypatch):
    """Where the extension is missing, communicators use MPI and say so; shm=1 refuses."""
    import mpicomm

    monkeypatch.setattr(transport, "_core", None)
    monkeypatch.setattr("mpicomm.communicator.shm_built", transport.built)
    assert not transport.built()
    c = mpicomm.MPICommunicator()
    try:
        assert c.all_reduce_algorithm(torch.ones(2)) != plan.SHM
        assert torch.equal(c.all_reduce(torch.ones(2)), torch.ones(2))
    finally:
        c.destroy()
    with pytest.raises(ValueError, match="not built"):
        mpicomm.MPICommunicator(shm="1")


def test_setting(monkeypatch):
    from mpicomm.config import settings

    monkeypatch.setenv("MPICOMM_SHM", "off")
    assert settings().shm == "0"
    monkeypatch.setenv("MPICOMM_SHM", "auto")
    assert settings().shm == "auto"
    monkeypatch.setenv("MPICOMM_SHM", "yes")
    assert settings().shm == "1"
    monkeypatch.setenv("MPICOMM_SHM", "sometimes")
    with pytest.raises(ValueError, match="MPICOMM_SHM"):
        settings()


def test_info_says_which_transport(monkeypatch):
    from mpicomm import info

    monkeypatch.delenv("MPICOMM_SHM", raising=False)
    assert "shared memory" in info.transport_report(1)[0]
    monkeypatch.setenv("MPICOMM_SHM", "0")
    assert "MPI (MPICOMM_SHM=0)" in info.transport_report(1)[0]
    monkeypatch.delenv("MPICOMM_SHM")
    monkeypatch.setattr(info, "shm_built", lambda: False)
    assert "not built" in info.transport_report(2)[0]


def test_info_reports_the_engine_plan_picks(monkeypatch):
    """The info lines come from plan.engine_for, so they name the reason a group gets MPI."""
    from mpicomm import info

    monkeypatch.setattr(info, "shm_built", lambda: True)
    for name in ("MPICOMM_SHM", "MPICOMM_HIERARCHICAL", "MPICOMM_STAGING"):
        monkeypatch.delenv(name, raising=False)
    one_node, multi_node, _ = info.transport_report(2)
    assert "shared memory" in one_node and "node-aware" in multi_node
    monkeypatch.setenv("MPICOMM_HIERARCHICAL", "0")
    assert "MPI (MPICOMM_HIERARCHICAL=0)" in info.transport_report(2)[1]
    monkeypatch.delenv("MPICOMM_HIERARCHICAL")
    monkeypatch.setenv("MPICOMM_STAGING", "1")
    assert "MPI (MPICOMM_STAGING=1 forces staging)" in info.transport_report(2)[0]
    monkeypatch.delenv("MPICOMM_STAGING")
    monkeypatch.setenv("MPICOMM_SHM", "1")
    assert "refused" in info.transport_report(2)[1] and "spans nodes" in info.transport_report(2)[1]
    assert info.transport_report(1)[1].endswith("(this job: one node)")
