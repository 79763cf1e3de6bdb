"""mpicomm.consistency in one process: fingerprints, their description, which fields differ, and
agree() on COMM_SELF and on a stand-in two-rank exchange (to see the message ranks get)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mpi4py import MPI

from mpicomm.calls import Caller
from mpicomm.consistency import ANY, WIDTH, agree, describe, differences, fingerprint


def test_fingerprint_row_is_fixed_width_and_names_the_call():
    fp = fingerprint("all_gather", torch.zeros(4, 8), dim=1)
    assert fp.row.dtype == np.int64 and fp.row.shape == (WIDTH,)
    # ndim, dim, root (none), sizes (none), then the shape padded with -1
    assert fp.row[2:].tolist() == [2, 1, -1, -1, 4, 8] + [-1] * (WIDTH - 8)
    assert fp.sizes is None
    same = fingerprint("all_gather", torch.ones(4, 8), dim=1)
    assert np.array_equal(fp.row, same.row)  # values do not matter, only the call
    for other in (
        fingerprint("all_reduce", torch.zeros(4, 8), dim=1),
        fingerprint("all_gather", torch.zeros(4, 8, dtype=torch.bfloat16), dim=1),
        fingerprint("all_gather", torch.zeros(4, 8), dim=0),
        fingerprint("all_gather", torch.zeros(8, 4), dim=1),
        fingerprint("all_gather", torch.zeros(4, 8), dim=1, root=0),
        fingerprint("all_gather", torch.zeros(4, 8), dim=1, sizes=[4]),
    ):
        assert not np.array_equal(fp.row, other.row)


def test_describe_in_words():
    assert describe(fingerprint("all_gather", torch.zeros(4, 8), dim=1).row) == (
        "all_gather(float32[4, 8], dim=1)"
    )
    # all_reduce and broadcast take no dim: none is shown
    assert describe(fingerprint("all_reduce", torch.zeros(3, dtype=torch.bfloat16)).row) == (
        "all_reduce(bfloat16[3])"
    )
    row = fingerprint("broadcast", torch.zeros(2, 2, dtype=torch.int64), root=1).row
    assert describe(row) == "broadcast(int64[2, 2], root=1)"
    assert describe(fingerprint("gather", torch.zeros(())).row) == "gather(float32[], dim=-1)"


def test_sizes_shown_as_a_list_or_a_hash():
    fp = fingerprint("reduce_scatterv", torch.zeros(6, 2), dim=0, sizes=[2, 4])
    assert fp.sizes == [2, 4]
    assert describe(fp.row, fp.sizes) == "reduce_scatterv(float32[6, 2], dim=0, sizes=[2, 4])"
    text = describe(fp.row)
    assert text.startswith("reduce_scatterv(float32[6, 2], dim=0, sizes#") and text.endswith(")")
    assert int(text.split("#")[1][:-1], 16) == fp.row[5]
    other = fingerprint("reduce_scatterv", torch.zeros(6, 2), dim=0, sizes=[4, 2])
    assert other.row[5] != fp.row[5]


def test_rows_vary_ignores_only_the_first_dimension():
    a = fingerprint("all_gatherv", torch.zeros(3, 8), dim=0, rows_vary=True)
    b = fingerprint("all_gatherv", torch.zeros(5, 8), dim=0, rows_vary=True)
    assert np.array_equal(a.row, b.row) and a.row[6] == ANY
    assert describe(a.row) == "all_gatherv(float32[*, 8], dim=0)"
    c = fingerprint("all_gatherv", torch.zeros(3, 9), dim=0, rows_vary=True)
    assert not np.array_equal(a.row, c.row)
    # without rows_vary the row count counts
    assert not np.array_equal(
        fingerprint("all_gatherv", torch.zeros(3, 8), dim=0).row,
        fingerprint("all_gatherv", torch.zeros(5, 8), dim=0).row,
    )


def test_more_than_ten_dimensions_are_hashed():
    eleven = (1,) * 9 + (2, 3)
    fp = fingerprint("all_reduce", torch.zeros(eleven))
    assert fp.row.shape == (WIDTH,) and fp.row[2] == 11
    assert np.array_equal(fp.row, fingerprint("all_reduce", torch.ones(eleven)).row)
    # the dimensions past the ninth differ only in order: the hash still tells them apart
    swapped = fingerprint("all_reduce", torch.zeros((1,) * 9 + (3, 2)))
    assert not np.array_equal(fp.row, swapped.row)
    assert differences(np.stack([fp.row, swapped.row])) == ["shape"]
    assert describe(fp.row) == "all_reduce(float32[1, 1, 1, 1, 1, 1, 1, 1, 1, ...])"
    twelve = fingerprint("all_reduce", torch.zeros((1,) * 9 + (2, 3, 1)))
    assert differences(np.stack([fp.row, twelve.row])) == ["number of dimensions", "shape"]


def test_differences_names_each_field():
    base = fingerprint("all_gather", torch.zeros(4, 8), dim=1)

    def diff(other):
        return differences(np.stack([base.row, base.row, other.row]))

    assert differences(np.stack([base.row, base.row])) == []
    assert diff(fingerprint("all_gather", torch.zeros(4, 8, dtype=torch.float16), dim=1)) == [
        "dtype"
    ]
    assert diff(fingerprint("all_gather", torch.zeros(4, 8), dim=0)) == ["dim"]
    assert diff(fingerprint("all_gather", torch.zeros(4, 9), dim=1)) == ["shape"]
    assert diff(fingerprint("gather", torch.zeros(4, 8), dim=1, root=0)) == ["operation", "root"]
    assert diff(fingerprint("all_gather", torch.zeros(4, 8), dim=1, sizes=[1])) == ["sizes"]


def test_agree_on_comm_self_passes():
    call = Caller("solo")
    for fp in (
        fingerprint("all_reduce", torch.zeros(3)),
        fingerprint("reduce_scatterv", torch.zeros(4), dim=0, sizes=[4]),
    ):
        assert agree(call, MPI.COMM_SELF, "all_reduce", fp) is None


class _TwoRanks:
    """Stands in for a two-rank group: rank 1's part of every Allgather is ``theirs``."""

    group = "tp"

    def __init__(self, theirs_row, theirs_sizes):
        self.parts = [theirs_row, theirs_sizes]
        self.methods = []

    def Get_size(self):
        return 2

    def __call__(self, operation, comm, method, send, recv):
        self.methods.append(method)
        recv[0] = send
        recv[1] = self.parts.pop(0)


def test_agree_raises_naming_fields_and_every_rank_call():
    mine = fingerprint("reduce_scatterv", torch.zeros(6, 2), dim=0, sizes=[2, 4])
    theirs = fingerprint("reduce_scatterv", torch.zeros(6, 2), dim=0, sizes=[4, 2])
    ranks = _TwoRanks(theirs.row, np.array(theirs.sizes, dtype=np.int64))
    with pytest.raises(ValueError) as info:
        agree(ranks, ranks, "reduce_scatterv", mine)
    assert ranks.methods == ["Allgather", "Allgather"]  # the second brings the sizes lists
    assert str(info.value) == (
        "reduce_scatterv on group 'tp': the ranks disagree on sizes: "
        "rank 0: reduce_scatterv(float32[6, 2], dim=0, sizes=[2, 4]); "
        "rank 1: reduce_scatterv(float32[6, 2], dim=0, sizes=[4, 2])"
    )


def test_agree_exchanges_once_when_the_sizes_agree():
    mine = fingerprint("all_gather", torch.zeros(4, 8), dim=1)
    ranks = _TwoRanks(fingerprint("all_gather", torch.zeros(4, 8), dim=1).row, None)
    agree(ranks, ranks, "all_gather", mine)
    assert ranks.methods == ["Allgather"]
    theirs = fingerprint("all_gather", torch.zeros(4, 8, dtype=torch.int32), dim=0)
    ranks = _TwoRanks(theirs.row, None)
    with pytest.raises(ValueError, match="the ranks disagree on dtype, dim: rank 0: all_gather"):
        agree(ranks, ranks, "all_gather", mine)
    assert ranks.methods == ["Allgather"]
