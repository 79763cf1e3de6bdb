"""vLLM's OpenAI-compatible server from one MPI job (docs/serving.md).

    mpiexec -n 2 python -m mpicomm.vllm.serve MODEL --tensor-parallel-size 2 [vLLM serve options]
    srun --mpi=pmi2 -n 2 python -m mpicomm.vllm.serve MODEL --tensor-parallel-size 2

Rank 0 serves vLLM's own API (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``,
``/v1/embeddings``, ``/health``, ``/metrics``, ...) on ``--host``/``--port`` (default
127.0.0.1:8000; ``--port 0`` picks a free port) with vLLM's app and ``AsyncLLM``; every rank,
rank 0 included, runs its share of one vLLM engine (``external_launcher``, mpicomm behind every
group) in lockstep with the others (:mod:`mpicomm.vllm.serve_engine`). No process is started
besides the ranks: MPI cannot start in a child of an MPI rank.

TP x PP x DP must equal the number of ranks. Rank 0 prints ``mpicomm serve: URL http://...``
once the socket is bound; the server answers once ``/health`` does. SIGTERM or SIGINT to the
launcher stops every rank; a rank that fails ends the job (mpicomm aborts it; ``/health``
answers 503 meanwhile where rank 0 is the one that noticed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time

from .. import config
from .._mpi import MPI, started
from . import launch

logger = logging.getLogger("mpicomm.serve")

# Ranks other than 0 wait this long after a SIGTERM for rank 0's stop order before leaving alone.
STOP_GRACE = 6.0


def parse_args(argv: list[str]):
    """vLLM's own ``serve`` arguments (``make_arg_parser``); the model may be positional."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = make_arg_parser(
        FlexibleArgumentParser(
            prog="python -m mpicomm.vllm.serve",
            description="vLLM's OpenAI-compatible server from one MPI job (mpicomm).",
        )
    )
    args = parser.parse_args(argv)
    if getattr(args, "model_tag", None):
        args.model = args.model_tag
    if getattr(args, "headless", False) or (args.api_server_count or 1) > 1:
        parser.error("--headless and --api-server-count are vLLM's own launcher: not used here")
    if getattr(args, "uds", None):
        parser.error("--uds is not supported: rank 0 listens on --host/--port")
    args.host = args.host or "127.0.0.1"
    args.distributed_executor_backend = "external_launcher"
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    return args


def world_shape(args, world: int) -> str | None:
    """Why ``args``' parallel sizes do not fit ``world`` ranks, or ``None`` when they do."""
    tp = args.tensor_parallel_size
    pp = args.pipeline_parallel_size
    dp = args.data_parallel_size
    if tp * pp * dp != world:
        return (
            f"tensor ({tp}) x pipeline ({pp}) x data ({dp}) parallel size = {tp * pp * dp}, "
            f"but the job has {world} ranks: start one rank per vLLM worker"
        )
    return None


def build_engine(args):
    """This rank's vLLM ``EngineCore`` (collective: every rank builds its share)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.executor import Executor

    engine_args = AsyncEngineArgs.from_cli_args(args)
    vllm_config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
    core = EngineCore(
        vllm_config, Executor.get_class(vllm_config), log_stats=not engine_args.disable_log_stats
    )
    return engine_args, core


def make_async_llm(engine_args, client):
    """vLLM's ``AsyncLLM`` whose engine-core client is ``client`` (rank 0)."""
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.core_client import EngineCoreClient
    from vllm.v1.executor import Executor

    vllm_config = client.vllm_config
    original = EngineCoreClient.__dict__["make_async_mp_client"]
    EngineCoreClient.make_async_mp_client = staticmethod(lambda *a, **k: client)
    try:
        return AsyncLLM(
            vllm_config=vllm_config,
            executor_class=Executor.get_class(vllm_config),
            log_stats=not engine_args.disable_log_stats,
            usage_context=UsageContext.OPENAI_API_SERVER,
            log_requests=engine_args.enable_log_requests,
            aggregate_engine_logging=engine_args.aggregate_engine_logging,
        )
    finally:
        EngineCoreClient.make_async_mp_client = original


WARM_UP_PROMPT = [0, 1]
"""Token ids of the warm-up prompt: two tokens, so its prefill is a batch of several tokens and
its second output token a batch of one (vLLM compiles for each, docs/serving.md)."""


async def warm_up(async_llm, vllm_config) -> float | None:
    """Rank 0, before the server answers: one greedy request of two output tokens per data-parallel
    replica, through the path a client's request takes; the seconds it took (``None`` for a model
    that does not generate).

    vLLM compiles some functions with inductor at their first call even in eager mode (the vocabulary
    mask of its tensor-parallel embedding, once for several tokens and once for one); with an empty
    inductor cache that takes seconds, which the server's first clients would otherwise wait for.
    """
    if vllm_config.model_config.runner_type != "generate":
        return None
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    replicas = vllm_config.parallel_config.data_parallel_size
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    t0 = time.monotonic()

    async def one(replica: int) -> None:
        rank = replica if replicas > 1 else None
        stream = async_llm.generate(
            TokensPrompt(prompt_token_ids=list(WARM_UP_PROMPT)),
            params,
            f"mpicomm-warm-up-{replica}",
            data_parallel_rank=rank,
        )
        async for _ in stream:
            pass

    await asyncio.gather(*(one(r) for r in range(replicas)))
    took = time.monotonic() - t0
    logger.info("warm-up: %d request(s) of 2 tokens in %.1f s", replicas, took)
    return took


async def serve(args, engine_args, client, listen_address: str, sock: socket.socket) -> None:
    """Rank 0: vLLM's app on ``sock`` until SIGTERM/SIGINT or the engine's failure."""
    from vllm.entrypoints.launchers.api_server.entry import build_and_serve

    client.start(asyncio.get_running_loop())
    async_llm = make_async_llm(engine_args, client)
    try:
        await warm_up(async_llm, client.vllm_config)
        shutdown_task = await build_and_serve(async_llm, listen_address, sock, args)
    finally:
        async_llm.shutdown()
    try:
        await shutdown_task
    finally:
        sock.close()


def bind(args) -> tuple[str, socket.socket]:
    """Rank 0: vLLM's server socket on ``--host``/``--port`` (port 0: a free one)."""
    from vllm.entrypoints.launchers.launcher import setup_server

    listen_address, sock = setup_server(args, reuse_port=False)
    port = sock.getsockname()[1]
    if args.port != port:
        listen_address = listen_address.rsplit(":", 1)[0] + f":{port}"
        args.port = port
    return listen_address, sock


def url_of(args) -> str:
    host = args.host
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    return f"http://{host}:{args.port}"


def _log_setup(rank: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] mpicomm serve: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def follow(loop) -> int:
    """Ranks other than 0: carry out rank 0's orders until it says stop; exit status."""
    from .serve_engine import OrderTimeout

    terminated: list[float] = []

    def on_signal(signum, frame):  # rank 0 gets the same signal and sends the stop order
        if not terminated:
            terminated.append(time.monotonic())

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def give_up() -> bool:
        return bool(terminated) and time.monotonic() - terminated[0] > STOP_GRACE

    try:
        loop.follow(give_up)
        logger.info("leaving")
    except OrderTimeout:
        logger.warning("no stop order from rank 0 %.0f s after a signal: leaving", STOP_GRACE)
        sys.stderr.flush()
        os._exit(143)  # MPI cannot finish with rank 0 gone quiet; nothing to clean up here
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        parse_args(argv)  # vLLM's option list; exits
    launch.export_torch_env()
    launch.export_vllm_host_ip()
    os.environ.setdefault("MPICOMM_VLLM", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine runs in the ranks
    if config.vllm_enabled():
        launch.warn_environment()
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    _log_setup(rank)
    logger.info("pid %d on %s", os.getpid(), socket.gethostname())
    args = parse_args(argv)
    problem = world_shape(args, size)
    if problem:
        if rank == 0:
            print(f"python -m mpicomm.vllm.serve: {problem}", file=sys.stderr)
        return 2

    listen_address, sock, error = "", None, None
    if rank == 0:
        try:
            listen_address, sock = bind(args)
        except Exception as exc:  # every rank must hear of it before building the engine
            error = f"cannot listen on {args.host}:{args.port}: {exc}"
    error = world.bcast(error, root=0)
    if error:
        if rank == 0:
            print(f"python -m mpicomm.vllm.serve: {error}", file=sys.stderr)
        return 1
    if rank == 0:
        print(f"mpicomm serve: URL {url_of(args)} ({size} ranks)", flush=True)

    from .serve_engine import EngineLoop, make_client

    engine_args, core = build_engine(args)
    loop = EngineLoop(core, world)
    if rank != 0:
        return follow(loop)

    parallel = core.vllm_config.parallel_config
    client = make_client(loop, list(range(parallel.data_parallel_size)))
    import uvloop

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(args, engine_args, client, listen_address, sock))
    client.shutdown()  # also when the server ended otherwise than through vLLM's shutdown
    logger.info("server stopped")
    if client.error is not None or client.stuck():
        why = f"failed ({client.error!r})" if client.error is not None else "did not stop"
        logger.error("the engine %s: aborting the job", why)
        sys.stderr.flush()
        time.sleep(0.5)
        world.Abort(1)
    return 0


def run() -> None:
    """:func:`main`, then MPI's finalisation and the process's exit without tearing down the
    Python heap (a loaded model takes seconds to free; the stop must end every rank within
    seconds)."""
    try:
        status = main()
    except SystemExit as exc:  # argparse's --help and usage errors
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    with contextlib.suppress(Exception):
        if started() and MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    run()
