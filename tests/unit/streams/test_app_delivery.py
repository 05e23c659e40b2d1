"""The worker exits for a restart when Kafka refuses one of its outputs."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError

import streams.app as app_module
from streams.app import WorkerState


class _Exited(Exception):
    pass


def _state(monkeypatch: pytest.MonkeyPatch) -> WorkerState:
    def exit_for_restart() -> None:
        raise _Exited

    monkeypatch.setattr(app_module, "_exit_for_restart", exit_for_restart)
    placeholder: Any = object()
    return WorkerState(pipeline=placeholder, commands=placeholder)


def _settled(result: object = None, error: BaseException | None = None) -> Any:
    # Same result API as the asyncio future aiokafka hands out, without a loop.
    future: Future[object] = Future()
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
    return future


def test_a_delivered_output_lets_the_worker_go_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = _state(monkeypatch)

    state.on_delivered(_settled("metadata"))  # no exit


def test_an_output_kafka_refused_makes_the_worker_exit_for_a_restart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = _state(monkeypatch)

    with pytest.raises(_Exited):
        state.on_delivered(_settled(error=KafkaTimeoutError()))


def test_a_cancelled_delivery_makes_the_worker_exit_for_a_restart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = _state(monkeypatch)
    future: Future[object] = Future()
    future.cancel()

    with pytest.raises(_Exited):
        state.on_delivered(future)
