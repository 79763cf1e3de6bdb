"""Tests of the benchmark harness (mpicomm.bench) in one process: sizes, inputs and references,
thresholds, target evaluation, arguments, plots. The sweeps themselves run under mpiexec:
tests/jobs/test_bench.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mpicomm.bench import collectives, crossover, env
from mpicomm.bench.collectives import COLLECTIVES, ENTRIES, pattern, summed, uneven
from mpicomm.bench.timing import Schedule, bandwidths
from mpicomm.bench.units import human, parse_size
from tests.helpers import BENCH_TARGETS, PNG_MAGIC, ROOT, child_env

targets = env.load_targets(str(BENCH_TARGETS))


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("8", 8),
        ("4K", 4096),
        ("4KiB", 4096),
        ("1M", 1 << 20),
        ("256MiB", 256 << 20),
        ("1G", 1 << 30),
    ],
)
def test_parse_size(text, value):
    assert parse_size(text) == value
    assert parse_size(human(value)) == value


@pytest.mark.parametrize("bad", ["0", "-4K", "abc", "K"])
def test_parse_size_rejects(bad):
    with pytest.raises(Exception, match="size"):
        parse_size(bad)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("total", [0, 1, 5, 1000, 12345])
def test_uneven_sizes_add_up_and_grow(n, total):
    sizes = uneven(total, n)
    assert len(sizes) == n and sum(sizes) == total and min(sizes) >= 0
    if n > 1 and total >= n * n:
        assert sizes[0] < sizes[-1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8, torch.uint8])
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_reference_sum_is_exact(dtype, n):
    count = 23
    direct = sum(pattern(count, r, torch.float64) for r in range(n))
    if dtype is torch.uint8:
        direct = sum(pattern(count, r, torch.uint8).double() for r in range(n))
    assert torch.equal(summed(count, n, dtype).double(), direct)
    # Ranks see different inputs (a broken exchange cannot pass by accident).
    if n > 1:
        assert not torch.equal(pattern(count, 0, dtype), pattern(count, 1, dtype))


def test_schedule_scales_iterations_with_size():
    s = Schedule(max_iters=100, min_iters=5, iter_bytes=1 << 30)
    assert s.iters(8) == 100 and s.iters(256 << 20) == 5 and s.iters(64 << 20) == 16
    assert s.warmup(8) == 20 and s.warmup(256 << 20) == 2


def test_bandwidth_factors_follow_nccl_tests():
    assert ENTRIES["all_reduce"].factor(4) == pytest.approx(1.5)
    assert ENTRIES["all_gather"].factor(4) == pytest.approx(0.75)
    assert ENTRIES["reduce_scatter"].factor(2) == pytest.approx(0.5)
    assert ENTRIES["broadcast"].factor(8) == 1.0 and ENTRIES["sendrecv"].factor(8) == 1.0
    algbw, busbw = bandwidths(2_000_000, 1e-3, 1.5)
    assert algbw == pytest.approx(2.0) and busbw == pytest.approx(3.0)


def test_crossover_thresholds_merge_runs():
    rows = [
        {"bytes": 1 << 10, "winner": "native"},
        {"bytes": 1 << 20, "winner": "bytes"},
        {"bytes": 4 << 20, "winner": "bytes"},
        {"bytes": 16 << 20, "winner": "native"},
        {"bytes": 64 << 20, "winner": "bytes"},
    ]
    assert crossover.thresholds(rows) == [
        {"min_bytes": 0, "max_bytes": 1 << 20, "algo": "native"},
        {"min_bytes": 1 << 20, "max_bytes": 16 << 20, "algo": "bytes"},
        {"min_bytes": 16 << 20, "max_bytes": 64 << 20, "algo": "native"},
        {"min_bytes": 64 << 20, "max_bytes": None, "algo": "bytes"},
    ]


def _rec(coll, backend, dtype, nbytes, us):
    return {
        "collective": coll,
        "backend": backend,
        "dtype": dtype,
        "bytes": nbytes,
        "time_us": us,
        "ok": True,
    }


def test_targets_detect_hold_and_miss():
    mib = 1 << 20
    results = [
        _rec("all_reduce", "mpicomm", "float32", mib, 100.0),
        _rec("all_reduce", "mpi4py", "float32", mib, 96.0),  # 0.96x: holds
        _rec("all_reduce", "mpicomm", "float32", 8, 10.0),
        _rec("all_reduce", "mpi4py", "float32", 8, 4.0),  # +6 us: missed
        _rec("all_reduce", "mpicomm", "bfloat16", 4 * mib, 60.0),
        _rec("all_reduce", "mpicomm", "float32", 8 * mib, 100.0),  # 0.6x: holds
        _rec("all_gather", "mpicomm", "float32", mib, 100.0),
        _rec("all_gather", "mpi4py", "float32", mib, 80.0),  # 0.8x: missed
        _rec("broadcast", "mpicomm", "float32", 4096, 10.0),
        _rec("broadcast", "gloo", "float32", 4096, 300.0),  # 30x: holds
    ]
    verdict = {t["target"].split(":")[0]: t for t in targets.evaluate(results)}
    assert verdict["all_reduce fp32 >= 1 MiB"]["holds"] is True
    assert verdict["all_reduce fp32 >= 1 MiB"]["worst"] == pytest.approx(0.96)
    assert verdict["all_reduce 8 B - 1 KiB"]["holds"] is False
    assert verdict["all_reduce 8 B - 1 KiB"]["worst"] == pytest.approx(6.0)
    assert verdict["bf16 all_reduce >= 4 MiB"]["holds"] is True
    assert (
        verdict["all_gather/reduce_scatter/all_gatherv/reduce_scatterv >= 1 MiB"]["holds"] is False
    )
    assert verdict["vs gloo at 4 KiB"]["holds"] is True
    assert verdict["vs gloo at 64 MiB"]["holds"] is None  # not measured
    # A failed check excludes the record instead of counting as fast.
    results[0]["ok"] = False
    assert targets.evaluate(results)[0]["holds"] is None


def test_every_contract_collective_has_an_entry():
    assert set(ENTRIES) == {
        "all_reduce",
        "all_gather",
        "reduce_scatter",
        "all_gatherv",
        "reduce_scatterv",
        "broadcast",
        "sendrecv",
        "dispatch",
        "combine",
    }
    assert collectives.BACKENDS == ("mpicomm", "mpi4py", "gloo")
    assert tuple(ENTRIES) == COLLECTIVES


def test_dtypes_come_from_the_dtype_table():
    from mpicomm.bench.harness import parse

    args = parse(["--dtypes", "bf16,float32,f16,bfloat16,fp64", "--no-plots"])
    assert args.dtypes == ["bfloat16", "float32", "float16", "float64"]
    with pytest.raises(SystemExit):
        parse(["--dtypes", "bool"])


def test_bad_arguments_exit_before_mpi():
    proc = subprocess.run(
        [sys.executable, "-m", "mpicomm", "bench", "--collectives", "all_reduce,bogus"],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "bogus" in proc.stderr


def test_plots_from_a_results_document(tmp_path):
    pytest.importorskip("matplotlib")
    from mpicomm.bench import plots

    meta = {"nranks": 2, "mpi": {"library": "MPICH Version: 5"}, "date": "2026-01-01T00:00"}
    results = [
        {**_rec("all_reduce", b, "float32", n, 10.0 + n / 1e3), "busbw_GBps": n / 1e4}
        for b in ("mpicomm", "mpi4py", "gloo")
        for n in (8, 4096, 1 << 20)
    ]
    refs = [{"collective": "memcpy", "bytes": n, "algbw_GBps": n / 1e3} for n in (8, 4096, 1 << 20)]
    written = plots.write_all({"meta": meta, "results": results, "references": refs}, str(tmp_path))
    assert written == [str(tmp_path / "busbw_all_reduce_float32.png")]
    assert (tmp_path / "busbw_all_reduce_float32.png").read_bytes()[:8] == PNG_MAGIC
