"""The benchmark harness: options, the sweep, the terminal table, the JSON and the plots.

Run on every rank (``mpiexec -n N python -m mpicomm bench ...``); rank 0 prints and writes files.
For each collective and dtype, each size is measured on every backend back to back (so the
backends see the same machine load), then one table row is printed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

import numpy as np
import torch

from mpicomm.dtypes import CHECKED, parse_dtype, short_name

from .._mpi import MPI
from . import env, plots, references, report, terminal
from .collectives import BACKENDS, COLLECTIVES, ENTRIES, Ctx, Skip
from .timing import Schedule, figures, time_loop
from .units import human, parse_size

# What ``--dtypes`` accepts: the dtypes the self-check covers, except bool (it has no sum).
BENCH_DTYPES: tuple[torch.dtype, ...] = tuple(d for d in CHECKED if d is not torch.bool)
QUICK_SIZES = [8, 4096, 1 << 20]


def _csv(choices):
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {text!r}")
        return items

    return parse


def _dtypes(text: str) -> list[torch.dtype]:
    """``--dtypes``: names of :data:`BENCH_DTYPES` as ``mpicomm.dtypes.parse_dtype`` reads them
    (``bf16``, ``bfloat16``), plus the ``fp`` spelling of the short float names (``fp32``)."""
    items = []
    for name in filter(None, (s.strip().lower() for s in text.split(","))):
        try:
            items.append(parse_dtype("f" + name[2:] if name.startswith("fp") else name))
        except ValueError:
            items.append(None)
    if not items or any(d not in BENCH_DTYPES for d in items):
        names = ", ".join(short_name(d) for d in BENCH_DTYPES)
        raise argparse.ArgumentTypeError(f"choose from {names} (or torch's names); got {text!r}")
    return items


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mpicomm bench",
        description="nccl-tests style sweep of mpicomm against raw mpi4py and torch.distributed gloo "
        "(run under mpiexec; rank 0 prints and writes the results).",
    )
    p.add_argument(
        "--quick", action="store_true", help="a few sizes, few iterations (< 1 min on 2 ranks)"
    )
    p.add_argument("--collectives", type=_csv(COLLECTIVES), default=list(COLLECTIVES))
    p.add_argument("--backends", type=_csv(BACKENDS), default=list(BACKENDS))
    p.add_argument(
        "--dtypes",
        type=_dtypes,
        default=[torch.float32, torch.bfloat16],
        help="comma list, short or torch names (f32,bf16 or float32,bfloat16)",
    )
    p.add_argument("--min-bytes", type=parse_size, default=8)
    p.add_argument("--max-bytes", type=parse_size, default=256 << 20)
    p.add_argument("--step-factor", type=int, default=2, help="size multiplier between steps")
    p.add_argument(
        "--sizes",
        type=lambda s: [parse_size(x) for x in s.split(",")],
        default=None,
        help="explicit comma-separated sizes (overrides min/max/step)",
    )
    p.add_argument("--iters", type=int, default=100, help="timed iterations for small sizes")
    p.add_argument(
        "--min-iters", type=int, default=5, help="timed iterations for the largest sizes"
    )
    p.add_argument(
        "--iter-bytes",
        type=parse_size,
        default=256 << 20,
        help="iterations = clamp(iter_bytes / size, min_iters, iters)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="device of mpicomm's and gloo's tensors (cpu, cuda: one GPU per rank on a node, "
        "pinned-host copy references and staging floors)",
    )
    p.add_argument(
        "--cuda-dry-run",
        action="store_true",
        help="the --device cuda mode on CPU tensors (copy references, staging floors): "
        "checks the GPU mode without a GPU",
    )
    p.add_argument(
        "--targets",
        default=None,
        metavar="FILE",
        help="a Python file with evaluate(results, stat) and evaluate_crossover(cross, stat) "
        "returning target verdicts (e.g. benchmarks/targets.py); printed and written to the JSON",
    )
    p.add_argument("--no-reference", action="store_true", help="skip the memcpy/host-device copies")
    p.add_argument(
        "--crossover",
        action="store_true",
        help="measure fp32 all_reduce: MPI native vs mpicomm bytes algorithm (and auto)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="timed rounds per size, backends interleaved (default 1; crossover 3)",
    )
    p.add_argument("--out", default="mpicomm-bench", help="folder for results.json and the PNGs")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    args = parser().parse_args(argv)
    if args.quick:
        if args.sizes is None:
            args.sizes = QUICK_SIZES
        args.iters = min(args.iters, 10)
        args.min_iters = min(args.min_iters, 3)
        args.iter_bytes = min(args.iter_bytes, 32 << 20)
        args.rounds = min(args.rounds or 2, 2) if args.crossover else (args.rounds or 1)
    if args.sizes is None:
        if args.min_bytes > args.max_bytes:
            raise SystemExit("--min-bytes must not exceed --max-bytes")
        if args.step_factor < 2:
            raise SystemExit("--step-factor must be >= 2")
        sizes, s = [], args.min_bytes
        while s <= args.max_bytes:
            sizes.append(s)
            s *= args.step_factor
        args.sizes = sizes
    if args.rounds is None:
        args.rounds = 3 if args.crossover else 1
    if args.rounds < 1:
        raise SystemExit("--rounds must be >= 1")
    if args.iters < 1 or args.min_iters < 1 or args.min_iters > args.iters:
        raise SystemExit("need 1 <= --min-iters <= --iters")
    if args.cuda_dry_run and args.device != "cpu":
        raise SystemExit("--cuda-dry-run runs on CPU tensors: leave --device at cpu")
    args.dtypes = list(dict.fromkeys(_torch_name(d) for d in args.dtypes))
    return args


def _torch_name(dtype: torch.dtype) -> str:
    """``bfloat16``: the name records, tables and plots use."""
    return str(dtype).removeprefix("torch.")


def measure(
    ctx: Ctx,
    entry,
    backend: str,
    dtype: torch.dtype,
    nbytes: int,
    sched: Schedule,
    rounds: int = 1,
) -> dict:
    """Build, time and check one case; the JSON record (``skipped`` set when it cannot run).

    With ``rounds > 1`` the timed loop runs that many times and the iterations are pooled (the
    sweep interleaves backends round by round, see :func:`run_sweep`).
    """
    itemsize = dtype.itemsize
    count = nbytes // itemsize
    if entry.name in ("all_gather", "reduce_scatter"):
        count -= count % ctx.size
    rec = {
        "collective": entry.name,
        "backend": backend,
        "dtype": str(dtype).removeprefix("torch."),
        "bytes": count * itemsize,
        "count": count,
        "nranks": ctx.size,
    }
    if count < entry.min_count(ctx.size):
        rec["skipped"] = "size smaller than one element per rank"
        return rec
    try:
        case = entry.build(ctx, backend, dtype, count)
    except Skip as why:
        rec["skipped"] = str(why)
        return rec
    warmup, iters = sched.warmup(rec["bytes"]), sched.iters(rec["bytes"])
    rec.update(warmup=warmup, iters=iters, rounds=rounds)
    rec["_case"] = case
    return rec


def time_record(ctx: Ctx, rec: dict, factor: float) -> None:
    """One more timed round of a record built by :func:`measure`; updates its figures."""
    case = rec.get("_case")
    if case is None:
        return
    timing = time_loop(case.run, case.check, ctx.comm, rec["warmup"], rec["iters"])
    if timing.error and rec["backend"] == "gloo" and ctx.device.type == "cuda":
        # gloo lacks some collectives on CUDA tensors: a gap of the baseline, not a failure.
        rec["skipped"] = f"gloo on {ctx.device.type}: {timing.error}"
        rec.pop("_case")
        return
    if timing.error:
        rec["error"] = timing.error
        rec["ok"] = False
        rec.pop("_case")
        for key in ("time_us", "time_us_min", "time_us_p90", "algbw_GBps", "busbw_GBps"):
            rec.pop(key, None)
        return
    rec.setdefault("_times", []).append(timing.times)
    rec["ok"] = rec.get("ok", True) and timing.ok
    figures(rec, np.concatenate(rec["_times"]), factor)


def finish_record(rec: dict) -> dict:
    """Drop the case and raw times (not JSON); the record as written."""
    rec.pop("_case", None)
    rec.pop("_times", None)
    return rec


def run_sweep(
    args: argparse.Namespace,
    comm: MPI.Comm,
    device: torch.device,
    communicator,
    gloo_error: str | None,
) -> tuple[list[dict], list[dict]]:
    """Every collective x dtype x size x backend; returns (results, copy references)."""
    sched = Schedule(args.iters, args.min_iters, args.iter_bytes)
    ctx = Ctx(comm=comm, communicator=communicator, gloo=gloo_error is None, device=device)
    entries = [ENTRIES[c] for c in args.collectives]
    total = len(entries) * len(args.dtypes) * len(args.sizes) * len(args.backends)
    kinds = references.copy_kinds(device.type == "cuda" or args.cuda_dry_run)
    if not args.no_reference:
        total += len(args.sizes) * len(kinds)
    progress = terminal.Progress(total, comm.rank == 0 and not args.no_progress)
    say = progress.write if comm.rank == 0 else (lambda line: None)
    results: list[dict] = []
    copies: list[dict] = []
    if not args.no_reference:
        copies = references.measure_copies(comm, device, args.sizes, sched, kinds, progress.step)
        say("")
        say(f"# copy references ({', '.join(kinds)}: torch copy_, every rank at once)")
        for r in copies:
            say(
                f"{human(r['bytes']):>9s} {r['collective']:>7s} {r['time_us']:9.1f} us "
                f"{r['algbw_GBps']:7.3f} GB/s"
            )
    for entry in entries:
        for dtype_name in args.dtypes:
            dtype = parse_dtype(dtype_name)
            for line in terminal.table_header(entry, dtype_name, args.backends, comm.size):
                say(line)
            for nbytes in args.sizes:
                row = {}
                for backend in args.backends:
                    rec = measure(ctx, entry, backend, dtype, nbytes, sched, args.rounds)
                    if backend == "gloo" and gloo_error and "skipped" in rec:
                        rec["skipped"] = gloo_error
                    row[backend] = rec
                # Backends interleaved round by round: they see the same machine load.
                for _ in range(args.rounds):
                    for rec in row.values():
                        time_record(ctx, rec, entry.factor(comm.size))
                for backend, rec in row.items():
                    results.append(finish_record(rec))
                    progress.step(f"{entry.name} {dtype_name} {human(nbytes)} {backend}")
                del rec
                gc.collect()
                if all("skipped" in r for r in row.values()):
                    continue
                say(terminal.table_row(nbytes, row, args.backends))
    progress.close()
    references.add_staging_floors(results, copies, ENTRIES)
    return results, copies


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m mpicomm bench``; returns the exit status (0: all checks passed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD.Dup()
    device = env.rank_device(comm, args.device)
    try:
        return _main(args, argv, comm, device)
    finally:
        comm.Free()


def _main(args, argv, comm: MPI.Comm, device: torch.device) -> int:
    rank0 = comm.rank == 0
    meta = env.metadata(comm, argv, device)
    communicator = None
    if "mpicomm" in args.backends or args.crossover:
        communicator = env.make_communicator(device)
        meta["allreduce_algo"] = getattr(communicator, "allreduce_algo", None)
    gloo_error = None
    if "gloo" in args.backends and not args.crossover:
        gloo_error = env.init_gloo(comm)
        if gloo_error and rank0:
            print(f"warning: {gloo_error}; gloo skipped", file=sys.stderr)
    doc = {"meta": meta, "options": {k: v for k, v in vars(args).items()}}
    targets = env.load_targets(args.targets) if args.targets else None
    failures = 0
    try:
        if args.crossover:
            from . import crossover

            doc["crossover"] = crossover.run(args, comm, device, communicator)
            if targets is not None:
                doc["targets"] = targets.evaluate_crossover(doc["crossover"])
                doc["targets_fastest"] = targets.evaluate_crossover(doc["crossover"], "min_us")
        else:
            results, copies = run_sweep(args, comm, device, communicator, gloo_error)
            doc["results"], doc["references"] = results, copies
            if targets is not None:
                doc["targets"] = targets.evaluate(results)
                doc["targets_fastest"] = targets.evaluate(results, "time_us_min")
            failures = sum(1 for r in results if r.get("ok") is False)
    finally:
        if communicator is not None and hasattr(communicator, "destroy"):
            communicator.destroy()
        if gloo_error is None and "gloo" in args.backends and not args.crossover:
            env.close_gloo()
    if rank0:
        if "targets" in doc:
            for line in report.target_lines(doc["targets"]):
                print(line)
            for line in report.target_lines(doc["targets_fastest"], "fastest iteration"):
                print(line)
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "results.json")
        with open(path, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        written = [path]
        if not args.no_plots:
            written += plots.write_all(doc, args.out)
        print(
            f"\n{'FAILED checks: ' + str(failures) if failures else 'all checks passed'}; "
            f"wrote {', '.join(written)}"
        )
    return 1 if comm.allreduce(failures, op=MPI.MAX) else 0
