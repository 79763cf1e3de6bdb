"""The layering rules of docs/architecture.md, checked on the source."""

from __future__ import annotations

import ast
import os
import pathlib
import re
import subprocess
import sys

import pytest

import mpicomm
from tests.helpers import LAUNCHERS, LAUNCHING_HELPERS, mpicomm_info

PACKAGE = pathlib.Path(mpicomm.__file__).parent


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: pathlib.Path, modules: dict) -> set[str]:
    """mpicomm modules ``name`` imports at run time (``if TYPE_CHECKING:`` blocks left out)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                found.add(full if full in modules else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in modules and m != name}


def test_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # A package's __init__ re-exporting its submodules is not a cycle of the layers.
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)


def test_cycle_finder_sees_a_cycle(tmp_path, monkeypatch):
    """The check above can fail: two modules importing each other are reported."""
    pkg = tmp_path / "mpicomm"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("from .a import thing\n")
    monkeypatch.setattr(mpicomm, "__file__", str(pkg / "__init__.py"))
    monkeypatch.setattr(__import__(__name__, fromlist=["PACKAGE"]), "PACKAGE", pkg, raising=True)
    try:
        test_no_import_cycle()
    except AssertionError as exc:
        assert "mpicomm.a" in str(exc) and "mpicomm.b" in str(exc)
    else:
        raise AssertionError("a cycle between a.py and b.py went unnoticed")


# A communicator's private members: ``comm._x`` / ``self.comm._x`` anywhere but communicator.py.
_PRIVATE = re.compile(r"\b(?:comm|communicator|c)\._[a-z]\w*")


def test_no_private_access_outside_the_communicator():
    offenders = []
    for name, path in _modules().items():
        if name == "mpicomm.communicator":
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if _PRIVATE.search(line):
                offenders.append(f"{path.name}:{lineno}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_every_setting_is_read_in_config():
    readers = []
    for name, path in _modules().items():
        if name == "mpicomm.config":
            continue
        text = path.read_text()
        for match in re.finditer(r"environ(?:\.get)?\(?\[?\s*[\"'](MPICOMM_\w+)", text):
            readers.append(f"{name}: {match.group(1)}")
        for match in re.finditer(r"getenv\(\s*[\"'](MPICOMM_\w+)", text):
            readers.append(f"{name}: {match.group(1)}")
    # Writing a variable for a child process (setdefault) is not parsing it.
    readers = [r for r in readers if "setdefault" not in r]
    assert not readers, readers


def test_long_modules_say_why():
    for name, path in _modules().items():
        lines = path.read_text().splitlines()
        if len(lines) > 420:
            head = "\n".join(lines[:20]).lower()
            assert "lines" in head, f"{name} has {len(lines)} lines and no reason at its top"


def test_no_tracker_references_in_code():
    pattern = re.compile(r"\b[Ii]ssue\s+#?\d+|\b[Tt]icket\s+#?\d+|DESIGN\.md|CONTRACT\.md")
    bad = [
        f"{p.name}: {m.group(0)}"
        for p in _modules().values()
        for m in pattern.finditer(p.read_text())
    ]
    assert not bad, bad


# docs/architecture.md, "Modules": one row per file of the package (``shm/transport.py``) and per
# subpackage (``shm/``); ``__init__.py`` and ``__main__.py`` files are their package's row.
DOC = PACKAGE.parent / "docs" / "architecture.md"
_ROW = re.compile(r"^\|\s*`([\w/.]+)`\s*\|")


def _documented_modules(text: str) -> set[str]:
    section = text.split("\n## Modules\n", 1)[1].split("\n## ", 1)[0]
    return {m.group(1) for line in section.splitlines() if (m := _ROW.match(line))}


def _tree_modules(package: pathlib.Path) -> set[str]:
    found = set()
    for path in package.rglob("*"):
        rel = path.relative_to(package).as_posix()
        if "__pycache__" in rel:
            continue
        if path.is_dir():
            found.add(rel + "/")
        elif path.suffix in (".py", ".c", ".h") and path.name not in ("__init__.py", "__main__.py"):
            found.add(rel)
    return found


def test_module_table_matches_the_tree():
    documented, tree = _documented_modules(DOC.read_text()), _tree_modules(PACKAGE)
    assert not tree - documented, f"missing from docs/architecture.md: {sorted(tree - documented)}"
    assert not documented - tree, (
        f"in docs/architecture.md, not in the tree: {sorted(documented - tree)}"
    )


def test_module_table_check_can_fail(tmp_path):
    """The comparison above notices a module the table leaves out."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "thing.py").write_text("")
    (tmp_path / "other.py").write_text("")
    doc = "# A\n\n## Modules\n\n| module | what |\n|---|---|\n| `sub/` | x |\n| `other.py` | y |\n\n## Next\n"
    assert _tree_modules(tmp_path) - _documented_modules(doc) == {"sub/thing.py"}


# docs/architecture.md, "Tests": tests/unit runs in one process. Its conftest refuses a launch when
# a test runs; this scan also sees the tests that are skipped here (a missing extra, no mpiexec).
UNIT = PACKAGE.parent / "tests" / "unit"
_LAUNCHING = {*LAUNCHING_HELPERS, *LAUNCHERS}


def _launches(source: str) -> set[str]:
    """What in ``source`` would start a job of ranks: a launching helper of tests/helpers.py
    imported, called or looked up, or a launcher's name as a string of its own (a command's
    argument)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.Name):
            names = [node.id]
        elif isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [os.path.basename(node.value)]
        else:
            continue
        found.update(f"line {node.lineno}: {n}" for n in names if n in _LAUNCHING)
    return found


def test_unit_tests_start_no_job():
    found = [
        f"{p.name} {hit}" for p in sorted(UNIT.glob("*.py")) for hit in _launches(p.read_text())
    ]
    assert not found, "tests/unit runs in one process; move to tests/jobs/:\n" + "\n".join(found)


def test_launch_scan_can_fail():
    """The scan above notices a helper imported or looked up, and a launcher as an argument."""
    source = (
        "from tests.helpers import ROOT, run_mpi\n"
        'proc = subprocess.run(["timeout", "9", "mpiexec", "-n", "2", "x.py"])\n'
        "helpers.start_mpi(2, output=ROOT)\n"
        '"""A docstring that says mpiexec is fine."""\n'
    )
    assert _launches(source) == {"line 1: run_mpi", "line 2: mpiexec", "line 3: start_mpi"}


def test_a_unit_test_cannot_start_a_job():
    """tests/unit/conftest.py fails a test that starts a launcher, before it starts: directly,
    under ``timeout``, as a shell line, through ``os.system``; one process still runs."""
    launcher = LAUNCHERS[0]
    commands = [
        [launcher, "-n", "2", sys.executable, "-c", "pass"],
        ["timeout", "5", f"/usr/bin/{launcher}", "-n", "2", "true"],
        f"timeout 5 {launcher} -n 2 true",
    ]
    for command in commands:
        with pytest.raises(pytest.fail.Exception, match="tests/unit runs in one process"):
            subprocess.run(command, shell=isinstance(command, str), timeout=30)
    with pytest.raises(pytest.fail.Exception, match="tests/unit runs in one process"):
        os.system(commands[-1])
    subprocess.run([sys.executable, "-c", "pass"], check=True, timeout=60)
    assert os.system(f"{sys.executable} -c pass") == 0


def test_a_unit_test_cannot_start_a_job_through_the_helpers():
    """The same through ``run_mpi`` (here by ``mpicomm_info`` on 2 ranks)."""
    with pytest.raises(pytest.fail.Exception, match="Move it to tests/jobs/"):
        mpicomm_info({}, ranks=2)


if __name__ == "__main__":  # pragma: no cover
    print(os.linesep.join(sorted(_modules())))
