"""One vLLM engine, run by every rank of an MPI job in lockstep and fed by rank 0 (docs/serving.md).

Every rank builds the same vLLM ``EngineCore`` with ``distributed_executor_backend=
"external_launcher"``: one worker per rank holding its share of the model, its groups on mpicomm.
Rank 0 decides what each step does (:class:`Order`: the requests that arrived, the aborts,
whether to stop); :class:`StepChannel` broadcasts it on a private duplicate of ``COMM_WORLD``;
every rank applies it to its engine and steps (:class:`Replica`), so the identical, deterministic
schedulers stay in step and the model's collectives meet, as in vLLM's offline external-launcher
mode. On rank 0, :class:`MPIEngineClient` is the engine-core client of vLLM's ``AsyncLLM``: what
the server adds or aborts is queued for the next order, and each step's outputs go back to
``AsyncLLM``'s output handler.

Data parallelism: each replica (``TP*PP`` consecutive ranks, vLLM's layout) has its own scheduler.
Rank 0 routes each new request to the replica with the fewest live requests; after each step
the replicas' first ranks send their outputs to rank 0 (a gather); while any replica has work,
a replica without any runs vLLM's dummy batch, as vLLM's own data-parallel engine does, so the
replicas' collectives meet.

Only this module's objects talk on the order channel; vLLM's own traffic stays on its groups.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

logger = logging.getLogger("mpicomm.serve")

STOP = 1
"""Order flag: every rank shuts its engine down and leaves its loop."""
RUNNING = 2
"""Order flag (data parallel): some replica steps, so every replica runs a forward."""

# Waiting for the next order (ranks other than 0): test the broadcast and yield the core for
# _SPIN s (the gap between two steps while generating), then sleep, backing off to _NAP s, so
# an idle server costs next to no CPU and wakes within _NAP s of a request.
_SPIN = 0.05
_NAP = 0.002
# How long rank 0's shutdown waits for the engine thread to send the stop order and leave (it
# may be inside a step, or stuck in one whose peers are gone: the job is then aborted).
STOP_WAIT = 5.0


@dataclass
class Order:
    """What every rank does in one step. ``adds``: ``(replica, EngineCoreRequest)`` in arrival
    order; ``aborts``: request ids by replica; ``flags``: :data:`STOP`, :data:`RUNNING`."""

    adds: list = field(default_factory=list)
    aborts: dict[int, list[str]] = field(default_factory=dict)
    flags: int = 0


class StepChannel:
    """Rank 0's orders to every rank, on a private duplicate of ``comm`` (collective to build).

    An order travels as a header (payload bytes, flags: an ``int64[2]`` non-blocking broadcast,
    so waiting ranks can sleep) and, when it carries requests or aborts, a pickled payload.
    """

    def __init__(self, comm) -> None:
        self.comm = comm.Dup()
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self._header = np.zeros(2, dtype=np.int64)

    def send(self, order: Order) -> None:
        """Rank 0: broadcast ``order``."""
        payload = pickle.dumps((order.adds, order.aborts), protocol=5) if _has_items(order) else b""
        self._header[0] = len(payload)
        self._header[1] = order.flags
        self.comm.Ibcast(self._header, root=0).Wait()
        if payload:
            self.comm.Bcast(bytearray(payload), root=0)

    def receive(self, give_up=None) -> Order:
        """Ranks other than 0: the next order. ``give_up()`` is asked while waiting; when it
        returns true the rank stops waiting (:class:`OrderTimeout`)."""
        request = self.comm.Ibcast(self._header, root=0)
        start = time.monotonic()
        pause = 0.0
        while not request.Test():
            if time.monotonic() - start < _SPIN:
                os.sched_yield()
                continue
            if give_up is not None and give_up():
                raise OrderTimeout("no order from rank 0")
            pause = min(max(pause * 2, 1e-4), _NAP)
            time.sleep(pause)
        nbytes, flags = int(self._header[0]), int(self._header[1])
        order = Order(flags=flags)
        if nbytes:
            buffer = bytearray(nbytes)
            self.comm.Bcast(buffer, root=0)
            order.adds, order.aborts = pickle.loads(buffer)
        return order

    def gather(self, item):
        """Everyone's ``item`` on rank 0 (a list in rank order), ``None`` elsewhere."""
        return self.comm.gather(item, root=0)

    def close(self) -> None:
        """Free the duplicate (collective)."""
        self.comm.Free()


class OrderTimeout(RuntimeError):
    """A rank stopped waiting for rank 0's next order."""


def _has_items(order: Order) -> bool:
    return bool(order.adds or order.aborts)


class Replica:
    """This rank's ``EngineCore`` and how it carries out an :class:`Order` (every rank)."""

    def __init__(self, core, rank: int) -> None:
        parallel = core.vllm_config.parallel_config
        per_replica = parallel.tensor_parallel_size * parallel.pipeline_parallel_size
        self.core = core
        self.rank = rank
        self.replicas = parallel.data_parallel_size
        self.index = rank // per_replica
        self.leader = rank % per_replica == 0
        self.steps = 0
        self.aborted = 0

    def has_work(self) -> bool:
        """Whether a step would run the model: vLLM steps an engine with requests, and under
        ``external_launcher`` with data parallelism a step with nothing scheduled runs a dummy
        forward (so that the replicas' collectives meet)."""
        return self.core.scheduler.has_requests() or bool(self.core.batch_queue)

    def carry_out(self, order: Order):
        """Apply ``order`` and step; this replica's ``EngineCoreOutputs`` (or ``None``).

        With data parallelism every replica runs exactly one forward while any replica steps
        (``RUNNING``): its step, or vLLM's dummy batch when it has nothing to step.
        """
        core = self.core
        for replica, request in order.adds:
            if replica == self.index:
                core.add_request(*core.preprocess_add_request(request))
        ids = order.aborts.get(self.index)
        if ids:
            core.abort_requests(ids)
            self.aborted += len(ids)
            logger.info("aborted request(s) %s", ", ".join(ids))
        outputs = None
        if self.has_work():
            outputs, executed = core.step_fn()
            core.post_step(model_executed=executed)
            self.steps += 1
        elif self.replicas > 1 and order.flags & RUNNING:
            core.execute_dummy_batch()  # the stepping replicas' collectives need this one's
        return outputs.get(0) if outputs else None


class EngineLoop:
    """The step loop: :meth:`drive` on rank 0 (orders from the server), :meth:`follow` on the
    other ranks. Both end with the engine shut down and the channel freed."""

    def __init__(self, core, comm) -> None:
        self.channel = StepChannel(comm)
        self.replica = Replica(core, self.channel.rank)

    # --- ranks other than 0 ---------------------------------------------------------------
    def follow(self, give_up=None) -> None:
        """Carry out rank 0's orders until it says stop (ranks other than 0)."""
        replica = self.replica
        while True:
            order = self.channel.receive(give_up)
            if order.flags & STOP:
                break
            outputs = replica.carry_out(order)
            if replica.replicas > 1:
                mine = (outputs, replica.has_work()) if replica.leader else None
                self.channel.gather(mine)
        self.close()

    def close(self) -> None:
        """Destroy vLLM's groups (mpicomm's communicators with them) and the channel.

        Not ``EngineCore.shutdown``: its garbage collections of the whole heap take seconds per
        rank, and the process is about to exit anyway (:func:`mpicomm.vllm.serve.run`).
        """
        from vllm.distributed.parallel_state import (
            destroy_distributed_environment,
            destroy_model_parallel,
        )

        t0 = time.monotonic()
        destroy_model_parallel()
        destroy_distributed_environment()
        self.channel.close()
        logger.info("engine shut down in %.1f s", time.monotonic() - t0)


class MPIEngineClient:
    """vLLM engine-core client of ``AsyncLLM`` on rank 0, backed by :class:`EngineLoop`.

    ``add_request_async``/``abort_requests_async`` (the event loop's thread) queue work for the
    engine thread, which sends each step's :class:`Order`, steps rank 0's replica and hands the
    outputs to ``get_output_async``. A failure in the engine thread marks the engine dead
    (``AsyncLLM.errored``: ``/health`` answers 503 and vLLM's watchdog stops the server).
    Built by :func:`make_client` as a subclass of vLLM's ``EngineCoreClient``.
    """

    def __init__(self, loop: EngineLoop, engine_ranks: list[int]) -> None:
        self.engine_loop = loop
        self.core = loop.replica.core
        self.vllm_config = self.core.vllm_config
        self.engine_ranks_managed = engine_ranks
        self.resources = SimpleNamespace(engine_dead=False)  # what AsyncLLM reads of it
        self._cond = threading.Condition()
        self._adds: list = []
        self._aborts: list[str] = []
        self._stop = False
        self._stop_by = 0.0  # when shutdown() stops waiting for the engine thread
        self._owner: dict[str, int] = {}  # request id -> replica (data parallel)
        self._live = [0] * loop.replica.replicas
        self._busy = [False] * loop.replica.replicas  # replicas that will step (data parallel)
        self._outputs: asyncio.Queue | None = None
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # --- the event loop's side --------------------------------------------------------------
    def start(self, event_loop: asyncio.AbstractEventLoop) -> None:
        """Start the engine thread; outputs are delivered on ``event_loop``."""
        self._event_loop = event_loop
        self._outputs = asyncio.Queue()
        self._thread = threading.Thread(target=self._run, name="mpicomm-engine", daemon=True)
        self._thread.start()

    async def get_output_async(self):
        item = await self._outputs.get()
        if isinstance(item, BaseException):
            from vllm.v1.engine.exceptions import EngineDeadError

            raise EngineDeadError(f"the MPI engine failed: {item!r}") from item
        return item

    async def add_request_async(self, request) -> None:
        self._check_alive()
        with self._cond:
            self._adds.append(request)
            self._cond.notify()

    async def abort_requests_async(self, request_ids: list[str]) -> None:
        if not request_ids or self.resources.engine_dead:
            return
        with self._cond:
            self._aborts.extend(request_ids)
            self._cond.notify()

    def abort_requests(self, request_ids: list[str]) -> None:
        with self._cond:
            self._aborts.extend(request_ids)
            self._cond.notify()

    def get_supported_tasks(self):
        return self.core.get_supported_tasks()

    async def get_supported_tasks_async(self):
        return self.core.get_supported_tasks()

    async def reset_mm_cache_async(self) -> None:
        return None

    async def is_sleeping_async(self) -> bool:
        return False

    def dp_engines_running(self) -> bool:
        return False

    def get_kv_event_sources(self) -> dict:
        return {}

    def shutdown(self, timeout: float | None = None) -> None:
        """Tell every rank to stop and wait (bounded) for the engine thread."""
        with self._cond:
            if not self._stop:
                self._stop = True
                self._stop_by = time.monotonic() + STOP_WAIT
            self._cond.notify()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=max(0.0, self._stop_by - time.monotonic()))

    def stuck(self) -> bool:
        """True when the engine thread has not ended after :meth:`shutdown`."""
        return self._thread is not None and self._thread.is_alive()

    def _check_alive(self) -> None:
        if self.resources.engine_dead:
            from vllm.v1.engine.exceptions import EngineDeadError

            raise EngineDeadError("the MPI engine has stopped")

    # --- the engine thread ------------------------------------------------------------------
    def _next_order(self) -> Order:
        """Wait until there is something to do; the order for every rank."""
        replica = self.engine_loop.replica
        running = any(self._busy) if replica.replicas > 1 else replica.has_work()
        with self._cond:
            while not (self._adds or self._aborts or self._stop or running):
                self._cond.wait(timeout=1.0)
            adds, self._adds = self._adds, []
            aborts, self._aborts = self._aborts, []
            stop = self._stop
        order = Order(flags=STOP if stop else 0)
        for request in adds:
            order.adds.append((self._route(request), request))
        for request_id in aborts:
            replica_index = self._owner.get(request_id)
            targets = range(replica.replicas) if replica_index is None else (replica_index,)
            for r in targets:
                order.aborts.setdefault(r, []).append(request_id)
        if replica.replicas > 1 and (running or order.adds or order.aborts):
            order.flags |= RUNNING  # an abort leaves its replica a step of clean-up
        return order

    def _route(self, request) -> int:
        """The replica that serves ``request``: the one it asks for, else the least loaded."""
        replicas = self.engine_loop.replica.replicas
        if replicas == 1:
            return 0
        wanted = getattr(request, "data_parallel_rank", None)
        index = wanted if wanted is not None else min(range(replicas), key=self._live.__getitem__)
        self._owner[request.request_id] = index
        self._live[index] += 1
        return index

    def _forget(self, request_ids) -> None:
        """The requests ``request_ids`` have finished or were aborted: their replica is freer."""
        for request_id in request_ids:
            index = self._owner.pop(request_id, None)
            if index is not None:
                self._live[index] -= 1

    def _deliver(self, outputs) -> None:
        if outputs is not None and (outputs.outputs or outputs.scheduler_stats):
            self._event_loop.call_soon_threadsafe(self._outputs.put_nowait, outputs)

    def _run(self) -> None:
        loop = self.engine_loop
        replica = loop.replica
        try:
            while True:
                order = self._next_order()
                loop.channel.send(order)
                if order.flags & STOP:
                    logger.info("stop order sent")
                    break
                self._forget(i for ids in order.aborts.values() for i in ids)
                outputs = replica.carry_out(order)
                if replica.replicas == 1:
                    self._deliver(outputs)
                    continue
                gathered = loop.channel.gather((outputs, replica.has_work()))
                for index, item in enumerate(g for g in gathered if g is not None):
                    part, self._busy[index] = item
                    if part is not None:
                        part.engine_index = index
                        self._forget(o.request_id for o in part.outputs if o.finished)
                        self._deliver(part)
            loop.close()
        except BaseException as exc:  # the server must learn of it: /health, then exit
            logger.exception("mpicomm serve: the engine loop failed on rank 0")
            self.error = exc
            self.resources.engine_dead = True
            if self._event_loop is not None and not self._event_loop.is_closed():
                self._event_loop.call_soon_threadsafe(self._outputs.put_nowait, exc)


def make_client(loop: EngineLoop, engine_ranks: list[int]):
    """An :class:`MPIEngineClient` that is also a vLLM ``EngineCoreClient`` (for ``isinstance``
    checks and the methods it does not serve, which raise ``NotImplementedError``)."""
    from vllm.v1.engine.core_client import EngineCoreClient

    cls = type("MPIEngineCoreClient", (MPIEngineClient, EngineCoreClient), {})
    return cls(loop, engine_ranks)
