"""What many tests share: running a program under ``mpiexec``, and cross-rank checks.

``run_mpi`` is the one way a test starts ``mpiexec``: it finds the launcher (beside this Python,
else on ``PATH``), bounds the job with ``timeout``, and returns the finished process. The
``everywhere`` family is for tests that themselves run on every rank (``tests/mpi/``).

Import as ``from tests.helpers import run_mpi`` (pytest puts the repository root on ``sys.path``:
``pythonpath`` in pyproject.toml).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from mpi4py import MPI

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = ROOT / "tests" / "programs"
# The benchmark targets file the harness reads (``--targets``), and the first bytes of a PNG (the
# bench tests check the plots by them).
BENCH_TARGETS = ROOT / "benchmarks" / "targets.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Prefixes of the variables an MPI launcher sets for its ranks: a child job started from inside
# one must not see them (``drop=`` of child_env and run_mpi).
MPI_LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "HYDRA_", "MPIR_", "OMPI_")
# torch's launcher variables: a vLLM test job must not inherit them (mpicomm.vllm.launch sets
# them per rank).
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# Programs that start a job of ranks, and what below runs or finds one: tests/unit (one process)
# uses none of them (its conftest refuses a launch; its test_architecture scans its files).
LAUNCHERS = ("mpiexec", "mpirun", "srun")
LAUNCHING_HELPERS = (
    "run_mpi",
    "start_mpi",
    "mpi_command",
    "run_reporting",
    "find_mpiexec",
    "MPIEXEC",
)


def starts_a_job(args: str | bytes | os.PathLike | Iterable) -> bool:
    """Whether a ``subprocess`` command (``args`` as ``Popen`` takes them, a shell line too)
    runs one of :data:`LAUNCHERS`, directly or under another program such as ``timeout``."""
    if isinstance(args, (str, bytes, os.PathLike)):
        args = os.fsdecode(args).split()
    return any(os.path.basename(os.fsdecode(a)) in LAUNCHERS for a in args)


def find_mpiexec() -> str | None:
    """The ``mpiexec`` beside ``sys.executable`` (the venv's MPI), else the first on ``PATH``."""
    beside = Path(sys.executable).with_name("mpiexec")
    return str(beside) if beside.exists() else shutil.which("mpiexec")


MPIEXEC = find_mpiexec()


def child_env(
    set: Mapping[str, str | None] | None = None, drop: Iterable[str] = ()
) -> dict[str, str]:
    """This environment for a child job: the repository root first on ``PYTHONPATH``,
    ``OMP_NUM_THREADS=1``, variables starting with a prefix in ``drop`` removed, then ``set``
    applied (a ``None`` value removes the variable)."""
    drop = tuple(drop)
    env = {k: v for k, v in os.environ.items() if not (drop and k.startswith(drop))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    for key, value in (set or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


def run_mpi(
    n: int,
    *argv: str,
    timeout: float = 120,
    env: Mapping[str, str | None] | None = None,
    drop: Iterable[str] = (),
    cwd: Path | str = ROOT,
) -> subprocess.CompletedProcess:
    """``timeout -k 5 T mpiexec -n N python ARGV...``; the finished process (output captured).

    ``env`` and ``drop`` adjust the child's environment (:func:`child_env`). Skips the test where
    there is no ``mpiexec`` or pytest itself runs under one (a nested job would share its ranks).
    The output is printed when the job fails, so pytest shows it with the failure.
    """
    cmd = mpi_command(n, argv, timeout)
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        env=child_env(env, drop),
        capture_output=True,
        text=True,
        timeout=timeout + 30,
    )
    if proc.returncode != 0:
        print(f"$ {' '.join(cmd)}\nexit {proc.returncode}")
        print(proc.stdout[-6000:])
        print(proc.stderr[-6000:], file=sys.stderr)
    return proc


def mpi_command(n: int, argv: Iterable[str], timeout: float) -> list[str]:
    """``timeout -k 5 T mpiexec -n N python ARGV...``; skips the test where there is no
    ``mpiexec`` or pytest itself runs under one (a nested job would share its ranks)."""
    if MPIEXEC is None:
        pytest.skip("no mpiexec beside this python or on PATH")
    if MPI.COMM_WORLD.Get_size() > 1:
        pytest.skip("starts its own mpiexec: run this test in a one-process pytest")
    return ["timeout", "-k", "5", f"{timeout:g}", MPIEXEC, "-n", str(n), sys.executable, *argv]


def start_mpi(
    n: int,
    *argv: str,
    output: Path,
    timeout: float = 120,
    env: Mapping[str, str | None] | None = None,
    drop: Iterable[str] = (),
    cwd: Path | str = ROOT,
) -> subprocess.Popen:
    """:func:`run_mpi` without waiting: the job's output (stdout and stderr) goes to ``output``;
    for servers. The caller ends it (``timeout`` bounds it in any case)."""
    with open(output, "wb") as sink:
        return subprocess.Popen(
            mpi_command(n, argv, timeout),
            cwd=cwd,
            env=child_env(env, drop),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )


def vllm_entry_point(folder: Path) -> str | None:
    """A folder (inside ``folder``) holding a dist-info that registers mpicomm's
    ``vllm.platform_plugins`` entry point, to put on ``PYTHONPATH`` where mpicomm is importable
    but not installed; ``None`` where this python already has the entry point."""
    import importlib.metadata

    eps = importlib.metadata.entry_points(group="vllm.platform_plugins")
    if any(ep.value == "mpicomm.vllm:register" for ep in eps):
        return None
    info = folder / "entry-point" / "mpicomm_vllm_entry-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mpicomm-vllm-entry\nVersion: 0\n")
    (info / "entry_points.txt").write_text(
        "[vllm.platform_plugins]\nmpicomm = mpicomm.vllm:register\n"
    )
    return str(info.parent)


def run_reporting(
    n: int, script: Path, *args: str, marker: str, timeout: float, env: Mapping[str, str | None]
) -> str:
    """Run a test program on ``n`` ranks whose every rank prints ``<marker> rank=R`` when its
    checks pass; assert that the job exited 0 and every rank reported, and return the output
    (failures show it without vLLM's INFO lines)."""
    proc = run_mpi(n, str(script), *args, timeout=timeout, env=env)
    out = proc.stdout + proc.stderr
    tail = "\n".join(line for line in out.splitlines() if "INFO" not in line)[-6000:]
    assert proc.returncode == 0, f"{' '.join(proc.args)} exited {proc.returncode}:\n{tail}"
    # mpiexec may interleave two ranks' lines: find each rank's marker anywhere in the output.
    oks = set(re.findall(rf"{marker} rank=(\d+)", out))
    assert oks == {str(r) for r in range(n)}, f"ranks {sorted(oks)} of {n} reported OK:\n{tail}"
    return out


def mpicomm_info(env: Mapping[str, str | None], ranks: int = 1) -> str:
    """The output of ``python -m mpicomm info`` (under mpiexec for ``ranks`` > 1) with ``env`` set
    and no launcher or ``MPICOMM_`` variables otherwise, so the child starts its own MPI; asserts
    that it exited 0."""
    cmd = [sys.executable, "-m", "mpicomm", "info"]
    drop = (*MPI_LAUNCHER_PREFIXES, "MPICOMM_")
    if ranks > 1:
        done = run_mpi(ranks, *cmd[1:], timeout=100, env=env, drop=drop)
    else:
        env = child_env(env, drop=drop)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def report_line(text: str, key: str) -> str:
    """What follows ``key`` on the one line of ``text`` (a ``python -m mpicomm info`` report) that
    starts with it; fails unless exactly one line does."""
    lines = [line for line in text.splitlines() if line.startswith(key)]
    assert len(lines) == 1, text
    return lines[0][len(key) :].strip()


# --- for tests that run on every rank of a job (tests/mpi/) -----------------------------------


def everywhere(flag: bool) -> bool:
    """True only if ``flag`` holds on every rank: failures then happen on all ranks together,
    so no rank runs ahead into a collective the others never enter."""
    out = np.zeros(1, dtype=np.int32)
    MPI.COMM_WORLD.Allreduce(np.array([int(bool(flag))], dtype=np.int32), out, op=MPI.MIN)
    return bool(out[0])


def bits(t: torch.Tensor) -> bytes:
    """The raw bytes of ``t`` in logical order, whatever its strides or dtype."""
    flat = t.contiguous().reshape(-1)
    return flat.as_strided((flat.numel(),), (1,)).view(torch.uint8).numpy().tobytes()


def same_bits_everywhere(t: torch.Tensor) -> bool:
    return len(set(MPI.COMM_WORLD.allgather(bits(t)))) == 1
