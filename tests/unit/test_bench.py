"""Tests of the benchmark harness (mpicomm.bench).

The pure parts (sizes, inputs and references, thresholds, target evaluation) are tested in this
process; the sweep itself runs as ``python -m mpicomm bench --quick`` under ``mpiexec -n 2`` in a
subprocess bounded by ``timeout``, and its JSON and PNGs are checked.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from mpicomm.bench import collectives, crossover, env
from mpicomm.bench.collectives import COLLECTIVES, ENTRIES, pattern, summed, uneven
from mpicomm.bench.timing import Schedule, bandwidths
from mpicomm.bench.units import human, parse_size
from tests.helpers import ROOT, child_env, run_mpi

TARGETS = ROOT / "benchmarks" / "targets.py"  # the targets file the harness reads (--targets)
targets = env.load_targets(str(TARGETS))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _launch(args: list[str], outer: int):
    return run_mpi(2, "-m", "mpicomm", "bench", *args, timeout=outer)


# ----------------------------------------------------------------------------- pure parts


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


# ----------------------------------------------------------------------------- under mpiexec


@pytest.mark.timeout(420)
def test_quick_sweep_on_two_ranks(tmp_path):
    out = tmp_path / "bench"
    args = ["--quick", "--no-progress", "--targets", str(TARGETS), "--out", str(out)]
    proc = _launch(args, outer=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "# all_reduce float32" in proc.stdout and "# targets" in proc.stdout
    doc = json.loads((out / "results.json").read_text())
    meta = doc["meta"]
    assert meta["nranks"] == 2 and "MPI" in meta["mpi"]["library"].upper()
    assert meta["versions"]["torch"] == torch.__version__ and meta["command"].endswith(
        f"--out {out}"
    )
    measured = {
        (r["collective"], r["backend"], r["dtype"]): r for r in doc["results"] if "time_us" in r
    }
    for coll in ENTRIES:
        for dtype in ("float32", "bfloat16"):
            rec = measured[(coll, "mpicomm", dtype)]
            assert rec["ok"] is True and rec["time_us"] > 0 and rec["busbw_GBps"] > 0
        assert measured[(coll, "mpi4py", "float32")]["ok"] is True
    for r in doc["results"]:
        assert r.get("ok") is not False, r
        assert ("time_us" in r) != ("skipped" in r), r
    gloo = [r for r in doc["results"] if r["backend"] == "gloo" and r["collective"] == "all_reduce"]
    assert gloo and all(r.get("ok") is True for r in gloo), gloo
    assert {r["collective"] for r in doc["references"]} == {"memcpy"}
    assert len(doc["targets"]) == 6 and len(doc["targets_fastest"]) == 6
    pngs = [out / f"busbw_{c}_{d}.png" for c in ENTRIES for d in ("float32", "bfloat16")]
    if HAVE_MATPLOTLIB:
        for png in pngs:
            assert png.read_bytes()[:8] == PNG_MAGIC
    else:  # the bench extra is not installed: the run says so instead of failing
        assert "matplotlib not installed" in proc.stdout and not any(p.exists() for p in pngs)


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


@pytest.mark.timeout(300)
def test_crossover_mode_on_two_ranks(tmp_path):
    out = tmp_path / "cross"
    proc = _launch(["--crossover", "--quick", "--sizes", "4K,256K", "--out", str(out)], outer=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "suggested auto table" in proc.stdout
    cross = json.loads((out / "results.json").read_text())["crossover"]
    assert cross["switch_available"] is True
    assert [r["bytes"] for r in cross["rows"]] == [4096, 256 << 10]
    for row in cross["rows"]:
        assert all(row["ok"].values()) and row["winner"] in ("native", "bytes")
        assert row["native_us"] > 0 and row["bytes_us"] > 0 and row["auto_us"] > 0
    assert cross["auto_table"][0]["min_bytes"] == 0
    if HAVE_MATPLOTLIB:
        assert (out / "crossover_all_reduce_float32.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.timeout(300)
def test_cuda_mode_dry_run_on_cpu(tmp_path):
    """The ``--device cuda`` mode of the engine run on CPU tensors (``--cuda-dry-run``): what
    tests/gpu/run_on_gpu.sh runs on a GPU, checked here so that no device time is spent on a
    broken mode. Every case must check out; the copy references and staging floors are there."""
    out = tmp_path / "gpu"
    colls = "all_reduce,all_gather,reduce_scatter"
    args = ["--cuda-dry-run", "--collectives", colls, "--dtypes", "bf16,fp32", "--sizes", "4K,16K"]
    proc = _launch([*args, "--no-progress", "--no-plots", "--out", str(out)], outer=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    cases = {(r["collective"], r["dtype"], r["bytes"]) for r in doc["results"]}
    for coll in colls.split(","):
        for dtype in ("bfloat16", "float32"):
            assert {(coll, dtype, 4096), (coll, dtype, 16384)} <= cases
    for r in doc["results"]:
        if r["backend"] == "mpicomm":
            assert r["ok"] is True and r["time_us"] > 0, r
            assert r["staging_floor_us"] > 0, r
        if r["backend"] == "gloo":
            assert r["ok"] is True, r
    kinds = {(c["collective"], c["bytes"]) for c in doc["references"]}
    assert kinds == {(k, n) for k in ("memcpy", "d2h", "h2d") for n in (4096, 16384)}
