"""torch's own distributed test cases (``torch/testing/_internal/distributed/distributed_test.py``,
shipped in the wheel) on the mpicomm backend, driven under ``mpiexec`` instead of torch's
multiprocessing harness.

    mpiexec -n 3 python tests/programs/dist_torch_suite.py OUT.json [REGEX] [AS]

Every rank sets ``BACKEND=mpicomm`` (read by the suite at import, for its skip decorators), joins
``init_process_group("mpicomm", init_method="mpi://")`` and runs the selected test methods of
``DistributedTest._DistTestBase`` in the same order; the suite's file barrier is replaced by an MPI
barrier. Rank 0 writes ``{test: "pass" | "skip: why" | "fail: first line"}`` (a test passes when
it passes on every rank) to OUT.json. ``AS`` (default ``mpicomm``) is the backend name the suite's
skip decorators see: many cases are gated on a backend's name (``gloo``, ``mpi``) rather than on a
feature, and ``AS=gloo`` / ``AS=mpi`` runs them on the mpicomm backend against that backend's
expectations.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import traceback
import unittest
from datetime import timedelta

import torch
from mpi4py import MPI

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()
DEFAULT = (
    r"^test_(all_reduce|reduce|broadcast|all_gather|gather|scatter|all_to_all|barrier|send_recv"
    r"|isend|irecv|batch_isend_irecv|.*object|new_subgroups|get_rank|get_backend|DistributedData"
    r"Parallel_(?!.*(gpu|cuda|SyncBatchNorm)))"
)


def main(out: str, pattern: str, name: str) -> None:
    tmp = WORLD.bcast(tempfile.mkdtemp(prefix="torch_suite_") if RANK == 0 else None)
    for sub in ("barrier", "test_dir", "init_dir"):
        os.makedirs(os.path.join(tmp, sub), exist_ok=True)
    os.environ.update(BACKEND=name, WORLD_SIZE=str(SIZE), TEMP_DIR=tmp)
    torch.set_num_threads(1)

    import torch.distributed as dist
    from torch.testing._internal.common_utils import TestCase
    from torch.testing._internal.distributed import distributed_test as suite

    import mpicomm  # noqa: F401  (registers the backend)

    class OnMPI(suite.DistributedTest._DistTestBase, TestCase):
        rank = RANK
        world_size = str(SIZE)
        file_name = os.path.join(tmp, "init_dir", "file")

        def _barrier(self, *args, **kwargs):
            WORLD.Barrier()

    from torch.testing._internal.common_distributed import TEST_SKIPS

    skips_by_code = {s.exit_code: s.message for s in TEST_SKIPS.values()}
    dist.init_process_group("mpicomm", init_method="mpi://", timeout=timedelta(seconds=30))
    names = sorted(n for n in dir(OnMPI) if n.startswith("test_") and re.search(pattern, n))
    results = {}
    for name in names:
        result = unittest.TestResult()
        OnMPI(name).run(result)
        exits = [e for e in result.errors if "SystemExit" in e[1]]
        code = re.search(r"SystemExit: (\d+)", exits[0][1]) if exits else None
        if code and int(code.group(1)) in skips_by_code:  # torch's harness: exit code = skip
            mine = "skip: " + skips_by_code[int(code.group(1))]
        elif result.errors or result.failures:
            text = (result.errors or result.failures)[0][1].strip().splitlines()
            mine = "fail: " + (text[-1] if text else "?")[:200]
            if os.environ.get("SUITE_TRACEBACKS"):
                print((result.errors or result.failures)[0][1], file=sys.stderr, flush=True)
        elif result.skipped:
            mine = "skip: " + str(result.skipped[0][1])[:200]
        else:
            mine = "pass"
        every = WORLD.allgather(mine)
        fails = [o for o in every if o.startswith("fail")]
        skips = [o for o in every if o.startswith("skip")]
        results[name] = fails[0] if fails else skips[0] if skips else "pass"
        if RANK == 0:
            print(f"{results[name][:90]:90s} {name}", flush=True)
    if RANK == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    WORLD.Barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        args = sys.argv[1:] + [None] * 2
        main(args[0], args[1] or DEFAULT, args[2] or "mpicomm")
    except Exception:
        traceback.print_exc()
        WORLD.Abort(1)
