"""Tests of the worker's MQTT command publisher (no broker: nothing is sent)."""

from __future__ import annotations

from connectors.mqtt import CommandPublisher


def test_command_to_a_wildcard_topic_is_refused_not_raised() -> None:
    """A rule template can put a device's metric name, say "a+b", in a topic."""
    publisher = CommandPublisher(host="127.0.0.1", port=1, client_id="t")

    publisher.publish("cmd/press-1/a+b", b"{}")
    publisher.publish("cmd/press-1/#", b"{}")
    publisher.publish("cmd/press-1/ok", b"{}")

    assert publisher.snapshot() == {"published": 1, "dropped": 0, "refused": 2}
