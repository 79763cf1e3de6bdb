"""Command line: ``python -m mpicomm info | check | bench``.

Run under the job's launcher (``mpiexec -n 4 python -m mpicomm check``) or plainly for one rank.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .config import settings


def _info(args: argparse.Namespace) -> int:
    from .info import report

    text = report()
    if text is not None:
        print(text, flush=True)
    return 0


def _check(args: argparse.Namespace) -> int:
    from mpi4py import MPI

    from . import check
    from .communicator import MPICommunicator

    comm = MPICommunicator(
        MPI.COMM_WORLD, unique_name="check", timeout=args.timeout, staging=args.staging or None
    )
    try:
        passed, errors = check.run(comm, verbose=args.verbose)
        for line in errors:
            print(line, file=sys.stderr, flush=True)
        if comm.rank == 0:
            print(f"mpicomm check on {comm.world_size} rank(s)", flush=True)
            print(check.table(passed), flush=True)
        return 0 if passed.all() else 1
    finally:
        comm.destroy()


def _bench(args: argparse.Namespace, rest: list[str]) -> int:
    try:
        from .bench import main as bench_main
    except ImportError as exc:
        print(f"mpicomm bench is not available: {exc}", file=sys.stderr)
        return 2
    return bench_main(rest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpicomm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="MPI library, thread level, CUDA awareness, rank placement")
    check = sub.add_parser("check", help="run every collective and dtype against a reference")
    check.add_argument("--timeout", type=float, default=120.0, help="seconds per collective")
    check.add_argument("--staging", action="store_true", help="force the host staging path")
    check.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    sub.add_parser(
        "bench", help="the benchmark sweep (see `python -m mpicomm bench --help`)", add_help=False
    )
    args, rest = parser.parse_known_args(argv)
    torch.set_num_threads(1)
    if args.command != "info":  # info reports what it can whatever the settings say
        try:
            settings()
        except ValueError as exc:  # a malformed MPICOMM_* variable: one line, no traceback
            print(f"python -m mpicomm {args.command}: {exc}", file=sys.stderr, flush=True)
            return 2
    if args.command == "bench":
        return _bench(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return {"info": _info, "check": _check}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
