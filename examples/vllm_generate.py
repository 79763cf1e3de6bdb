"""Offline generation with vLLM's ``LLM`` on mpicomm, launched by mpiexec or srun; self-checking.

    # TP=2 on a small dense model (Llama config, random fp32 weights made here)
    MPICOMM_VLLM=1 mpiexec -n 2 -bind-to core python -m mpicomm.vllm.launch \\
        examples/vllm_generate.py --tp 2
    # DP=2 with expert parallelism on a small MoE model (Mixtral or Qwen3-MoE config)
    MPICOMM_VLLM=1 mpiexec -n 2 -bind-to core python -m mpicomm.vllm.launch \\
        examples/vllm_generate.py --model mixtral --dp 2 --ep
    # under Slurm: srun --mpi=pmi2 -n 2 python -m mpicomm.vllm.launch examples/vllm_generate.py --tp 2

Run with ``OMP_NUM_THREADS`` = cores per rank and ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB) on small
machines. Rank 0 writes the checkpoint (``--workdir``); every rank generates greedily (fp32) with
the requested parallelism under vLLM's ``external_launcher``, the ranks' outputs are gathered
(data-parallel ranks each take their share of the prompts), then rank 0 runs the same generation
on one rank in a child process (``--one-rank``, see :func:`mpicomm.vllm.tiny.reference`; kept in
the checkpoint's folder for later runs) and prints ``VERDICT: ...`` comparing the token ids. Each rank also prints one
``VLLM_RESULT {json}`` line: its host, ids, tokens/s and which communicator served each vLLM group. Exit
status 1 when the ids differ. See docs/vllm.md.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama", help="llama, mixtral or qwen3_moe")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--dp", type=int, default=1, help="data-parallel size")
    p.add_argument("--ep", action="store_true", help="expert parallelism (MoE models)")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--tokens", type=int, default=16, help="tokens generated per prompt")
    p.add_argument("--repeat", type=int, default=1, help="timed generations after the first")
    p.add_argument("--hidden", type=int, default=128, help="hidden size of the made model")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mpicomm-vllm"))
    p.add_argument("--no-check", action="store_true", help="skip the one-rank comparison")
    p.add_argument(
        "--compile", action="store_true", help="let vLLM compile (default: enforce_eager=True)"
    )
    p.add_argument("--one-rank", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def model_dir(args) -> str:
    return os.path.join(args.workdir, f"{args.model}-h{args.hidden}")


def generate(args, world: int, rank: int) -> dict:
    """Greedy ids of this rank's share of the prompts, timing, and the groups' communicators."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from mpicomm.vllm import tiny

    per_dp = world // args.dp
    dp_rank = rank // per_dp
    llm = LLM(
        model=model_dir(args),
        skip_tokenizer_init=True,
        load_format="auto",
        dtype="float32",
        tensor_parallel_size=args.tp,
        pipeline_parallel_size=args.pp,
        data_parallel_size=args.dp,
        enable_expert_parallel=args.ep,
        distributed_executor_backend="external_launcher" if world > 1 else None,
        max_model_len=256,
        max_num_seqs=max(1, args.prompts),
        enforce_eager=not args.compile,
        seed=0,
    )
    every = tiny.prompts(args.prompts, vocab=tiny.CONFIGS[args.model]["vocab_size"])
    mine = list(range(dp_rank, len(every), args.dp))
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    batch = [TokensPrompt(prompt_token_ids=every[i]) for i in mine]
    outputs = llm.generate(batch, params, use_tqdm=False)  # first run: warm-up
    seconds = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        outputs = llm.generate(batch, params, use_tqdm=False)
        seconds.append(time.perf_counter() - t0)
    ids = {i: list(o.outputs[0].token_ids) for i, o in zip(mine, outputs, strict=True)}
    return {
        "ids": ids,
        "seconds": seconds,
        "tokens": args.tokens * len(every),
        "served_by": tiny.served_by() if world > 1 else {},
    }


def main(argv=None) -> int:
    args = parse(argv)
    from mpicomm.vllm import tiny

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.one_rank or world == 1:
        # --one-rank: the reference. One process without --one-rank: vLLM's own executor and
        # communicator (its mp workers for tp/pp > 1), e.g. for comparisons with vLLM native.
        if args.one_rank:
            args.tp = args.pp = args.dp = 1
            args.ep = False
        elif args.dp > 1:
            print("--dp needs one process per rank: launch under mpiexec/srun", file=sys.stderr)
            return 2
        tiny.make_checkpoint(args.model, model_dir(args), hidden_size=args.hidden)
        out = generate(args, 1, 0)
        tiny.print_result({"ids": [out["ids"][i] for i in sorted(out["ids"])], **_rate(out)})
        return 0
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    if args.tp * args.pp * args.dp != world:
        if rank == 0:
            print(f"tp*pp*dp = {args.tp * args.pp * args.dp} != {world} ranks", file=sys.stderr)
        return 2
    if rank == 0:
        tiny.make_checkpoint(args.model, model_dir(args), hidden_size=args.hidden)
    tiny.wait(comm)
    out = generate(args, world, rank)
    merged: dict[int, list[int]] = {}
    for part in comm.allgather(out["ids"]):
        merged.update(part)
    ids = [merged[i] for i in sorted(merged)]
    # The one-rank reference runs after the parallel run, so that a first run (empty vLLM
    # cache) is the user's parallel run, not the reference's (docs/vllm.md, "First run of a model").
    ref = None
    if rank == 0 and not args.no_check:
        child = [os.path.abspath(__file__), "--one-rank", *(argv or sys.argv[1:])]
        ref = tiny.cached_reference(child, _reference_file(args))
    tiny.wait(comm)
    result = {
        "rank": rank,
        "host": socket.gethostname(),
        "ids": ids,
        "served_by": out["served_by"],
        **_rate(out),
    }
    same = ref is None or ids == ref["ids"]
    if rank == 0:
        if ref is not None:
            result["one_rank"] = _rate(ref)
        verdict = "skipped" if ref is None else ("IDENTICAL" if same else "DIFFERENT")
        print(
            f"VERDICT: token ids of tp={args.tp} pp={args.pp} dp={args.dp} ep={args.ep} "
            f"({args.model}, {world} ranks) vs one rank: {verdict}",
            flush=True,
        )
    tiny.print_result(result)
    return 0 if comm.bcast(same, root=0) else 1


def _reference_file(args) -> str:
    """Where the one-rank ids of this model, prompt set and length are kept for later runs."""
    return os.path.join(model_dir(args), f"one-rank-p{args.prompts}-t{args.tokens}.json")


def _rate(out: dict) -> dict:
    """Tokens/s of the best timed generation (every prompt's generated tokens, all ranks)."""
    if "tokens_per_s" in out:
        return {"tokens_per_s": out["tokens_per_s"]}
    best = min(out["seconds"])
    return {"tokens_per_s": out["tokens"] / best, "seconds": out["seconds"]}


if __name__ == "__main__":  # vLLM CPU starts helper processes by spawning: the guard is required
    sys.exit(main())
