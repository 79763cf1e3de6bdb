"""torch.distributed environment for vLLM's ``external_launcher`` mode under mpirun or srun.

vLLM (``distributed_executor_backend="external_launcher"``) and ``torch.distributed``'s
``env://`` rendezvous read RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. mpicomm
needs the torch rank of every process to equal its rank in ``MPI.COMM_WORLD``; deriving these
variables from MPI guarantees it. The work is done by :mod:`mpicomm.launch`; this module adds
the vLLM-facing names and a wrapper that needs no code change:

- RANK = ``COMM_WORLD`` rank, WORLD_SIZE = ``COMM_WORLD`` size,
- LOCAL_RANK = rank among the processes on the same node (``Split_type(COMM_TYPE_SHARED)``),
- MASTER_ADDR = ``127.0.0.1`` when all ranks share one node, else rank 0's host address,
- MASTER_PORT = a free TCP port picked on rank 0 (both kept when rank 0 has them set; identical
  on all ranks),
- VLLM_HOST_IP (``python -m mpicomm.vllm.launch``, across nodes, unless set) = this host's address
  on the route to MASTER_ADDR (:func:`export_vllm_host_ip`).

Usage::

    mpiexec -n 4 python -m mpicomm.vllm.launch my_vllm_script.py --args
    srun --mpi=pmi2 -n 4 python -m mpicomm.vllm.launch -m my_package.main --args

or call :func:`export_torch_env` at the top of the script. When the script returns (or exits with
status 0), the launcher destroys vLLM's groups (:func:`destroy_vllm_groups`).
:func:`torch_env_from_launcher` maps the launcher's own variables (Open MPI, MPICH/Hydra, Slurm)
without initialising MPI.
"""

from __future__ import annotations

import os
import runpy
import socket
import sys
from collections.abc import Mapping

from .. import config
from .. import launch as _launch

_TORCH_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def torch_env_from_launcher(environ: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """RANK, WORLD_SIZE and (when known) LOCAL_RANK from the launcher's variables; no MPI call.

    Returns ``None`` when no launcher variables are present. MASTER_ADDR/PORT are not derivable
    this way (use :func:`torch_env_from_mpi`).
    """
    ranks = _launch.env_ranks(environ)
    if ranks.source == "none" or ranks.rank is None or ranks.world_size is None:
        return None
    out = {"RANK": str(ranks.rank), "WORLD_SIZE": str(ranks.world_size)}
    if ranks.local_rank is not None:
        out["LOCAL_RANK"] = str(ranks.local_rank)
    return out


def torch_env_from_mpi(comm=None) -> dict[str, str]:
    """The five torch variables for this rank, from MPI; ``os.environ`` is left alone.

    Collective over ``comm`` (default ``MPI.COMM_WORLD``, which vLLM's torch world must be).
    """
    values = _launch.export_torch_env(comm, env=dict(os.environ))
    return {k: values[k] for k in _TORCH_KEYS}


def export_torch_env(comm=None) -> dict[str, str]:
    """:func:`mpicomm.launch.export_torch_env`, and ``MPICOMM_VLLM=1`` unless set.

    Collective. Stale RANK/WORLD_SIZE/LOCAL_RANK values are replaced (with a ``LaunchWarning``),
    so torch rank == MPI rank afterwards. Like ``python -m mpicomm.vllm.launch``, it asks for
    mpicomm's platform (``MPICOMM_VLLM=1``) unless ``MPICOMM_VLLM`` is set already; it warns
    (``LaunchWarning``) when vLLM has chosen its platform before this call, too late for the
    plugin. Returns the torch variables set.
    """
    values = _launch.export_torch_env(comm)
    os.environ.setdefault("MPICOMM_VLLM", "1")
    warn_platform_chosen()
    return values


def platform_chosen_without_mpicomm() -> str | None:
    """The class name of vLLM's platform when vLLM has already chosen one that is not mpicomm's
    although ``MPICOMM_VLLM`` asks for it; ``None`` otherwise (nothing chosen yet, vLLM not
    imported, mpicomm off, or mpicomm's platform chosen)."""
    platforms = sys.modules.get("vllm.platforms")
    chosen = getattr(platforms, "_current_platform", None) if platforms is not None else None
    if chosen is None or not config.vllm_enabled():
        return None
    name = type(chosen).__name__
    return None if type(chosen).__module__.startswith("mpicomm.") else name


def warn_platform_chosen() -> None:
    """Warn (``LaunchWarning``) when :func:`platform_chosen_without_mpicomm` names a platform."""
    import warnings

    name = platform_chosen_without_mpicomm()
    if name is not None:
        warnings.warn(
            f"mpicomm: vLLM already chose its platform ({name}) before MPICOMM_VLLM=1 was set: "
            "its groups will NOT use mpicomm; call mpicomm.vllm.export_torch_env() (or set "
            "MPICOMM_VLLM=1) before vLLM is used",
            _launch.LaunchWarning,
            stacklevel=3,
        )


def destroy_vllm_groups() -> bool:
    """Destroy vLLM's model-parallel groups and its world group, where vLLM made them.

    vLLM does not destroy them under ``external_launcher``; their mpicomm communicators would
    then be named at exit as never destroyed. Collective over every rank (each destroys its
    groups in vLLM's own order). Returns True when vLLM's distributed state was there to destroy.
    """
    state = sys.modules.get("vllm.distributed.parallel_state")
    if state is None or getattr(state, "_WORLD", None) is None:
        return False
    state.destroy_model_parallel()
    state.destroy_distributed_environment()
    return True


def host_ip_toward(address: str) -> str | None:
    """This host's IPv4 address on the route to ``address`` (no packet is sent); ``None`` when
    there is no route or ``address`` is a loopback address."""
    if not address or address.startswith("127.") or address == "localhost":
        return None
    try:
        target = socket.gethostbyname(address)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((target, 9))
            return s.getsockname()[0]
    except OSError:
        return None


def export_vllm_host_ip(environ: dict | None = None) -> str | None:
    """Set ``VLLM_HOST_IP`` (unless set) to this host's address toward ``MASTER_ADDR``.

    vLLM advertises ``VLLM_HOST_IP`` (default: the address of its default route) for its message
    queues across hosts; on hosts without a default route it hangs there. Across nodes the
    launcher's rank-0 address is reachable by construction, so the route to it names the
    interface the ranks share. Returns the value set, or ``None`` (one node, or already set).
    """
    env = os.environ if environ is None else environ
    if env.get("VLLM_HOST_IP"):
        return None
    ip = host_ip_toward(env.get("MASTER_ADDR", ""))
    if ip:
        env["VLLM_HOST_IP"] = ip
    return ip


def environment_problems(environ: Mapping[str, str] | None = None) -> list[str]:
    """Settings that keep vLLM from using mpicomm although ``MPICOMM_VLLM`` asks for it.

    ``VLLM_TARGET_DEVICE=cpu`` makes vLLM pick its CPU platform without asking any platform
    plugin, so mpicomm's is never loaded (silently: vLLM logs nothing). See docs/vllm.md.
    """
    env = os.environ if environ is None else environ
    problems = []
    if env.get("VLLM_TARGET_DEVICE", "").strip().lower() == "cpu":
        problems.append(
            "VLLM_TARGET_DEVICE=cpu makes vLLM skip platform plugins: mpicomm will NOT serve "
            "vLLM's groups (unset it; MPICOMM_VLLM_DEVICE=cpu forces the CPU platform instead)"
        )
    return problems


def warn_environment(environ: Mapping[str, str] | None = None) -> None:
    """Warn (``LaunchWarning``) about each of :func:`environment_problems`."""
    import warnings

    for problem in environment_problems(environ):
        warnings.warn(f"mpicomm: {problem}", _launch.LaunchWarning, stacklevel=2)


def main(argv: list[str] | None = None) -> int:
    """``python -m mpicomm.vllm.launch [-m module | script] args...``: export, then run."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    if args[0] == "-m" and len(args) < 2:
        print("usage: python -m mpicomm.vllm.launch -m module [args...]", file=sys.stderr)
        return 2
    export_torch_env()
    export_vllm_host_ip()
    if config.vllm_enabled():
        warn_environment()
    try:
        if args[0] == "-m":
            sys.argv = [args[1], *args[2:]]
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = args
            runpy.run_path(args[0], run_name="__main__")
    except SystemExit as done:
        if done.code in (None, 0):  # a clean exit on this rank: the others leave the same way
            destroy_vllm_groups()
        raise
    destroy_vllm_groups()
    return 0


if __name__ == "__main__":
    sys.exit(main())
