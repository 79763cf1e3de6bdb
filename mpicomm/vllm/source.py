"""Reading the installed vLLM's source, for the fixes that patch it only where it needs them.

:mod:`mpicomm.vllm.expert_map` and :mod:`mpicomm.vllm.pipeline_fix` decide from a method's source
(with :mod:`ast`) whether the installed vLLM has the bug they fix; these two functions find that
method, from the live object or from a module's text.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

Function = ast.FunctionDef | ast.AsyncFunctionDef


def method_tree(method) -> Function | None:
    """The parsed definition of ``method``; ``None`` when its source cannot be read or parsed."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(method)))
    except (OSError, TypeError, SyntaxError, ValueError):
        return None
    func = tree.body[0] if tree.body else None
    return func if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


def class_method(source: str, cls: str, name: str) -> ast.FunctionDef | None:
    """Method ``name`` of class ``cls`` in module text ``source``; ``None`` when there is none."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == name:
                    return item
    return None
