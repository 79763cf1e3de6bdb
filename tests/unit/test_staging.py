"""mpicomm.staging: when a result may be written straight into a caller's tensor."""

from __future__ import annotations

import pytest
import torch

from mpicomm.staging import overlaps_partly, writable_into

BASE = torch.arange(16, dtype=torch.float32)


@pytest.mark.parametrize(
    ("a", "b", "partly"),
    [
        (BASE, BASE, False),  # one tensor: torch.distributed's in-place calls
        (BASE, BASE.view(-1), False),  # another view of the same elements
        (BASE, BASE.clone(), False),  # separate memory
        (BASE, BASE[4:12], True),  # a slice of it
        (BASE[:8], BASE[8:], False),  # back to back, not overlapping
        (BASE[:9], BASE[8:], True),  # one element shared
        (BASE[::2], BASE[1::2], True),  # interleaved: their spans overlap
        (BASE.view(4, 4).t(), BASE.view(4, 4), True),  # same memory, other strides
        (BASE, BASE.view(torch.int32), True),  # same memory, another dtype
        (BASE[:0], BASE, False),  # empty
    ],
)
def test_overlaps_partly(a, b, partly):
    assert overlaps_partly(a, b) is partly
    assert overlaps_partly(b, a) is partly


def test_writable_into():
    x = BASE.clone()
    assert writable_into(x, x)  # in place
    assert writable_into(torch.empty(16), x)
    assert not writable_into(BASE[4:12], BASE)  # partial overlap
    assert not writable_into(BASE.view(4, 4).t(), BASE.view(4, 4))  # not contiguous
    assert not writable_into(torch.empty(16)._neg_view(), x)  # lazy negation
