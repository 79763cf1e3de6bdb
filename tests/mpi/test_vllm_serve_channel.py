"""The order channel of mpicomm.vllm.serve_engine on real MPI: what rank 0 sends every rank gets,
and a rank waiting for an order sleeps rather than spins. Runs at any number of ranks."""

from __future__ import annotations

import time
from types import SimpleNamespace

from mpi4py import MPI

from mpicomm.vllm import serve_engine as se
from tests.helpers import everywhere


def test_orders_reach_every_rank_in_order():
    channel = se.StepChannel(MPI.COMM_WORLD)
    big = {"request_id": "b", "prompt_token_ids": list(range(50_000))}  # a payload of ~250 KB
    orders = [
        se.Order(),
        se.Order(adds=[(0, {"request_id": "a"}), (1, big)], aborts={1: ["x", "y"]}),
        se.Order(flags=se.RUNNING),
        se.Order(aborts={0: ["z"]}, flags=se.RUNNING),
        se.Order(flags=se.STOP),
    ]
    try:
        got = []
        for order in orders:
            if channel.rank == 0:
                channel.send(order)
                got.append(order)
            else:
                got.append(channel.receive())
        assert everywhere(got == orders)
        gathered = channel.gather(channel.rank * 10)
        expected = [r * 10 for r in range(channel.size)] if channel.rank == 0 else None
        assert everywhere(gathered == expected)
    finally:
        channel.close()


def test_a_rank_waiting_for_an_order_sleeps(monkeypatch):
    slept = []

    def sleep(seconds):
        slept.append(seconds)
        time.sleep(seconds)

    monkeypatch.setattr(se, "time", SimpleNamespace(monotonic=time.monotonic, sleep=sleep))
    channel = se.StepChannel(MPI.COMM_WORLD)
    try:
        if channel.rank == 0:
            time.sleep(1.0)
            channel.send(se.Order(flags=se.STOP))
        else:
            order = channel.receive()
            assert order.flags == se.STOP
        # after a short spin the wait sleeps, in naps of at most se._NAP
        ok = channel.rank == 0 or (sum(slept) > 0.5 and max(slept) <= se._NAP)
        assert everywhere(ok), (sum(slept), max(slept, default=0))
    finally:
        channel.close()
