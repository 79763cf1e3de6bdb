"""mpicomm's performance targets (docs/benchmarks.md), evaluated on one run's records.

Read by the harness: ``python -m mpicomm bench --targets benchmarks/targets.py ...`` prints the
verdicts after the sweep (by the median and by the fastest iteration) and writes them to
``results.json`` (``targets``, ``targets_fastest``). On a results file already written:
``python benchmarks/targets.py results.json``.

All comparisons are side by side in the same run. Each evaluation returns ``{"target", "holds",
"worst", "where", "compared"}``: ``holds`` is ``None`` when the run did not measure what the target needs (sizes, dtypes or backends left out).
Ratios are speeds (baseline time / mpicomm time): above 1 means mpicomm is faster.
"""

from __future__ import annotations

import sys

from mpicomm.bench.report import documents, target_lines
from mpicomm.bench.units import human

MiB = 1 << 20
GATHERS = ("all_gather", "reduce_scatter", "all_gatherv", "reduce_scatterv")


def _index(results: list[dict], stat: str = "time_us") -> dict[tuple, dict]:
    """Measured, verified records by (collective, backend, dtype, bytes); ``time_us`` is taken
    from ``stat`` (``time_us``: the median; ``time_us_min``: the fastest iteration)."""
    return {
        (r["collective"], r["backend"], r["dtype"], r["bytes"]): {**r, "time_us": r[stat]}
        for r in results
        if stat in r and r.get("ok") is not False
    }


def _verdict(text: str, pairs: list[tuple[float, str]], good, worst_is_min: bool) -> dict:
    """``pairs`` of (value, where); the worst one decides."""
    if not pairs:
        return {
            "target": text,
            "holds": None,
            "worst": None,
            "where": "not measured",
            "compared": 0,
        }
    value, where = (min if worst_is_min else max)(pairs, key=lambda p: p[0])
    return {
        "target": text,
        "holds": bool(all(good(v) for v, _ in pairs)),
        "worst": value,
        "where": where,
        "compared": len(pairs),
    }


def _speed_pairs(idx, collectives, baseline, dtypes=None, sizes=None, min_bytes=0):
    pairs = []
    for (coll, backend, dtype, nbytes), mine in idx.items():
        if backend != "mpicomm" or coll not in collectives or nbytes < min_bytes:
            continue
        if (dtypes and dtype not in dtypes) or (sizes and nbytes not in sizes):
            continue
        other = idx.get((coll, baseline, dtype, nbytes))
        if other:
            pairs.append((other["time_us"] / mine["time_us"], f"{coll} {dtype} {human(nbytes)}"))
    return pairs


def evaluate(results: list[dict], stat: str = "time_us") -> list[dict]:
    """The sweep's targets (the crossover targets are in :func:`evaluate_crossover`).

    ``stat`` picks the time compared: ``time_us`` (median, the headline) or ``time_us_min``.
    """
    idx = _index(results, stat)
    out = [
        _verdict(
            "all_reduce fp32 >= 1 MiB: >= 0.95x raw mpi4py throughput",
            _speed_pairs(idx, ("all_reduce",), "mpi4py", ("float32",), min_bytes=MiB),
            lambda v: v >= 0.95,
            True,
        ),
    ]
    small = []
    for (coll, backend, dtype, nbytes), mine in idx.items():
        if coll == "all_reduce" and backend == "mpicomm" and nbytes <= 1024:
            other = idx.get((coll, "mpi4py", dtype, nbytes))
            if other:
                small.append((mine["time_us"] - other["time_us"], f"{dtype} {human(nbytes)}"))
    out.append(
        _verdict(
            "all_reduce 8 B - 1 KiB: <= 5 us more per call than raw mpi4py",
            small,
            lambda v: v <= 5.0,
            False,
        )
    )
    half = []
    for (coll, backend, dtype, nbytes), mine in idx.items():
        if (coll, backend, dtype) == ("all_reduce", "mpicomm", "bfloat16") and nbytes >= 4 * MiB:
            fp32 = idx.get(("all_reduce", "mpicomm", "float32", 2 * nbytes))
            if fp32:
                half.append(
                    (
                        mine["time_us"] / fp32["time_us"],
                        f"{human(nbytes)} bf16 vs {human(2 * nbytes)} fp32",
                    )
                )
    out.append(
        _verdict(
            "bf16 all_reduce >= 4 MiB: <= 0.65x the time of fp32 with the same count",
            half,
            lambda v: v <= 0.65,
            False,
        )
    )
    out.append(
        _verdict(
            "all_gather/reduce_scatter/all_gatherv/reduce_scatterv >= 1 MiB: >= 0.9x mpi4py",
            _speed_pairs(idx, GATHERS, "mpi4py", min_bytes=MiB),
            lambda v: v >= 0.9,
            True,
        )
    )
    every = tuple({k[0] for k in idx})
    out.append(
        _verdict(
            "vs gloo at 4 KiB: >= 20x faster, every collective",
            _speed_pairs(idx, every, "gloo", sizes=(4096,)),
            lambda v: v >= 20,
            True,
        )
    )
    out.append(
        _verdict(
            "vs gloo at 64 MiB: >= 2x faster, every collective",
            _speed_pairs(idx, every, "gloo", sizes=(64 * MiB,)),
            lambda v: v >= 2,
            True,
        )
    )
    return out


def evaluate_crossover(cross: dict, stat: str = "us") -> list[dict]:
    """fp32 all_reduce: auto >= 0.95x the faster algorithm from 1 MiB; >= 1.2x raw at 64 MiB.

    ``stat``: ``us`` (medians) or ``min_us`` (fastest iterations).
    """
    rows = [r for r in cross["rows"] if all(r["ok"].values())]

    def t(r, v):
        return r[f"{v}_{stat}"]

    best = [
        (min(t(r, "native"), t(r, "bytes")) / t(r, "auto"), human(r["bytes"]))
        for r in rows
        if r["bytes"] >= MiB
    ]
    raw = [
        (t(r, "mpi4py") / t(r, "auto"), human(r["bytes"])) for r in rows if r["bytes"] == 64 * MiB
    ]
    return [
        _verdict(
            "fp32 all_reduce >= 1 MiB: auto >= 0.95x the faster of native/bytes",
            best,
            lambda v: v >= 0.95,
            True,
        ),
        _verdict(
            "fp32 all_reduce at 64 MiB: auto >= 1.2x raw mpi4py Allreduce",
            raw,
            lambda v: v >= 1.2,
            True,
        ),
    ]


def main(argv: list[str]) -> int:
    """Print the verdicts of each results file in ``argv`` (median, then fastest iteration)."""
    if not argv:
        print(__doc__)
        return 2
    for path, doc in documents(argv):
        if "crossover" in doc:
            verdicts = [evaluate_crossover(doc["crossover"], s) for s in ("us", "min_us")]
        else:
            verdicts = [evaluate(doc["results"], s) for s in ("time_us", "time_us_min")]
        print(f"# {path}")
        for lines in (target_lines(verdicts[0]), target_lines(verdicts[1], "fastest iteration")):
            print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
