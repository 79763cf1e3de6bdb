"""Fuzzing the argument space under mpiexec: ``mpiexec -n 3 python tests/programs/faults/fuzz.py [N]``.

Rank 0 runs hypothesis (``N`` examples, default ``MPICOMM_FUZZ_EXAMPLES`` or 300, derandomized)
and broadcasts each drawn case; every rank builds its own input from (case seed, rank), runs the
call, and checks it against the reference it computes itself from every rank's input. Rank 0
gathers the outcomes: either every rank returned the reference result (fresh, contiguous, same
dtype, input untouched), or every rank raised the error that CONTRACT.md documents for those
arguments. Cases drawn: operation, dtype, shape (0 to 4 dims, sizes 0 to 5), dim (possibly out
of range), layout (contiguous, transposed, strided, expanded, or a lazy view: ``x.conj()`` for
complex dtypes, a negative-bit view for signed ones), sizes (possibly wrong), root (possibly out
of range), ints given as numpy integers, ``all_gatherv`` of a list (a second tensor of another
dtype and trailing shape), consistency mode on/off, and with it on, one rank disagreeing on the
dtype or shape (of the list's second tensor too). ``MPICOMM_TIMEOUT`` bounds every call; a timeout aborts the job (a hang is a bug).
"""

from __future__ import annotations

import os
import sys
import traceback

import numpy as np
import torch
from mpi4py import MPI

import mpicomm
from mpicomm.consistency import COLLECTIVES
from mpicomm.dtypes import CHECKED

torch.set_num_threads(1)
WORLD = MPI.COMM_WORLD
RANK, W = WORLD.Get_rank(), WORLD.Get_size()
DTYPES = list(CHECKED)  # the dtypes `python -m mpicomm check` covers
OPS = list(COLLECTIVES)
LAYOUTS = ["contiguous", "transposed", "strided", "expanded", "lazy"]
VICTIM = W - 1


def build(case: dict, rank: int) -> torch.Tensor:
    """Rank ``rank``'s input: small integer values (sums exact in every dtype) in ``layout``."""
    shape = list(case["shape"])
    if case["op"] == "all_gatherv" and shape and case["sizes"] is not None and _sizes_ok(case):
        shape[0] = case["sizes"][rank]
    dtype = case["dtype"]
    if case["inject"] and rank == VICTIM:
        if case["inject"] == "dtype":
            dtype = torch.float64 if dtype != torch.float64 else torch.float32
        elif case["inject"] == "shape" and shape:
            shape[-1] += 1
    g = torch.Generator().manual_seed(case["seed"] * 31 + rank)
    layout = case["layout"]
    if layout == "transposed" and len(shape) >= 2:
        base = torch.randint(0, 5, shape[::-1], generator=g)
        values = base.permute(*reversed(range(len(shape))))
    elif layout == "strided" and shape:
        values = torch.randint(0, 5, [*shape[:-1], 2 * shape[-1]], generator=g)[..., ::2]
    elif layout == "expanded" and shape:
        values = torch.randint(0, 5, [1, *shape[1:]], generator=g).expand(shape)
    else:
        values = torch.randint(0, 5, shape, generator=g)
    if dtype.is_complex:
        x = (values + 1j * (values - 2)).to(dtype)
        return x.conj() if layout == "lazy" else x  # a conj view: its memory is unconjugated
    x = values.to(dtype)
    if layout == "lazy" and (dtype.is_signed and dtype.itemsize > 1):
        return torch._neg_view(-x)  # a negative-bit view: its memory holds -x
    return x


def companion(case: dict, rank: int) -> torch.Tensor:
    """The second tensor of a list all_gatherv: ``build``'s rows, another dtype and width."""
    x = build(case, rank)
    rows = x.shape[0] if x.dim() else 1  # a 0-d first entry is the error the call must raise
    dtype = torch.float32 if case["inject"] == "list" and rank == VICTIM else torch.float64
    g = torch.Generator().manual_seed(case["seed"] * 37 + rank)
    return torch.randint(0, 5, (rows, 2), generator=g).to(dtype)


def _sizes_ok(case) -> bool:
    sizes = case["sizes"]
    return sizes is None or (len(sizes) == W and all(s >= 0 for s in sizes))


def expected_error(case: dict):
    """The exception type CONTRACT.md prescribes for these arguments, or ``None``."""
    op, shape, dim, sizes, root = (case[k] for k in ("op", "shape", "dim", "sizes", "root"))
    ndim = len(shape)
    span = max(ndim, 1)
    dim_ok = -span <= dim < span
    if op in ("gather", "broadcast") and not 0 <= root < W:
        return ValueError
    if op == "all_gatherv":
        if ndim == 0 or not _sizes_ok(case) or not dim_ok or dim % span != 0:
            return ValueError
    elif op != "all_reduce" and op != "broadcast" and not dim_ok:
        return ValueError
    if op in ("reduce_scatter", "reduce_scatterv"):
        length = shape[dim % span] if ndim else 1
        if sizes is None and length % W:
            return ValueError
        if sizes is not None and (not _sizes_ok(case) or sum(sizes) != length):
            return ValueError
    if case["inject"] and case["validate"]:
        return ValueError
    return None


def reference(case: dict, every: list[torch.Tensor]):
    """What this rank must get back, from every rank's input."""
    op, dim, root, dtype = case["op"], case["dim"], case["root"], case["dtype"]
    every = [e.contiguous() for e in every]
    if op == "broadcast":
        return every[root]
    if op in ("all_gather", "gather", "all_gatherv"):
        if op == "gather" and root != RANK:
            return None
        parts = [e.reshape(1) if e.dim() == 0 else e for e in every]
        return torch.cat(parts, dim % max(every[0].dim(), 1))
    if dtype == torch.bool:
        total = torch.stack(every).any(0)
    elif dtype.is_complex:
        total = torch.stack(every).to(torch.complex128).sum(0).to(dtype)
    elif dtype.is_floating_point:
        total = torch.stack([e.double() for e in every]).sum(0).to(dtype)
    else:
        total = torch.stack([e.long() for e in every]).sum(0).to(dtype)
    if op == "all_reduce":
        return total
    if total.dim() == 0:
        total = total.reshape(1)
    d = dim % total.dim()
    sizes = case["sizes"] or [total.shape[d] // W] * W
    start = sum(sizes[:RANK])
    out = total.narrow(d, start, sizes[RANK])
    return out.reshape(()) if case["shape"] == [] else out


def call(comm, case: dict, x: torch.Tensor):
    op, dim, sizes, root = case["op"], case["dim"], case["sizes"], case["root"]
    if case["numpy"]:  # accepted wherever an int is, as torch accepts them
        dim, root = np.int64(dim), np.int64(root)
        sizes = None if sizes is None else [np.int32(s) for s in sizes]
    if op == "all_reduce":
        return comm.all_reduce(x)
    if op == "all_gather":
        return comm.all_gather(x, dim)
    if op == "all_gatherv":
        if case["as_list"]:
            return comm.all_gatherv([x, companion(case, RANK)], dim, sizes)
        return comm.all_gatherv(x, dim, sizes)
    if op == "reduce_scatter":
        return comm.reduce_scatter(x, dim)
    if op == "reduce_scatterv":
        return comm.reduce_scatterv(x, dim, sizes)
    if op == "gather":
        return comm.gather(x, root, dim)
    return comm.broadcast(x, root)


def run_case(comms: dict, case: dict) -> tuple[str, str]:
    """("ok" | "wrong" | "raised", detail) for this rank."""
    comm = comms[case["validate"]]
    try:
        x = build(case, RANK)
    except Exception:  # noqa: BLE001 - a harness bug: report it, never leave the others waiting
        return "wrong", "harness: " + traceback.format_exc(limit=3)
    before = x.clone()
    try:
        out = call(comm, case, x)
    except mpicomm.CollectiveTimeoutError as exc:
        print(f"rank {RANK}: TIMEOUT in case {case}: {exc}", file=sys.stderr, flush=True)
        WORLD.Abort(5)
        os._exit(5)
    except Exception as exc:  # noqa: BLE001 - the kind of error is the outcome
        return "raised", f"{type(exc).__name__}: {exc}"
    if not torch.equal(x, before):
        return "wrong", "input was modified"
    if case["as_list"]:
        out, second = out
        want = torch.cat([companion(case, r) for r in range(W)])
        if not torch.equal(second, want):
            return "wrong", f"list entry 1 differs: got {second.flatten()[:8]}"
    try:
        ref = reference(case, [build(case, r) for r in range(W)])
    except Exception:  # noqa: BLE001
        return "wrong", "no reference: " + traceback.format_exc(limit=2)
    if ref is None or out is None:
        return ("ok", "") if ref is None and out is None else ("wrong", f"got {out}, want {ref}")
    if out.dtype != ref.dtype or out.shape != ref.shape:
        return "wrong", f"got {out.dtype}{list(out.shape)}, want {ref.dtype}{list(ref.shape)}"
    if not out.is_contiguous():
        return "wrong", "result is not contiguous"
    if W > 1 and out.numel() and out.data_ptr() == x.data_ptr():
        return "wrong", "result aliases the input"
    if not torch.equal(
        out.view(torch.uint8) if out.dtype.itemsize == 1 else out,
        ref.view(torch.uint8) if ref.dtype.itemsize == 1 else ref,
    ):
        return "wrong", f"values differ: got {out.flatten()[:8]}, want {ref.flatten()[:8]}"
    return "ok", ""


def _comparable(t: torch.Tensor) -> torch.Tensor:
    """float8 has no equality kernel: compare its bytes."""
    return t.view(torch.uint8) if t.dtype.is_floating_point and t.dtype.itemsize == 1 else t


def judge(case: dict, outcomes: list[tuple[str, str]]) -> None:
    """Rank 0: the outcomes of every rank must match the contract (AssertionError otherwise)."""
    error = expected_error(case)
    if error is None:
        bad = [(r, o) for r, o in enumerate(outcomes) if o[0] != "ok"]
        assert not bad, f"{case}: expected a result on every rank, got {bad}"
        return
    name = error.__name__
    bad = [(r, o) for r, o in enumerate(outcomes) if o[0] != "raised" or not o[1].startswith(name)]
    assert not bad, f"{case}: expected {name} on every rank, got {bad}"


def rank0(comms: dict, examples: int) -> int:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    # sampled_from shrinks towards its first entry; 3 divides evenly over 3 ranks, 0 is empty
    shapes = st.lists(st.sampled_from([2, 3, 6, 4, 1, 5, 0]), min_size=0, max_size=4)
    sizes = st.one_of(
        st.none(),
        st.lists(st.integers(0, 3), min_size=W, max_size=W),
        st.lists(st.integers(-1, 3), min_size=0, max_size=W + 1),
    )

    @st.composite
    def cases(draw):
        case = {
            "op": draw(st.sampled_from(OPS)),
            "dtype": draw(st.sampled_from(DTYPES)),
            "shape": draw(shapes),
            "dim": draw(st.sampled_from([0, -1, 1, 2, -2, 3, -3, 4, -5])),
            "layout": draw(st.sampled_from(LAYOUTS)),
            "sizes": None,
            "root": draw(st.sampled_from([*range(W), -1, W])),
            "validate": draw(st.booleans()),
            "seed": draw(st.integers(0, 2**20)),
            "inject": None,
            "numpy": draw(st.booleans()),
            "as_list": False,
        }
        if case["op"] in ("all_gatherv", "reduce_scatterv"):
            case["sizes"] = draw(sizes)
        if case["op"] == "all_gatherv" and draw(st.booleans()):
            case["dim"] = 0
        if case["op"] == "all_gatherv":
            case["as_list"] = draw(st.booleans())
        if case["validate"] and draw(st.integers(0, 3)) == 0:
            kinds = ["dtype", "shape", "list"] if case["as_list"] else ["dtype", "shape"]
            case["inject"] = draw(st.sampled_from(kinds))
            if case["inject"] == "shape" and (
                not case["shape"] or case["op"] not in ("all_reduce", "all_gather", "broadcast")
            ):
                case["inject"] = "dtype"
            if expected_error({**case, "inject": None}) is not None:
                case["inject"] = None  # a rank-local error first: not a disagreement any more
        return case

    count = {"n": 0, "results": 0}

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(cases())
    def fuzz(case):
        count["n"] += 1
        WORLD.bcast(case, root=0)
        outcomes = WORLD.gather(run_case(comms, case), root=0)
        judge(case, outcomes)
        count["results"] += expected_error(case) is None

    try:
        fuzz()
        status = 0
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        status = 1
    WORLD.bcast(None, root=0)
    print(f"FUZZ examples={count['n']} with_result={count['results']} status={status}", flush=True)
    return status


def worker(comms: dict) -> int:
    while (case := WORLD.bcast(None, root=0)) is not None:
        WORLD.gather(run_case(comms, case), root=0)
    return 0


def main() -> int:
    examples = (
        int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ.get("MPICOMM_FUZZ_EXAMPLES", 300))
    )
    comms = {
        False: mpicomm.MPICommunicator(WORLD, unique_name="fuzz", validate=False),
        True: mpicomm.MPICommunicator(WORLD, unique_name="fuzz-validated", validate=True),
    }
    status = rank0(comms, examples) if RANK == 0 else worker(comms)
    for comm in comms.values():
        comm.destroy()
    return WORLD.allreduce(status, op=MPI.MAX)


if __name__ == "__main__":
    sys.exit(main())
