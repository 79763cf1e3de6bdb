"""mpicomm.distributed.tensors: when the caller's output list is one memory the group writes into."""

from __future__ import annotations

import torch

from mpicomm.distributed.tensors import joined, split_into


def test_chunks_of_one_buffer_are_that_buffer():
    """list(buf.chunk(W)) of a 1-d buffer: the buffer itself, no new view."""
    buf = torch.zeros(12)
    assert joined(list(buf.chunk(3))) is buf
    assert joined(list(buf.split([5, 7]))) is buf  # unequal chunks tile it too


def test_chunks_that_do_not_tile_their_buffer_get_a_view_or_none():
    buf = torch.zeros(12)
    first_two = list(buf[:8].chunk(2))  # back to back, but not the whole buffer
    got = joined(first_two)
    assert got is not buf and got.numel() == 8 and got.data_ptr() == buf.data_ptr()
    got.fill_(1)
    assert buf[:8].eq(1).all() and buf[8:].eq(0).all()
    assert joined(list(reversed(buf.chunk(2)))) is None  # out of order
    assert joined([buf[0:4], buf[6:10]]) is None  # a gap
    rows = torch.zeros(2, 3)
    got = joined(list(rows.unbind(0)))  # rows of a 2-d buffer: one flat view over it
    assert got.numel() == 6 and got.data_ptr() == rows.data_ptr()


def test_chunks_of_a_buffer_with_grad_or_lazy_bits_are_not_written_through_it():
    leaf = torch.zeros(6, requires_grad=True)
    assert joined(list(leaf.chunk(2))) is not leaf
    neg = torch.zeros(6)._neg_view()
    assert joined(list(neg.chunk(2))) is None
    wide = torch.zeros(6, dtype=torch.float64)
    assert joined([wide[:3], wide[3:].float()]) is None  # dtypes differ


def test_split_into_writes_every_piece_in_order():
    outs = [torch.empty(2), torch.empty(3)]
    split_into(torch.arange(5.0), outs)
    assert outs[0].tolist() == [0.0, 1.0] and outs[1].tolist() == [2.0, 3.0, 4.0]
