"""Argument checks made before any MPI call."""

import pytest
import torch

from mpicomm.reduction import split_evenly
from mpicomm.validation import check_rank, check_sizes, check_tensor, even_sizes, normalize_dim


def test_normalize_dim():
    assert normalize_dim(-1, 3) == 2
    assert normalize_dim(0, 0) == 0 and normalize_dim(-1, 0) == 0
    with pytest.raises(ValueError, match="dim=3"):
        normalize_dim(3, 3)
    with pytest.raises(TypeError, match="dim"):
        normalize_dim(True, 3)


def test_check_sizes():
    assert check_sizes(torch.tensor([1, 2]), 2, total=3) == [1, 2]
    with pytest.raises(ValueError, match="2 entries"):
        check_sizes([1, 2], 3)
    with pytest.raises(ValueError, match="adds up to 3"):
        check_sizes([1, 2], 2, total=4)
    with pytest.raises(TypeError, match=r"sizes\[1\]"):
        check_sizes([1, 2.0], 2)
    with pytest.raises(ValueError, match="negative"):
        check_sizes([-1, 2], 2)


def test_even_sizes_and_split():
    assert even_sizes(6, 3, 0) == [2, 2, 2]
    with pytest.raises(
        ValueError, match=r"input_.shape\[1\]=7 is not divisible by the group size 3"
    ):
        even_sizes(7, 3, 1)
    assert split_evenly(7, 3) == [3, 2, 2] and sum(split_evenly(10**9 + 7, 4)) == 10**9 + 7


def test_check_rank_and_tensor():
    assert check_rank(1, 2, "dst") == 1
    with pytest.raises(ValueError, match="dst=2"):
        check_rank(2, 2, "dst")
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        check_tensor([1])
    with pytest.raises(TypeError, match="dense"):
        check_tensor(torch.eye(2).to_sparse())
