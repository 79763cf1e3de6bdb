"""tests/shm_files.py: which /dev/shm files MPICH left for jobs the tests killed (tests/conftest.py
removes them at the end of each session)."""

from __future__ import annotations

import os
import uuid

import pytest

from tests.shm_files import SHM, shm_of, stale_segments

pytestmark = pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm here")


@pytest.fixture
def segment():
    path = SHM / f"mpich_shm_test_{uuid.uuid4().hex[:8]}_0"
    path.write_bytes(b"\0" * 64)
    yield path
    path.unlink(missing_ok=True)


def test_a_file_nobody_holds_is_stale_one_held_open_is_not(segment):
    assert segment.name in stale_segments(set())
    with open(segment, "rb"):
        assert segment.name in shm_of([os.getpid()]) and segment.name in shm_of(None)
        assert segment.name not in stale_segments(set())


def test_files_from_before_the_session_are_kept(segment):
    assert segment.name not in stale_segments({segment.name})
