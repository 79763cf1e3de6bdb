"""Conformance checks shared by tests/mpi/test_staging.py and tests/mpi/test_cuda.py.

:func:`run` performs one collective on one communicator, with every rank's input placed on a given
device, and checks what does not depend on the path taken: the result is a fresh contiguous tensor
of the input's dtype on the input's device, the input is unchanged, reductions give identical bits
on every rank. It returns the results (moved to the CPU) beside their references, so a test can
compare them with the reference and with the same collective run another way (staged vs direct,
CUDA vs CPU). Every rank builds every rank's input from a seed, so references are local.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from mpicomm.check import make_input, reference_sum
from mpicomm.communicator import MPICommunicator
from mpicomm.consistency import COLLECTIVES as TENSOR_COLLECTIVES
from mpicomm.dtypes import CHECKED, INEXACT_SUMS, short_name

# The tensor collectives (their one list: mpicomm.consistency), then point-to-point and MoE.
COLLECTIVES = [*TENSOR_COLLECTIVES, "send_recv", "dispatch_combine"]
# The dtypes `python -m mpicomm check` covers, and those MPI sums itself (compared with a tolerance).
INEXACT_SUM = INEXACT_SUMS
DTYPE_LIST = list(CHECKED)
DTYPE_IDS = [short_name(dtype) for dtype in DTYPE_LIST]


@dataclass
class Outcome:
    """One result of a collective on this rank: ``result`` and ``expected`` are CPU tensors (or
    ``None`` where the rank gets none); ``summed`` marks results that are sums over ranks."""

    label: str
    result: torch.Tensor | None
    expected: torch.Tensor | None
    summed: bool = False


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` as raw bytes (uint8), for bitwise comparisons of any dtype."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def equal_bits(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def matches(outcome: Outcome, exact: bool = False) -> bool:
    """``result`` equals ``expected``: bit for bit, except float32/64 and complex sums, which MPI
    may add in another order (within a tolerance) unless ``exact``."""
    got, want = outcome.result, outcome.expected
    if got is None or want is None:
        return got is None and want is None
    if got.shape != want.shape or got.dtype != want.dtype:
        return False
    if outcome.summed and got.dtype in INEXACT_SUM and not exact:
        tol = 1e-5 if got.dtype in (torch.float32, torch.complex64) else 1e-12
        return bool(torch.allclose(got, want, rtol=tol, atol=tol))
    return equal_bits(got, want)


def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors share memory (any overlap of their storages)."""
    if a.device != b.device or a.untyped_storage().nbytes() == 0:
        return False
    sa, sb = a.untyped_storage(), b.untyped_storage()
    a0, b0 = sa.data_ptr(), sb.data_ptr()
    return a0 < b0 + sb.nbytes() and b0 < a0 + sa.nbytes()


class _Run:
    def __init__(self, comm: MPICommunicator, dtype: torch.dtype, device, salt: int) -> None:
        self.comm, self.dtype, self.salt = comm, dtype, salt
        self.device = torch.device(device)
        self.world, self.rank = comm.world_size, comm.rank
        self.outcomes: list[Outcome] = []
        self.problems: list[str] = []

    def inputs(self, shape, transpose: bool = False, dtype: torch.dtype | None = None):
        """Every rank's input on the CPU (a transposed view when ``transpose``)."""
        dtype = self.dtype if dtype is None else dtype
        if transpose:
            return [
                make_input(dtype, i, tuple(shape[::-1]), self.salt).t() for i in range(self.world)
            ]
        return [make_input(dtype, i, tuple(shape), self.salt) for i in range(self.world)]

    def place(self, cpu_tensor: torch.Tensor) -> torch.Tensor:
        """This rank's input on the device, keeping a transposed layout non-contiguous."""
        if cpu_tensor.is_contiguous() or cpu_tensor.dim() < 2:
            return cpu_tensor.to(self.device, copy=True)
        return cpu_tensor.t().to(self.device, copy=True).t()

    def record(self, label, result, expected, summed=False, inputs=(), before=()) -> None:
        """Check the path-independent properties of ``result`` and keep it for comparison."""
        if result is not None:
            if not isinstance(result, torch.Tensor):
                self.problems.append(f"{label}: result is {type(result).__name__}")
                result = None
            else:
                if result.device != inputs[0].device:
                    self.problems.append(f"{label}: result on {result.device}, not the input's")
                if not result.is_contiguous():
                    self.problems.append(f"{label}: result is not contiguous")
                for x in inputs:
                    if same_storage(result, x):
                        self.problems.append(f"{label}: result shares memory with the input")
                result = result.cpu()
        for x, kept in zip(inputs, before, strict=True):
            if not equal_bits(x.cpu(), kept):
                self.problems.append(f"{label}: the input was modified")
        self.outcomes.append(Outcome(label, result, expected, summed))

    def identical_everywhere(self, label: str, result: torch.Tensor | None) -> None:
        digest = -1 if result is None else zlib.crc32(bits(result).numpy().tobytes())
        if len(set(self.comm.cpu_group.allgather(digest))) != 1:
            self.problems.append(f"{label}: ranks got different bits")

    # ------------------------------------------------------------------ the collectives
    def all_reduce(self) -> None:
        shapes = [((5, 3 * self.world), False), ((5, 3 * self.world), True), ((), False)]
        shapes.append(((0, 4), False))
        for shape, transpose in shapes:
            xs = self.inputs(shape, transpose)
            mine = self.place(xs[self.rank])
            kept = mine.cpu().clone()
            result = self.comm.all_reduce(mine)
            label = f"all_reduce{shape}{'.T' if transpose else ''}"
            self.record(label, result, reference_sum(xs), True, [mine], [kept])
            self.identical_everywhere(label, self.outcomes[-1].result)

    def all_gather(self) -> None:
        for dim in (0, -1):
            xs = self.inputs((3, 4), transpose=dim == -1)
            mine = self.place(xs[self.rank])
            kept = mine.cpu().clone()
            result = self.comm.all_gather(mine, dim)
            self.record(f"all_gather(dim={dim})", result, torch.cat(xs, dim), False, [mine], [kept])

    def all_gatherv(self) -> None:
        sizes = [i % 3 + 1 for i in range(self.world)]
        xs = [make_input(self.dtype, i, (sizes[i], 5), self.salt) for i in range(self.world)]
        ys = [make_input(torch.float32, i, (sizes[i], 2), self.salt) for i in range(self.world)]
        mine = [self.place(xs[self.rank]), self.place(ys[self.rank])]
        kept = [t.cpu().clone() for t in mine]
        result = self.comm.all_gatherv(mine, 0, sizes)
        if not isinstance(result, list) or len(result) != 2:
            self.problems.append(f"all_gatherv: a list of 2 in gave {type(result).__name__}")
            result = [None, None]
        self.record("all_gatherv[0]", result[0], torch.cat(xs), False, mine[:1], kept[:1])
        self.record("all_gatherv[1]", result[1], torch.cat(ys), False, mine[1:], kept[1:])

    def reduce_scatter(self) -> None:
        for dim in (0, -1):
            xs = self.inputs((2 * self.world, 2 * self.world), transpose=dim == -1)
            mine = self.place(xs[self.rank])
            kept = mine.cpu().clone()
            result = self.comm.reduce_scatter(mine, dim)
            expected = reference_sum(xs).chunk(self.world, dim)[self.rank].contiguous()
            self.record(f"reduce_scatter(dim={dim})", result, expected, True, [mine], [kept])

    def reduce_scatterv(self) -> None:
        sizes = [i % 3 + 1 for i in range(self.world)]
        xs = self.inputs((sum(sizes), 4))
        mine = self.place(xs[self.rank])
        kept = mine.cpu().clone()
        result = self.comm.reduce_scatterv(mine, 0, sizes)
        start = sum(sizes[: self.rank])
        expected = reference_sum(xs)[start : start + sizes[self.rank]]
        self.record("reduce_scatterv", result, expected, True, [mine], [kept])

    def gather(self) -> None:
        dst = self.world - 1
        xs = self.inputs((2, 3))
        mine = self.place(xs[self.rank])
        kept = mine.cpu().clone()
        result = self.comm.gather(mine, dst, -1)
        expected = torch.cat(xs, -1) if self.rank == dst else None
        self.record("gather", result, expected, False, [mine], [kept])

    def broadcast(self) -> None:
        src = self.world // 2
        xs = self.inputs((3, 5))
        mine = self.place(xs[self.rank])
        kept = mine.cpu().clone()
        result = self.comm.broadcast(mine, src)
        self.record("broadcast", result, xs[src], False, [mine], [kept])

    def send_recv(self) -> None:
        if self.world == 1:
            return
        xs = self.inputs((4, 3))
        mine = self.place(xs[self.rank])
        kept = mine.cpu().clone()
        if self.rank % 2 == 0:
            self.comm.send(mine)
            got = self.comm.recv((4, 3), self.dtype)
        else:
            got = self.comm.recv((4, 3), self.dtype)
            self.comm.send(mine)
        # recv lands on the communicator's device, which is the input's device in these tests
        self.record("send/recv", got, xs[(self.rank - 1) % self.world], False, [mine], [kept])

    def dispatch_combine(self) -> None:
        sizes = [i % 3 + 1 for i in range(self.world)]
        hs = [make_input(self.dtype, i, (sizes[i], 6), self.salt) for i in range(self.world)]
        lg = [make_input(torch.float32, i, (sizes[i], 4), self.salt) for i in range(self.world)]
        h, g = self.place(hs[self.rank]), self.place(lg[self.rank])
        kept = [h.cpu().clone(), g.cpu().clone()]
        gathered, logits = self.comm.dispatch(h, g, sizes=sizes)
        self.record("dispatch.hidden", gathered, torch.cat(hs), False, [h], kept[:1])
        self.record("dispatch.logits", logits, torch.cat(lg), False, [g], kept[1:])
        combined = self.comm.combine(gathered)
        start = sum(sizes[: self.rank])
        expected = reference_sum([torch.cat(hs)] * self.world)[start : start + sizes[self.rank]]
        self.record("combine", combined, expected, True, [gathered], [self.outcomes[-2].result])


def run(
    comm: MPICommunicator, name: str, dtype: torch.dtype, device="cpu", salt: int = 0
) -> tuple[list[Outcome], list[str]]:
    """Run collective ``name`` (one of :data:`COLLECTIVES`) with inputs on ``device``.

    Returns this rank's outcomes and the problems found (empty when all is well). Collective:
    every rank of ``comm`` must call it with the same arguments.
    """
    state = _Run(comm, dtype, device, salt)
    getattr(state, name)()
    return state.outcomes, state.problems


def check_against_reference(outcomes: list[Outcome], problems: list[str]) -> None:
    """Assert no problems and every result equal to its reference."""
    wrong = [o.label for o in outcomes if not matches(o)]
    assert not problems, problems
    assert not wrong, f"results differ from the reference: {wrong}"


def differences(
    comm: MPICommunicator,
    other: MPICommunicator,
    name: str,
    dtype: torch.dtype,
    device="cpu",
    salt: int = 0,
    exact: bool = True,
) -> list[str]:
    """Run ``name`` on ``comm`` (inputs on ``device``) and on ``other`` (CPU inputs), assert the
    first against the reference, and return the labels where the two disagree (bit for bit, or
    within :func:`matches`'s tolerance for float sums unless ``exact``). Collective."""
    got, problems = run(comm, name, dtype, device, salt)
    want, _ = run(other, name, dtype, "cpu", salt)
    check_against_reference(got, problems)
    return [
        g.label
        for g, w in zip(got, want, strict=True)
        if not matches(Outcome(g.label, g.result, w.result, g.summed), exact)
    ]
