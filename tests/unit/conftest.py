"""tests/unit runs in one process: a test here that starts a job of ranks (``mpiexec`` and the
other :data:`tests.helpers.LAUNCHERS`, directly, under ``timeout``, or through ``run_mpi`` and the
other launching helpers, or ``os.system``) fails before the job starts, saying where such a test
belongs."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.helpers import starts_a_job


class OneProcessPopen(subprocess.Popen):
    """``subprocess.Popen`` that refuses to start a launcher (``subprocess.run`` and
    ``check_output`` go through it)."""

    def __init__(self, args, *rest, **kwargs):
        refuse_a_job(args)
        super().__init__(args, *rest, **kwargs)


def refuse_a_job(args) -> None:
    """Fail the test if ``args`` (a command line or its list) starts a job of ranks."""
    if starts_a_job(args):
        command = args if isinstance(args, str) else " ".join(map(str, args))
        pytest.fail(
            f"tests/unit runs in one process, but this test starts a job: {command}\n"
            "Move it to tests/jobs/ (the file named like this one; docs/architecture.md, "
            '"Tests").'
        )


def one_process_system(command):
    """``os.system`` that refuses to start a launcher."""
    refuse_a_job(command)
    return _system(command)


_system = os.system


@pytest.fixture(autouse=True)
def one_process(monkeypatch):
    monkeypatch.setattr(subprocess, "Popen", OneProcessPopen)
    monkeypatch.setattr(os, "system", one_process_system)
