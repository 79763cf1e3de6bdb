"""The benchmark harness (mpicomm.bench) under ``mpiexec -n 2``: ``python -m mpicomm bench`` runs in
a subprocess bounded by ``timeout``, and its JSON and PNGs are checked (the pure parts:
tests/unit/test_bench.py).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from mpicomm.bench.collectives import ENTRIES
from tests.helpers import BENCH_TARGETS, PNG_MAGIC, run_mpi

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _launch(args: list[str], outer: int):
    return run_mpi(2, "-m", "mpicomm", "bench", *args, timeout=outer)


@pytest.mark.timeout(420)
def test_quick_sweep_on_two_ranks(tmp_path):
    out = tmp_path / "bench"
    args = ["--quick", "--no-progress", "--targets", str(BENCH_TARGETS), "--out", str(out)]
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
