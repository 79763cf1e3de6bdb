"""Markdown tables from a results.json (for docs/benchmarks.md).

``python -m mpicomm.bench.report benchmarks/results/results.json [more results.json ...]``
prints, per collective and dtype, time and busbw of each backend at every measured size with
mpicomm's speed ratio against each baseline, then the targets and the crossover table.
"""

from __future__ import annotations

import json
import sys

from .units import human

BACKENDS = ("mpicomm", "mpi4py", "gloo")


def _fmt_us(us: float | None) -> str:
    if us is None:
        return "-"
    return f"{us / 1000:.2f} ms" if us >= 10_000 else f"{us:.1f} us"


def sweep_tables(doc: dict) -> list[str]:
    """One markdown table per collective x dtype."""
    lines: list[str] = []
    res = [r for r in doc.get("results", [])]
    groups = list(dict.fromkeys((r["collective"], r["dtype"]) for r in res))
    for coll, dtype in groups:
        rows = [r for r in res if (r["collective"], r["dtype"]) == (coll, dtype)]
        by = {(r["backend"], r["bytes"]): r for r in rows}
        present = [b for b in BACKENDS if any(r["backend"] == b and "time_us" in r for r in rows)]
        lines += ["", f"**{coll} {dtype}**", ""]
        head = ["size"] + [f"{b} time" for b in present] + [f"{b} busbw GB/s" for b in present]
        head += [f"x {b}" for b in present if b != "mpicomm"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for nbytes in sorted({r["bytes"] for r in rows}):
            recs = {b: by.get((b, nbytes), {}) for b in present}
            if not any("time_us" in r for r in recs.values()):
                continue
            cells = [human(nbytes)]
            cells += [_fmt_us(recs[b].get("time_us")) for b in present]
            cells += [
                f"{recs[b]['busbw_GBps']:.3f}" if "busbw_GBps" in recs[b] else "-" for b in present
            ]
            mine = recs.get("mpicomm", {}).get("time_us")
            for b in present:
                if b == "mpicomm":
                    continue
                other = recs[b].get("time_us")
                cells.append(f"{other / mine:.2f}" if mine and other else "-")
            lines.append("| " + " | ".join(cells) + " |")
        skipped = {r["skipped"] for r in rows if "skipped" in r and "smaller" not in r["skipped"]}
        for why in sorted(skipped):
            lines.append(f"\n_skipped: {why}_")
    return lines


def target_lines(evaluated: list[dict], stat: str = "median") -> list[str]:
    """The targets as terminal lines (``HOLDS``/``MISSED``/``n/a``, the worst case)."""
    lines = [
        "",
        f"# targets by {stat} time (side by side in this run; speed ratio > 1 = mpicomm faster)",
    ]
    for t in evaluated:
        mark = {True: "HOLDS", False: "MISSED", None: "n/a"}[t["holds"]]
        worst = "" if t["worst"] is None else f"worst {t['worst']:.3g} at {t['where']}"
        lines.append(f"{mark:>6s}  {t['target']}  [{worst}; {t['compared']} compared]")
    return lines


def target_table(evaluated: list[dict]) -> list[str]:
    lines = ["", "| target | holds | worst | where | compared |", "|---|---|---|---|---|"]
    for t in evaluated:
        mark = {True: "yes", False: "**no**", None: "not measured"}[t["holds"]]
        worst = "-" if t["worst"] is None else f"{t['worst']:.3g}"
        lines.append(f"| {t['target']} | {mark} | {worst} | {t['where']} | {t['compared']} |")
    return lines


def crossover_table(cross: dict) -> list[str]:
    lines = [
        "",
        "| size | mpi4py Allreduce | native | bytes | auto | bytes speedup over native "
        "| winner | auto / best | auto vs mpi4py | bytes speedup (fastest iteration) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in cross["rows"]:
        lines.append(
            f"| {human(r['bytes'])} | {_fmt_us(r['mpi4py_us'])} | {_fmt_us(r['native_us'])} | "
            f"{_fmt_us(r['bytes_us'])} | {_fmt_us(r['auto_us'])} | "
            f"{r['bytes_speedup_over_native']:.2f} | {r['winner']} | {r['auto_vs_best']:.2f} | "
            f"{r['auto_vs_mpi4py']:.2f} | {r.get('bytes_speedup_over_native_min', float('nan')):.2f} |"
        )
    lines += [
        "",
        f"Suggested `auto` ranges (bytes chosen when more than {cross['margin']:.0%} faster):",
        "",
    ]
    for t in cross["auto_table"]:
        hi = "inf" if t["max_bytes"] is None else human(t["max_bytes"])
        lines.append(f"- [{human(t['min_bytes'])}, {hi}): {t['algo']}")
    return lines


def documents(paths: list[str]):
    """``(path, document)`` of each results file in ``paths``."""
    for path in paths:
        with open(path) as f:
            yield path, json.load(f)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    for path, doc in documents(argv):
        meta = doc["meta"]
        print(f"<!-- {path}: {meta['date']}, {meta['nranks']} ranks, {meta['command']} -->")
        if "results" in doc:
            print("\n".join(sweep_tables(doc)))
        if "crossover" in doc:
            print("\n".join(crossover_table(doc["crossover"])))
        if doc.get("targets"):
            print("\nTargets by median time:")
            print("\n".join(target_table(doc["targets"])))
        if doc.get("targets_fastest"):
            print("\nTargets by fastest iteration:")
            print("\n".join(target_table(doc["targets_fastest"])))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["crossover_table", "documents", "main", "sweep_tables", "target_lines", "target_table"]
