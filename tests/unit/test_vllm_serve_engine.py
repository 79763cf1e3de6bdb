"""mpicomm.vllm.serve_engine without vLLM or MPI: orders, routing, replicas (fakes for both).

The order channel over real MPI is tests/mpi/test_vllm_serve_channel.py; the server end to end
is tests/system/test_vllm_serve.py.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from mpicomm.vllm import serve_engine as se


class FakeScheduler:
    def __init__(self) -> None:
        self.requests: list[str] = []
        self.finished: list[str] = []

    def has_requests(self) -> bool:
        return bool(self.requests)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)


class FakeCore:
    """What Replica uses of vLLM's EngineCore; one step finishes every request."""

    def __init__(self, tp=1, pp=1, dp=1) -> None:
        parallel = SimpleNamespace(
            tensor_parallel_size=tp, pipeline_parallel_size=pp, data_parallel_size=dp
        )
        self.vllm_config = SimpleNamespace(parallel_config=parallel)
        self.scheduler = FakeScheduler()
        self.batch_queue = None
        self.dummies = 0
        self.aborted: list[str] = []

    def preprocess_add_request(self, request):
        return request.request_id, 0

    def add_request(self, request_id, wave):
        self.scheduler.requests.append(request_id)

    def abort_requests(self, ids):
        self.aborted += ids
        self.scheduler.requests = [r for r in self.scheduler.requests if r not in ids]

    def step_fn(self):
        done = [SimpleNamespace(request_id=r, finished=True) for r in self.scheduler.requests]
        self.scheduler.requests = []
        return {0: SimpleNamespace(outputs=done, scheduler_stats=None)}, bool(done)

    def post_step(self, model_executed):
        pass

    def execute_dummy_batch(self):
        self.dummies += 1


def request(request_id: str, dp_rank=None):
    return SimpleNamespace(request_id=request_id, data_parallel_rank=dp_rank)


def test_a_replica_applies_only_its_own_adds_and_aborts():
    core = FakeCore(tp=2, dp=2)
    replica = se.Replica(core, rank=3)  # ranks 2, 3: replica 1
    assert (replica.index, replica.leader, replica.replicas) == (1, False, 2)
    order = se.Order(adds=[(0, request("a")), (1, request("b"))], aborts={0: ["x"], 1: ["y"]})
    outputs = replica.carry_out(order)
    assert [o.request_id for o in outputs.outputs] == ["b"]
    assert core.aborted == ["y"]
    assert core.dummies == 0  # it worked, so no dummy batch


def test_an_idle_replica_runs_a_dummy_batch_only_while_another_steps():
    core = FakeCore(dp=2)
    replica = se.Replica(core, rank=1)
    assert replica.carry_out(se.Order(flags=se.RUNNING)) is None
    assert core.dummies == 1
    assert replica.carry_out(se.Order()) is None
    assert core.dummies == 1
    # a replica that steps runs no dummy batch besides (its step is its forward)
    replica.carry_out(se.Order(adds=[(1, request("a"))], flags=se.RUNNING))
    assert core.dummies == 1
    # without data parallelism there is nobody to meet
    single = FakeCore()
    se.Replica(single, rank=0).carry_out(se.Order(flags=se.RUNNING))
    assert single.dummies == 0


def fake_client(replicas: int) -> se.MPIEngineClient:
    core = FakeCore(dp=replicas)
    loop = SimpleNamespace(replica=se.Replica(core, rank=0), channel=None)
    return se.MPIEngineClient(loop, list(range(replicas)))


def queue(client, *requests, aborts=()):
    asyncio.run(_queue(client, requests, aborts))


async def _queue(client, requests, aborts):
    for r in requests:
        await client.add_request_async(r)
    if aborts:
        await client.abort_requests_async(list(aborts))


def test_requests_go_to_the_least_loaded_replica_or_the_one_they_name():
    client = fake_client(2)
    queue(client, request("a"), request("b"), request("c"), request("d", dp_rank=0))
    order = client._next_order()
    assert [(r, q.request_id) for r, q in order.adds] == [(0, "a"), (1, "b"), (0, "c"), (0, "d")]
    assert order.flags & se.RUNNING
    client._forget(["a", "c", "d"])  # finished
    queue(client, request("e"))
    assert [r for r, _ in client._next_order().adds] == [0]  # 0 now holds none, 1 holds "b"


def test_aborts_go_to_the_owner_else_to_every_replica():
    client = fake_client(2)
    queue(client, request("a"), request("b"))
    client._next_order()
    queue(client, aborts=["b", "unknown"])
    order = client._next_order()
    assert order.aborts == {1: ["b", "unknown"], 0: ["unknown"]}
    assert order.flags & se.RUNNING  # the abort leaves its replica a step


def test_the_engine_thread_waits_for_work_and_stop_is_an_order():
    client = fake_client(1)
    started = time.monotonic()
    client.shutdown(timeout=0)  # no thread yet: only the flag
    order = client._next_order()
    assert order.flags & se.STOP and time.monotonic() - started < 1


class NeverDone:
    def Test(self):
        return False


class SilentComm:
    """A communicator whose broadcasts never complete: rank 0 never sends."""

    def Dup(self):
        return self

    def Get_rank(self):
        return 1

    def Get_size(self):
        return 2

    def Ibcast(self, buffer, root=0):
        return NeverDone()


def test_a_waiting_rank_sleeps_and_gives_up_when_asked():
    channel = se.StepChannel(SilentComm())
    deadline = time.monotonic() + 0.5
    cpu = time.process_time()
    with pytest.raises(se.OrderTimeout):
        channel.receive(give_up=lambda: time.monotonic() > deadline)
    # after the first se._SPIN seconds the wait sleeps: most of the 0.5 s is not CPU time
    assert time.process_time() - cpu < 0.3
