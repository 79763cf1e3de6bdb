"""What rank 0 shows while the sweep runs: the progress bar and one table row per size."""

from __future__ import annotations

import sys

from .units import human


class Progress:
    """tqdm on rank 0 (stderr) when available, else nothing; ``write`` prints above the bar."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(
                    total=total,
                    file=sys.stderr,
                    unit="case",
                    leave=False,
                    dynamic_ncols=True,
                    disable=None,
                )
            except ImportError:
                pass

    def step(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_description(label, refresh=False)
            self.bar.update(1)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def table_header(entry, dtype: str, backends: list[str], n: int) -> list[str]:
    cols = "".join(f" | {b:>10s} {'us':>9s} {'GB/s':>7s} {'':>4s}" for b in backends)
    ratio = ""
    if "mpicomm" in backends:
        ratio = "".join(f" | {'x ' + b:>9s}" for b in backends if b != "mpicomm")
    title = f"# {entry.name} {dtype}  ({n} ranks, busbw = algbw x {entry.factor(n):.3g})"
    head = f"{'bytes':>9s} {'count':>10s}{cols}{ratio}"
    sub = f"{'':>9s} {'':>10s}" + "".join(
        f" | {'':>10s} {'time':>9s} {'busbw':>7s} {'chk':>4s}" for _ in backends
    )
    return ["", title, head, sub]


def table_row(nbytes: int, recs: dict[str, dict], backends: list[str]) -> str:
    count = next((r["count"] for r in recs.values()), 0)
    line = f"{human(nbytes):>9s} {count:>10d}"
    for b in backends:
        r = recs[b]
        if "time_us" in r:
            chk = {True: "ok", False: "FAIL", None: "-"}[r.get("ok")]
            line += f" | {'':>10s} {r['time_us']:9.1f} {r['busbw_GBps']:7.3f} {chk:>4s}"
        else:
            tag = "error" if "error" in r else "skip"
            line += f" | {'':>10s} {tag:>9s} {'':>7s} {'':>4s}"
    if "mpicomm" in backends:
        mine = recs["mpicomm"].get("time_us")
        for b in backends:
            if b == "mpicomm":
                continue
            other = recs[b].get("time_us")
            # Speed of mpicomm relative to the baseline: > 1 means mpicomm is faster.
            line += f" | {other / mine:9.2f}" if mine and other else f" | {'':>9s}"
    return line
