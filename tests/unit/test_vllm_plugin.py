"""mpicomm.vllm entry point and launcher mapping: single process, vLLM not needed."""

from __future__ import annotations

import pytest
import torch

import mpicomm.vllm as mv
from mpicomm.vllm import launch
from tests.helpers import ROOT


@pytest.mark.parametrize("value", ["", "0", "false", "no"])
def test_register_returns_none_unless_enabled(monkeypatch, value):
    monkeypatch.setenv("MPICOMM_VLLM", value)
    assert mv.register() is None


@pytest.mark.parametrize(("device", "want"), [("cpu", mv.CPU_PLATFORM), ("cuda", mv.CUDA_PLATFORM)])
def test_register_returns_the_platform_when_enabled(monkeypatch, device, want):
    monkeypatch.setenv("MPICOMM_VLLM", "1")
    monkeypatch.setenv("MPICOMM_VLLM_DEVICE", device)
    assert mv.register() == want


def test_register_rejects_an_unknown_device(monkeypatch):
    monkeypatch.setenv("MPICOMM_VLLM", "1")
    monkeypatch.setenv("MPICOMM_VLLM_DEVICE", "tpu")
    with pytest.raises(SystemExit, match="MPICOMM_VLLM_DEVICE"):
        mv.register()


@pytest.mark.parametrize("value", ["yes-please", "2", "on!"])
def test_register_ends_the_process_on_a_malformed_switch(monkeypatch, value):
    """vLLM swallows a plugin's exceptions (stock vLLM on gloo, silently): SystemExit it is not."""
    monkeypatch.setenv("MPICOMM_VLLM", value)
    with pytest.raises(SystemExit, match="MPICOMM_VLLM must be"):
        mv.register()
    assert not issubclass(SystemExit, Exception)


def test_entry_point_is_declared_in_setup_cfg():
    text = (ROOT / "setup.cfg").read_text()
    assert "vllm.platform_plugins" in text
    assert "mpicomm = mpicomm.vllm:register" in text


@pytest.mark.parametrize(
    ("environ", "want"),
    [
        (
            {
                "OMPI_COMM_WORLD_RANK": "3",
                "OMPI_COMM_WORLD_SIZE": "4",
                "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            },
            {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"},
        ),
        (
            {"PMI_RANK": "2", "PMI_SIZE": "8", "MPI_LOCALRANKID": "0"},
            {"RANK": "2", "WORLD_SIZE": "8", "LOCAL_RANK": "0"},
        ),
        (
            {"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "2", "SLURM_STEP_ID": "0"},
            {"RANK": "5", "WORLD_SIZE": "6", "LOCAL_RANK": "2"},
        ),
        ({"PMI_RANK": "1", "PMI_SIZE": "2"}, {"RANK": "1", "WORLD_SIZE": "2"}),
        ({"HOME": "/root"}, None),
    ],
)
def test_torch_env_from_launcher(environ, want):
    assert launch.torch_env_from_launcher(environ) == want


def test_torch_env_from_mpi_single_process(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    from mpi4py import MPI

    env = launch.torch_env_from_mpi(MPI.COMM_SELF)
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "1" and env["LOCAL_RANK"] == "0"
    assert env["MASTER_ADDR"] == "127.0.0.1"
    assert 0 < int(env["MASTER_PORT"]) < 65536


def test_export_replaces_a_stale_rank(monkeypatch):
    from mpi4py import MPI

    from mpicomm.launch import LaunchWarning

    monkeypatch.setenv("RANK", "7")
    with pytest.warns(LaunchWarning, match="RANK=7"):
        env = launch.export_torch_env(MPI.COMM_SELF)
    import os

    assert env["RANK"] == os.environ["RANK"] == "0"


def test_launch_wrapper_runs_a_script_with_the_variables(tmp_path, monkeypatch, capsys):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MPICOMM_VLLM"):
        monkeypatch.delenv(key, raising=False)
    script = tmp_path / "show.py"
    script.write_text(
        "import os, sys\n"
        "print('SEEN', os.environ['RANK'], os.environ['WORLD_SIZE'], os.environ['MPICOMM_VLLM'],"
        " sys.argv[1:])\n"
    )
    from mpi4py import MPI

    assert launch.main([str(script), "--flag"]) == 0  # collective: every rank runs this test
    rank, size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    assert f"SEEN {rank} {size} 1 ['--flag']" in capsys.readouterr().out


# --- the expert-id mapping for vLLM CPU's MoE experts (mpicomm.vllm.expert_map) -----------------


class _IgnoresMap:
    """Stand-in for vLLM CPU's CPUUnquantizedExperts: ``apply`` never reads ``expert_map``."""

    def apply(self, output, topk_weights, topk_ids, global_num_experts, expert_map, flag):
        args = dict(locals())  # records the map without reading it by name
        self.seen = (topk_weights.clone(), topk_ids.clone(), args["expert_map"])
        return output


class _HonoursMap:
    """A class whose ``apply`` uses the map (as a fixed vLLM would)."""

    def apply(self, output, topk_weights, topk_ids, global_num_experts, expert_map, flag):
        if expert_map is not None:
            topk_ids = expert_map[topk_ids]
        self.seen = (topk_weights, topk_ids, expert_map)
        return output


def _fresh(cls):
    return type(cls.__name__, (cls,), {"apply": cls.__dict__["apply"]})


def test_map_topk_maps_ids_and_zeroes_experts_held_elsewhere():
    from mpicomm.vllm.expert_map import map_topk

    expert_map = torch.tensor([-1, -1, 0, 1], dtype=torch.int32)  # this rank holds experts 2, 3
    ids = torch.tensor([[0, 2], [3, 1], [2, 3]], dtype=torch.int32)
    weights = torch.tensor([[0.25, 0.75], [0.5, 0.5], [0.1, 0.9]])
    ids_before, weights_before = ids.clone(), weights.clone()
    w, i = map_topk(weights, ids, expert_map)
    assert i.tolist() == [[0, 0], [1, 0], [0, 1]]
    assert i.dtype == ids.dtype and w.dtype == weights.dtype
    assert torch.equal(w, torch.tensor([[0.0, 0.75], [0.5, 0.0], [0.1, 0.9]]))
    assert torch.equal(ids, ids_before) and torch.equal(weights, weights_before)


def test_install_patches_an_apply_that_ignores_the_map(monkeypatch, caplog):
    from mpicomm.vllm import expert_map as em

    monkeypatch.delenv("MPICOMM_VLLM_EXPERT_MAP_FIX", raising=False)
    cls = _fresh(_IgnoresMap)
    assert em.ignores_expert_map(cls.apply)
    with caplog.at_level("WARNING", logger="mpicomm.vllm.expert_map"):
        assert em.install(cls) is True
        assert em.install(cls) is True  # idempotent: patched once, logged once
    assert sum("ignores expert_map" in r.getMessage() for r in caplog.records) == 1
    obj = cls()
    emap = torch.tensor([-1, -1, 0, 1], dtype=torch.int32)
    ids = torch.tensor([[0, 3]], dtype=torch.int64)
    obj.apply("out", torch.tensor([[0.4, 0.6]]), ids, 4, emap, flag=True)
    w, i, m = obj.seen
    assert i.tolist() == [[0, 1]] and w.tolist() == [[0.0, 0.6000000238418579]] and m is None
    obj.apply("out", torch.tensor([[0.4, 0.6]]), ids, 4, None, flag=True)  # no map: unchanged
    assert obj.seen[1].tolist() == [[0, 3]]


def test_install_leaves_an_apply_that_honours_the_map(monkeypatch):
    from mpicomm.vllm import expert_map as em

    monkeypatch.delenv("MPICOMM_VLLM_EXPERT_MAP_FIX", raising=False)
    cls = _fresh(_HonoursMap)
    original = cls.__dict__["apply"]
    assert not em.ignores_expert_map(original)
    assert em.install(cls) is False
    assert cls.__dict__["apply"] is original


def test_install_is_turned_off_by_the_setting(monkeypatch):
    from mpicomm.vllm import expert_map as em

    monkeypatch.setenv("MPICOMM_VLLM_EXPERT_MAP_FIX", "0")
    cls = _fresh(_IgnoresMap)
    original = cls.__dict__["apply"]
    assert em.install(cls) is False
    assert cls.__dict__["apply"] is original
    monkeypatch.setenv("MPICOMM_VLLM_EXPERT_MAP_FIX", "maybe")
    with pytest.raises(ValueError, match="MPICOMM_VLLM_EXPERT_MAP_FIX"):
        em.install(cls)


def test_a_function_without_readable_source_is_not_patched():
    from mpicomm.vllm import expert_map as em

    namespace: dict = {}
    exec("def apply(topk_weights, topk_ids, expert_map):\n    return 1\n", namespace)
    assert em.ignores_expert_map(namespace["apply"]) is False
    assert em.ignores_expert_map(len) is False


def test_target_device_cpu_is_reported(recwarn):
    from mpicomm.launch import LaunchWarning

    assert launch.environment_problems({}) == []
    problems = launch.environment_problems({"VLLM_TARGET_DEVICE": "cpu"})
    assert len(problems) == 1 and "skip platform plugins" in problems[0]
    launch.warn_environment({"VLLM_TARGET_DEVICE": "CPU"})
    assert any(issubclass(w.category, LaunchWarning) for w in recwarn.list)


def test_tiny_single_process_env_drops_the_launcher_variables():
    from mpicomm.vllm import tiny

    env = tiny.single_process_env(
        {"PMI_RANK": "1", "HYDRA_X": "y", "RANK": "1", "MPICOMM_VLLM": "1", "PATH": "/bin"}
    )
    assert env == {"PATH": "/bin", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    assert tiny.parse_results('x\nrank0: VLLM_RESULT {"a": 1}\n') == [{"a": 1}]
    # two ranks' results joined on one line by the launcher, text glued before and after
    joined = 'VERDICT: IDENTICALVLLM_RESULT {"a": [1]}VLLM_RESULT {"b": 2}[rank 0] bye\n'
    assert tiny.parse_results(joined) == [{"a": [1]}, {"b": 2}]
    assert tiny.prompts(2, 5) == tiny.prompts(2, 5) and len(tiny.prompts(2, 5)[1]) == 5


def test_vllm_host_ip_is_set_only_across_hosts():
    env = {"MASTER_ADDR": "127.0.0.1"}
    assert launch.export_vllm_host_ip(env) is None and "VLLM_HOST_IP" not in env
    env = {"MASTER_ADDR": "10.9.8.7", "VLLM_HOST_IP": "10.0.0.5"}
    assert launch.export_vllm_host_ip(env) is None and env["VLLM_HOST_IP"] == "10.0.0.5"
    env = {"MASTER_ADDR": "192.0.2.1"}  # TEST-NET-1: routed (or not) but never contacted
    ip = launch.export_vllm_host_ip(env)
    assert ip is None or env["VLLM_HOST_IP"] == ip != "0.0.0.0"


def test_source_ignores_expert_map_reads_a_module_text():
    import inspect as _inspect

    from mpicomm.vllm.expert_map import source_ignores_expert_map

    module = _inspect.getsource(_IgnoresMap) + "\n" + _inspect.getsource(_HonoursMap)
    assert source_ignores_expert_map(module, "_IgnoresMap") is True
    assert source_ignores_expert_map(module, "_HonoursMap") is False
    assert source_ignores_expert_map(module, "Absent") is None


def test_every_counted_method_has_a_count():
    """``calls`` is a plain dict of ``SERVED`` names: every name the communicator counts (a
    literal ``self.calls[...]`` or a name handed to ``_dispatch``) must be one of them, or the
    call would raise KeyError (the module imports vLLM, so its text is read here)."""
    import ast
    import re

    from mpicomm.consistency import COLLECTIVES

    text = (ROOT / "mpicomm" / "vllm" / "communicator.py").read_text()
    items = next(
        node.value.elts
        for node in ast.parse(text).body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "SERVED"
    )
    served = set()
    for item in items:  # string literals, and *COLLECTIVES
        is_collectives = isinstance(item, ast.Starred) and item.value.id == "COLLECTIVES"
        served |= set(COLLECTIVES) if is_collectives else {ast.literal_eval(item)}
    counted = set(re.findall(r'self\.calls\["(\w+)"\]', text))
    counted |= set(re.findall(r'self\._dispatch\(\s*"(\w+)"', text))
    assert {"all_reduce", "dispatch", "dispatch_router_logits", "combine"} <= counted
    assert counted <= served


# --- the launcher around vLLM: MPICOMM_VLLM, the platform choice, the groups at exit ----------


def test_export_torch_env_asks_for_mpicomm_unless_told_otherwise(monkeypatch):
    import os

    from mpi4py import MPI

    monkeypatch.delenv("MPICOMM_VLLM", raising=False)
    launch.export_torch_env(MPI.COMM_SELF)
    assert os.environ["MPICOMM_VLLM"] == "1"
    monkeypatch.setenv("MPICOMM_VLLM", "0")
    launch.export_torch_env(MPI.COMM_SELF)
    assert os.environ["MPICOMM_VLLM"] == "0"


class _VllmPlatform:  # stands for a platform vLLM chose itself (not mpicomm's)
    pass


def _fake_vllm_module(monkeypatch, name: str, **attrs):
    import sys
    import types

    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_export_warns_when_vllm_chose_its_platform_already(monkeypatch):
    from mpi4py import MPI

    from mpicomm.launch import LaunchWarning

    monkeypatch.delenv("MPICOMM_VLLM", raising=False)
    _fake_vllm_module(monkeypatch, "vllm.platforms", _current_platform=_VllmPlatform())
    with pytest.warns(LaunchWarning, match=r"already chose its platform \(_VllmPlatform\)"):
        launch.export_torch_env(MPI.COMM_SELF)


def test_no_platform_warning_before_vllm_chooses_or_when_mpicomm_is_off(monkeypatch, recwarn):
    _fake_vllm_module(monkeypatch, "vllm.platforms", _current_platform=None)
    monkeypatch.setenv("MPICOMM_VLLM", "1")
    assert launch.platform_chosen_without_mpicomm() is None
    _fake_vllm_module(monkeypatch, "vllm.platforms", _current_platform=_VllmPlatform())
    assert launch.platform_chosen_without_mpicomm() == "_VllmPlatform"
    monkeypatch.setenv("MPICOMM_VLLM", "0")
    assert launch.platform_chosen_without_mpicomm() is None


def _fake_parallel_state(monkeypatch) -> list[str]:
    """A stand-in for vLLM's parallel_state whose two destroy functions record their calls."""
    calls: list[str] = []
    _fake_vllm_module(
        monkeypatch,
        "vllm.distributed.parallel_state",
        _WORLD=object(),
        destroy_model_parallel=lambda: calls.append("model_parallel"),
        destroy_distributed_environment=lambda: calls.append("distributed_environment"),
    )
    return calls


@pytest.mark.parametrize("body", ["pass", "raise SystemExit(0)"])
def test_launcher_destroys_vllm_groups_after_a_clean_run(tmp_path, monkeypatch, body):
    calls = _fake_parallel_state(monkeypatch)
    script = tmp_path / "app.py"
    script.write_text(body + "\n")
    if body == "pass":
        assert launch.main([str(script)]) == 0
    else:
        with pytest.raises(SystemExit):
            launch.main([str(script)])
    assert calls == ["model_parallel", "distributed_environment"]


def test_launcher_leaves_vllm_groups_after_a_failed_run(tmp_path, monkeypatch):
    calls = _fake_parallel_state(monkeypatch)
    script = tmp_path / "app.py"
    script.write_text("raise SystemExit(3)\n")
    with pytest.raises(SystemExit):
        launch.main([str(script)])
    assert calls == []  # a rank that failed must not enter collectives the others may skip
    assert launch.destroy_vllm_groups() is True and len(calls) == 2
    _fake_vllm_module(monkeypatch, "vllm.distributed.parallel_state", _WORLD=None)
    assert launch.destroy_vllm_groups() is False


# --- the eager-mode pipeline buffer for vLLM CPU (mpicomm.vllm.pipeline_fix) --------------------


class _Intermediate(dict):
    pass


class _Model:
    def make_empty_intermediate_tensors(self, batch_size, dtype, device):
        return _Intermediate(hidden_states=torch.zeros(batch_size, 4, dtype=dtype, device=device))


class _AssertsBuffer:
    """Stand-in for vLLM's model runner: the method asserts on a buffer it never allocates."""

    def __init__(self):
        self.intermediate_tensors = None
        self.model = _Model()
        self.max_num_tokens = 8
        self.device = torch.device("cpu")
        self.model_config = type("C", (), {"dtype": torch.float32})()

    def sync_and_gather_intermediate_tensors(self, num_tokens, intermediate_tensors, sync_self):
        assert self.intermediate_tensors is not None
        return {k: v[:num_tokens] for k, v in self.intermediate_tensors.items()}


class _AllocatesBuffer(_AssertsBuffer):
    def sync_and_gather_intermediate_tensors(self, num_tokens, intermediate_tensors, sync_self):
        if self.intermediate_tensors is None:
            self.intermediate_tensors = {"hidden_states": torch.zeros(8, 4)}
        assert self.intermediate_tensors is not None
        return {k: v[:num_tokens] for k, v in self.intermediate_tensors.items()}


def test_pipeline_fix_allocates_a_missing_buffer_once(monkeypatch, caplog):
    from mpicomm.vllm import pipeline_fix as pf

    monkeypatch.delenv("MPICOMM_VLLM_PP_FIX", raising=False)
    cls = type("Runner", (_AssertsBuffer,), {})
    cls.sync_and_gather_intermediate_tensors = _AssertsBuffer.sync_and_gather_intermediate_tensors
    with pytest.raises(AssertionError):  # the bug, as vLLM CPU 0.32 has it in eager mode
        cls().sync_and_gather_intermediate_tensors(3, None, False)
    assert pf.asserts_without_allocating(cls.sync_and_gather_intermediate_tensors)
    with caplog.at_level("WARNING", logger="mpicomm.vllm.pipeline_fix"):
        assert pf.install(cls) is True
        assert pf.install(cls) is True  # idempotent: patched once, logged once
    assert sum("warm-up" in r.getMessage() for r in caplog.records) == 1
    runner = cls()
    out = runner.sync_and_gather_intermediate_tensors(3, None, False)
    assert out["hidden_states"].shape == (3, 4) and out["hidden_states"].dtype == torch.float32
    buffer = runner.intermediate_tensors
    runner.sync_and_gather_intermediate_tensors(5, None, False)
    assert runner.intermediate_tensors is buffer  # allocated once, then reused


def test_pipeline_fix_leaves_a_runner_that_allocates(monkeypatch):
    from mpicomm.vllm import pipeline_fix as pf

    monkeypatch.delenv("MPICOMM_VLLM_PP_FIX", raising=False)
    cls = type("Runner", (_AllocatesBuffer,), {})
    original = cls.sync_and_gather_intermediate_tensors
    assert not pf.asserts_without_allocating(original)
    assert pf.install(cls) is False
    assert cls.sync_and_gather_intermediate_tensors is original


def test_pipeline_fix_is_turned_off_by_the_setting(monkeypatch):
    from mpicomm.vllm import pipeline_fix as pf

    monkeypatch.setenv("MPICOMM_VLLM_PP_FIX", "0")
    cls = type("Runner", (_AssertsBuffer,), {})
    assert pf.install(cls) is False
    with pytest.raises(AssertionError):
        cls().sync_and_gather_intermediate_tensors(3, None, False)
