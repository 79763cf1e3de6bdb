"""tests/conftest.py's clean-up of the /dev/shm files MPICH leaves for jobs the tests kill."""

from __future__ import annotations

import uuid

import pytest

from tests.conftest import SHM, in_use, stale_segments

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
        assert in_use({segment.name}) == {segment.name}
        assert segment.name not in stale_segments(set())


def test_files_from_before_the_session_are_kept(segment):
    assert segment.name not in stale_segments({segment.name})
