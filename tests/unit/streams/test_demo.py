from models.records import Decision
from streams.demo import _examples


def decision(rule_id: str, time_ms: int, device_id: str = "t4013") -> Decision:
    return Decision(
        rule_id=rule_id,
        device_id=device_id,
        metric="occupancy",
        action="act",
        priority=0,
        confidence=1.0,
        time_ms=time_ms,
        decided_at_ms=0,
    )


def test_examples_are_in_time_order_with_the_first_of_each_rule() -> None:
    decisions = [
        decision("congestion", 5_000),
        decision("congestion", 1_000),
        decision("stoppage", 9_000),
        decision("congestion", 3_000),
        decision("overheating", 7_000),
        decision("congestion", 2_000),
        decision("congestion", 4_000),
    ]

    examples = _examples(decisions)

    assert [(d.rule_id, d.time_ms) for d in examples] == [
        ("congestion", 1_000),
        ("congestion", 2_000),
        ("congestion", 3_000),
        ("overheating", 7_000),
        ("stoppage", 9_000),
    ]


def test_examples_break_ties_in_time_by_device() -> None:
    decisions = [decision("a", 1_000, "z-device"), decision("b", 1_000, "a-device")]

    examples = _examples(decisions)

    assert [d.device_id for d in examples] == ["a-device", "z-device"]
