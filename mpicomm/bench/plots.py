"""PNG plots of a results document (matplotlib, Agg backend; written on rank 0 only)."""

from __future__ import annotations

import os

from .units import human

STYLE = {"mpicomm": "o-", "mpi4py": "s--", "gloo": "^:"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _xaxis(ax, sizes):
    ax.set_xscale("log", base=2)
    ticks = sorted(set(sizes))
    step = max(1, len(ticks) // 9)
    ax.set_xticks(ticks[::step])
    ax.set_xticklabels([human(s) for s in ticks[::step]], rotation=45, ha="right")
    ax.set_xlabel("message size (bytes of the larger buffer)")


def write_all(doc: dict, out: str) -> list[str]:
    """busbw vs size per collective and dtype (one line per backend, memcpy as reference), and
    the crossover plot when present. Returns the paths written."""
    try:
        plt = _pyplot()
    except ImportError:
        print("matplotlib not installed (pip install mpicomm[bench]): no plots")
        return []
    written = []
    meta = doc["meta"]
    library = " ".join(meta["mpi"]["library"].split())[:40]
    subtitle = f"{meta['nranks']} ranks, {library}, {meta['date'][:10]}"
    results = doc.get("results", [])
    refs = doc.get("references", [])
    groups = sorted({(r["collective"], r["dtype"]) for r in results})
    for coll, dtype in groups:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        sizes = []
        for backend in STYLE:
            pts = sorted(
                (r["bytes"], r["busbw_GBps"])
                for r in results
                if (r["collective"], r["dtype"], r["backend"]) == (coll, dtype, backend)
                and "busbw_GBps" in r
            )
            if pts:
                sizes += [p[0] for p in pts]
                ax.plot(*zip(*pts, strict=True), STYLE[backend], label=backend, markersize=4)
        for kind, style in (("memcpy", "k-"), ("d2h", "c-"), ("h2d", "m-")):
            pts = sorted((r["bytes"], r["algbw_GBps"]) for r in refs if r["collective"] == kind)
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    style,
                    alpha=0.35,
                    linewidth=3,
                    label=f"{kind} (reference)",
                )
        if not sizes:
            plt.close(fig)
            continue
        _xaxis(ax, sizes)
        ax.set_yscale("log")
        ax.set_ylabel("busbw (GB/s, log)")
        ax.set_title(f"{coll} {dtype}\n{subtitle}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out, f"busbw_{coll}_{dtype}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    cross = doc.get("crossover")
    if cross and cross["rows"]:
        rows = sorted(cross["rows"], key=lambda r: r["bytes"])
        fig, ax = plt.subplots(figsize=(7, 4.5))
        xs = [r["bytes"] for r in rows]
        for v, style in (("mpi4py", "s--"), ("native", "o-"), ("bytes", "^-"), ("auto", "kx:")):
            ax.plot(xs, [r[f"{v}_busbw_GBps"] for r in rows], style, label=v, markersize=4)
        _xaxis(ax, xs)
        ax.set_yscale("log")
        ax.set_ylabel("busbw (GB/s, log)")
        ax.set_title(f"all_reduce float32: native MPI vs bytes algorithm\n{subtitle}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out, "crossover_all_reduce_float32.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """``python -m mpicomm.bench.plots RESULTS.json [OUT]``: the PNGs of a results file, on
    demand (the committed results keep no PNGs); OUT defaults to the file's folder."""
    import json
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if not argv or len(argv) > 2:
        print(main.__doc__)
        return 2
    with open(argv[0]) as f:
        doc = json.load(f)
    out = argv[1] if len(argv) > 1 else os.path.dirname(os.path.abspath(argv[0]))
    os.makedirs(out, exist_ok=True)
    for path in write_all(doc, out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
