import copy
from pathlib import Path

import pytest

from models.records import Reading, WindowSummary
from models.rules import (
    DecideResult,
    Evaluation,
    RuleSet,
    RuleSetError,
    RuleState,
    check_rules,
    decide,
    load_rules,
    parse_rules,
)

RULES_DIR = Path(__file__).resolve().parents[3] / "rules"


def reading(
    value: float,
    time_ms: int = 0,
    *,
    device_id: str = "press-1",
    metric: str = "temperature",
    score: float | None = None,
) -> Evaluation:
    return Evaluation.of_reading(
        Reading(device_id, metric, value, time_ms, unit="Cel"), score
    )


def window(mean: float, end_ms: int, *, device_id: str = "press-1") -> Evaluation:
    summary = WindowSummary(
        device_id=device_id,
        metric="temperature",
        window_start_ms=end_ms - 60_000,
        window_end_ms=end_ms,
        count=12,
        sum=mean * 12,
        min=mean - 1,
        max=mean + 2,
        mean=mean,
        last=mean,
        p50=mean,
        p95=mean + 1.5,
        p99=mean + 1.9,
    )
    return Evaluation.of_window(summary)


def run(
    ruleset: RuleSet, state: RuleState, evaluations: list[Evaluation]
) -> list[DecideResult]:
    return [decide(ruleset, state, e, now_ms=1) for e in evaluations]


def fired(results: list[DecideResult]) -> list[str | None]:
    return [r.decision.rule_id if r.decision else None for r in results]


HOT = """
rules:
  - id: hot
    when: {field: value, op: ">", threshold: 95}
    priority: 10
    cooldown_s: 60
    action: reduce_load
"""


# -- decisions ---------------------------------------------------------------------


def test_decide_fires_the_higher_priority_rule_when_both_apply() -> None:
    ruleset = parse_rules(
        """
rules:
  - id: warm
    when: {field: value, op: ">", threshold: 90}
    priority: 1
    action: watch
  - id: hot
    when: {field: value, op: ">", threshold: 95}
    priority: 10
    action: reduce_load
"""
    )

    results = run(ruleset, RuleState(), [reading(96.0), reading(92.0, 1000)])

    assert fired(results) == ["hot", "warm"]
    assert results[0].decision is not None
    assert results[0].decision.priority == 10
    assert results[0].decision.action == "reduce_load"


def test_decide_breaks_priority_ties_by_file_order() -> None:
    ruleset = parse_rules(
        """
rules:
  - id: first
    when: {field: value, op: ">", threshold: 0}
    action: a
  - id: second
    when: {field: value, op: ">", threshold: 0}
    action: b
"""
    )

    assert fired(run(ruleset, RuleState(), [reading(1.0)])) == ["first"]


def test_cooldown_suppresses_repeat_decision_for_same_device() -> None:
    ruleset = parse_rules(HOT)
    state = RuleState()

    results = run(ruleset, state, [reading(96.0, 0), reading(97.0, 30_000)])

    assert fired(results) == ["hot", None]
    assert results[1].suppressed == ("hot",)
    assert state.cooldowns == {"hot": 0}


def test_cooldown_does_not_suppress_another_device() -> None:
    ruleset = parse_rules(HOT)
    first, second = RuleState(), RuleState()

    one = decide(ruleset, first, reading(96.0, 0), now_ms=1)
    other = decide(ruleset, second, reading(96.0, 1, device_id="press-2"), now_ms=1)

    assert one.decision is not None
    assert other.decision is not None
    assert other.decision.device_id == "press-2"
    assert other.suppressed == ()


def test_cooldown_expires_exactly_at_cooldown_s() -> None:
    ruleset = parse_rules(HOT)
    state = RuleState()

    results = run(ruleset, state, [reading(96.0, 0), reading(96.0, 59_999)])
    at_expiry = decide(ruleset, state, reading(96.0, 60_000), now_ms=1)

    assert fired(results) == ["hot", None]
    assert at_expiry.decision is not None
    assert state.cooldowns == {"hot": 60_000}


def test_cooldown_of_top_rule_suppresses_without_lower_rule_firing() -> None:
    ruleset = parse_rules(
        HOT
        + """
  - id: warm
    when: {field: value, op: ">", threshold: 90}
    action: watch
"""
    )

    results = run(ruleset, RuleState(), [reading(96.0, 0), reading(96.0, 1000)])

    assert fired(results) == ["hot", None]
    assert results[1].suppressed == ("hot",)


def test_wall_cooldown_clock_uses_now_ms() -> None:
    ruleset = parse_rules("cooldown_clock: wall\n" + HOT)
    state = RuleState()

    first = decide(ruleset, state, reading(96.0, 0), now_ms=500_000)
    replayed = decide(ruleset, state, reading(96.0, 999_000), now_ms=510_000)

    assert first.decision is not None
    assert replayed.suppressed == ("hot",)
    assert state.cooldowns == {"hot": 500_000}


def test_consecutive_fires_on_the_nth_evaluation_not_before() -> None:
    ruleset = parse_rules(
        """
rules:
  - id: hot
    when: {field: value, op: ">", threshold: 95}
    for: 3
    action: reduce_load
"""
    )
    values = [96.0, 97.0, 90.0, 96.0, 96.0, 96.0]

    results = run(
        ruleset, RuleState(), [reading(v, i * 1000) for i, v in enumerate(values)]
    )

    assert fired(results) == [None, None, None, None, None, "hot"]
    decision = results[5].decision
    assert decision is not None
    assert decision.evidence["consecutive"] == 3


def test_rate_of_change_compares_change_per_second_between_windows() -> None:
    ruleset = parse_rules(
        """
rules:
  - id: rising
    when: {field: window.mean, rate_per_s: true, op: ">", threshold: 0.01}
    action: schedule_maintenance
"""
    )
    # 60 s windows: +0.6 is exactly 0.01/s (not above), +1.2 is 0.02/s.
    windows = [window(80.0, 60_000), window(80.6, 120_000), window(81.8, 180_000)]
    state = RuleState()

    results = run(ruleset, state, windows)

    assert fired(results) == [None, None, "rising"]
    decision = results[2].decision
    assert decision is not None
    condition = decision.evidence["conditions"][0]
    assert condition["observed"] == pytest.approx(0.02)
    assert condition["rate_per_s"] is True
    assert state.previous == {"temperature": {"window.mean": [180_000, 81.8]}}


def test_rate_of_change_gives_no_rate_for_a_repeated_time() -> None:
    ruleset = parse_rules(
        """
rules:
  - id: jump
    when: {field: value, rate_per_s: true, op: ">", threshold: 1}
    action: a
"""
    )

    results = run(ruleset, RuleState(), [reading(1.0, 1000), reading(50.0, 1000)])

    assert fired(results) == [None, None]


def test_window_field_condition_fires_on_windows_only() -> None:
    ruleset = parse_rules(
        """
rules:
  - id: hot-window
    when: {field: window.p95, op: ">=", threshold: 100}
    action: reduce_load
"""
    )

    results = run(ruleset, RuleState(), [reading(120.0), window(98.5, 60_000)])

    assert fired(results) == [None, "hot-window"]
    decision = results[1].decision
    assert decision is not None
    assert decision.time_ms == 60_000
    assert decision.evidence["conditions"][0]["observed"] == 100.0


def test_anomaly_score_condition_skips_readings_without_a_score() -> None:
    ruleset = parse_rules(
        """
rules:
  - id: odd
    when: {field: anomaly_score, op: ">=", threshold: 0.9}
    for: 2
    action: inspect
    confidence: anomaly_score
"""
    )
    evaluations = [
        reading(1.0, 0, score=0.95),
        reading(1.0, 1000),
        reading(1.0, 2000, score=0.97),
    ]

    results = run(ruleset, RuleState(), evaluations)

    assert fired(results) == [None, None, "odd"]
    decision = results[2].decision
    assert decision is not None
    assert decision.confidence == 0.97
    assert decision.evidence["anomaly_score"] == 0.97


def test_margin_confidence_grows_with_distance_past_threshold() -> None:
    ruleset = parse_rules(
        """
rules:
  - id: cold
    when: {field: value, op: "<", threshold: 50}
    action: report_stoppage
    confidence: {margin: 20}
"""
    )

    results = run(ruleset, RuleState(), [reading(45.0), reading(10.0, 1000)])

    confidences = [r.decision.confidence for r in results if r.decision]
    assert confidences == [0.625, 1.0]


def test_condition_on_another_metric_uses_its_latest_fresh_value() -> None:
    ruleset = parse_rules(
        """
rules:
  - id: jam
    match: {metric: occupancy}
    when:
      - {field: value, op: ">", threshold: 15}
      - {field: value, metric: speed, op: "<", threshold: 55, max_age_s: 600}
    action: signal_timing
"""
    )
    evaluations = [
        reading(40.0, 0, device_id="t4013", metric="speed"),
        reading(20.0, 600_000, device_id="t4013", metric="occupancy"),
        reading(20.0, 600_001, device_id="t4013", metric="occupancy"),
    ]

    results = run(ruleset, RuleState(), evaluations)

    assert fired(results) == [None, "jam", None]


def test_command_renders_topic_and_payload_templates() -> None:
    ruleset = parse_rules(
        """
rules:
  - id: jam
    when: {field: value, op: ">", threshold: 15}
    action: signal_timing
    command:
      payload: '{"cmd":"signal_timing","plan":"congestion","device":"{device_id}"}'
  - id: hot
    when: {field: window.mean, op: ">", threshold: 15}
    action: reduce_load
    command:
      topic: "site/{device_id}/{metric}/cmd"
      payload: {cmd: "{action}", mean: "{window.mean}", note: "by {rule_id}"}
"""
    )

    text = decide(ruleset, RuleState(), reading(20.0), now_ms=1).decision
    mapping = decide(ruleset, RuleState(), window(20.5, 60_000), now_ms=1).decision

    assert text is not None
    assert text.command == {
        "topic": "devices/press-1/commands",
        "payload": '{"cmd":"signal_timing","plan":"congestion","device":"press-1"}',
    }
    assert mapping is not None
    assert mapping.command == {
        "topic": "site/press-1/temperature/cmd",
        "payload": '{"cmd":"reduce_load","mean":20.5,"note":"by hot"}',
    }


def test_state_round_trip_keeps_cooldowns_and_streaks() -> None:
    ruleset = parse_rules(HOT)
    state = RuleState()
    decide(ruleset, state, reading(96.0, 0), now_ms=1)

    restored = RuleState.from_bytes(state.to_bytes())
    repeat = decide(ruleset, restored, reading(96.0, 30_000), now_ms=1)

    assert restored.cooldowns == {"hot": 0}
    assert restored.streaks == {"temperature": {"hot": 2}}
    assert repeat.suppressed == ("hot",)
    assert RuleState.from_bytes(None) == RuleState()


# -- loading and checking ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "rules:\n  - id: a\n    when: {field: value, op: '=>', threshold: 1}\n"
            "    action: x\n",
            "<rules>:3:30: rules[0].when.op: must be one of >, >=, <, <=, ==, !=, "
            'got "=>"',
        ),
        (
            "rules:\n  - id: a\n    when: {field: value, op: '>', threshold: 1}\n"
            "    action: x\n    colour: red\n",
            "<rules>:5:5: rules[0].colour: unknown key (known: action, command, "
            "confidence, cooldown_s, description, for, id, match, priority, when)",
        ),
        (
            "rules:\n  - when: {field: value, op: '>', threshold: 1}\n    action: x\n",
            "<rules>:2:5: rules[0].id: is required",
        ),
        (
            "rules:\n  - id: a\n    when: {field: value, op: '>', threshold: 1}\n"
            "    action: x\n  - id: a\n    when: {field: value, op: '>', "
            "threshold: 2}\n    action: y\n",
            '<rules>:5:9: rules[1].id: duplicate rule id "a" (first at <rules>:2)',
        ),
        (
            "rules:\n  - id: a\n    when: {field: value, op: '>', threshold: hot}\n"
            "    action: x\n",
            '<rules>:3:46: rules[0].when.threshold: must be a number, got "hot"',
        ),
        (
            "rules:\n  - id: a\n    when: {field: window.median, op: '>', "
            "threshold: 1}\n    action: x\n",
            "<rules>:3:19: rules[0].when.field: must be one of value, anomaly_score, "
            "window.count, window.sum, window.min, window.max, window.mean, "
            'window.last, window.p50, window.p95, window.p99, got "window.median"',
        ),
        (
            "rules:\n  - id: a\n    when: {field: value, op: '>', threshold: 1}\n"
            "    action: x\n    cooldown_s: -5\n",
            "<rules>:5:17: rules[0].cooldown_s: must be >= 0, got -5 (int)",
        ),
        (
            "rules:\n  - id: a\n    match: {device: 'press-[12'}\n"
            "    when: {field: value, op: '>', threshold: 1}\n    action: x\n",
            '<rules>:3:21: rules[0].match.device: must be a valid glob (unclosed "["), '
            'got "press-[12"',
        ),
        (
            "rules:\n  - id: a\n    when: {field: value, op: '>', threshold: 1}\n"
            "    action: x\n    command:\n      payload: 'go {speed}'\n",
            "<rules>:6:16: rules[0].command.payload: unknown placeholder {speed} "
            "(known here: device_id, metric, rule_id, action, time_ms, unit, value, "
            "anomaly_score)",
        ),
        (
            "rules:\n  - id: a\n    when: {field: window.mean, op: '>', threshold: 1}"
            "\n    action: x\n    command:\n      payload: 'v={value}'\n",
            "<rules>:6:16: rules[0].command.payload: unknown placeholder {value} "
            "(known here: device_id, metric, rule_id, action, time_ms, unit, "
            "window_start_ms, window_end_ms, window.count, window.sum, window.min, "
            "window.max, window.mean, window.last, window.p50, window.p95, "
            "window.p99)",
        ),
        (
            "rules:\n  - id: a\n    for: 0\n"
            "    when: {field: value, op: '>', threshold: 1}\n    action: x\n",
            "<rules>:3:10: rules[0].for: must be >= 1, got 0 (int)",
        ),
        (
            "rules:\n  - id: a\n   action: x\n",
            "<rules>:3:4: invalid YAML: expected <block end>, but found "
            "'<block mapping start>'",
        ),
    ],
    ids=[
        "bad-op",
        "unknown-key",
        "missing-id",
        "duplicate-id",
        "wrong-type",
        "unknown-field",
        "negative-cooldown",
        "bad-glob",
        "unknown-placeholder",
        "placeholder-of-other-kind",
        "for-below-one",
        "yaml-syntax",
    ],
)
def test_check_rules_reports_line_column_and_field(text: str, expected: str) -> None:
    problems = check_rules(text + "\n")

    assert [str(p) for p in problems] == [expected]


def test_load_rules_raises_with_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(
        "rules:\n  - id: a\n    when: {field: value, op: '=>', threshold: 1}\n"
        "    action: x\n    cooldown_s: -1\n"
    )

    with pytest.raises(RuleSetError) as caught:
        load_rules(path)

    lines = [(p.source, p.line, p.path) for p in caught.value.problems]
    assert lines == [
        (str(path), 3, "rules[0].when.op"),
        (str(path), 5, "rules[0].cooldown_s"),
    ]


def test_include_reports_problems_with_the_included_file(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("rules:\n  - id: b\n    action: x\n")
    (tmp_path / "all.yaml").write_text("include: [bad.yaml]\n")

    problems = check_rules(tmp_path / "all.yaml")

    assert [str(p) for p in problems] == [
        f"{tmp_path / 'bad.yaml'}:2:5: rules[0].when: is required"
    ]


def test_include_of_a_missing_file_is_reported_at_the_include_line(
    tmp_path: Path,
) -> None:
    (tmp_path / "site.yaml").write_text("version: 1\ninclude:\n  - gone.yaml\n")

    problems = check_rules(tmp_path / "site.yaml")

    assert [str(p) for p in problems] == [
        f"{tmp_path / 'site.yaml'}:3:5: include: no such file:"
        f" {tmp_path / 'gone.yaml'} (paths are relative to this file; copy the"
        " included files too)"
    ]


@pytest.mark.parametrize(("first_op", "second_op"), [("'>'", "'=>'"), ("'=>'", "'>'")])
def test_check_rules_reports_duplicate_ids_of_rules_with_other_problems(
    first_op: str, second_op: str
) -> None:
    """A repeated id is reported whichever of the two rules is otherwise invalid."""
    text = (
        f"rules:\n  - id: a\n    when: {{field: value, op: {first_op}, threshold: 1}}"
        f"\n    action: x\n  - id: a\n    when: {{field: value, op: {second_op},"
        " threshold: 2}\n    action: y\n"
    )

    problems = check_rules(text)

    paths = [p.path for p in problems]
    assert "rules[1].id" in paths
    assert len(problems) == 2


def test_check_rules_gives_the_field_path_of_a_duplicate_id_in_an_included_file(
    tmp_path: Path,
) -> None:
    rule = (
        "  - id: {}\n    when: {{field: value, op: '>', threshold: 1}}\n    action: x\n"
    )
    (tmp_path / "pack.yaml").write_text(
        "rules:\n" + rule.format("b") + rule.format("a")
    )
    (tmp_path / "site.yaml").write_text(
        "include: [pack.yaml]\nrules:\n" + rule.format("a")
    )

    problems = check_rules(tmp_path / "site.yaml")

    assert [str(p) for p in problems] == [
        f'{tmp_path / "pack.yaml"}:5:9: rules[1].id: duplicate rule id "a"'
        f" (first at {tmp_path / 'site.yaml'}:3)"
    ]


def test_check_rules_lists_placeholders_by_kind_once_when_no_known_field() -> None:
    text = (
        "rules:\n  - id: a\n    when: {field: valu, op: '>', threshold: 1}\n"
        "    action: x\n    command:\n      payload: {v: '{valu}', w: '{value}'}\n"
    )

    problems = check_rules(text)

    assert [p.path for p in problems] == [
        "rules[0].when.field",
        "rules[0].command.payload.v",
    ]
    message = problems[1].message
    assert message == (
        "unknown placeholder {valu} (known in every rule: device_id, metric, rule_id,"
        " action, time_ms, unit; rules on readings add value, anomaly_score; rules on"
        " windows add window_start_ms, window_end_ms, window.count, window.sum,"
        " window.min, window.max, window.mean, window.last, window.p50, window.p95,"
        " window.p99)"
    )


def test_check_rules_lists_window_placeholders_when_a_window_condition_is_bad() -> None:
    """A bad ``op`` does not hide that the rule is on windows."""
    text = (
        "rules:\n  - id: a\n    when: {field: window.mean, op: '=>', threshold: 1}\n"
        "    action: x\n    command:\n      payload: 'v={value}'\n"
    )

    problems = check_rules(text)

    placeholder = [p.message for p in problems if p.path == "rules[0].command.payload"]
    assert placeholder == [
        "unknown placeholder {value} (known here: device_id, metric, rule_id, action,"
        " time_ms, unit, window_start_ms, window_end_ms, window.count, window.sum,"
        " window.min, window.max, window.mean, window.last, window.p50, window.p95,"
        " window.p99)"
    ]


def test_check_rules_requires_a_command_payload_and_says_how_to_send_none() -> None:
    text = (
        "rules:\n  - id: a\n    when: {field: value, op: '>', threshold: 1}\n"
        "    action: x\n    command: {topic: 'devices/{device_id}/stop'}\n"
    )

    problems = check_rules(text)

    assert [str(p) for p in problems] == [
        "<rules>:5:14: rules[0].command.payload: is required (the message body;"
        ' payload: "" sends an empty one)'
    ]


def test_command_with_an_empty_payload_sends_an_empty_message() -> None:
    ruleset = parse_rules(
        "rules:\n  - id: a\n    when: {field: value, op: '>', threshold: 1}\n"
        "    action: x\n    command: {topic: 'devices/{device_id}/stop', payload: ''}\n"
    )

    result = decide(ruleset, RuleState(), reading(2.0), now_ms=1)

    assert result.decision is not None
    assert result.decision.command == {"topic": "devices/press-1/stop", "payload": ""}


@pytest.mark.parametrize("name", ["industrial.yaml", "traffic.yaml", "demo.yaml"])
def test_rule_packs_validate(name: str) -> None:
    assert check_rules(RULES_DIR / name) == []


def test_demo_pack_holds_both_packs() -> None:
    demo = load_rules(RULES_DIR / "demo.yaml")
    packs = [load_rules(RULES_DIR / n) for n in ("industrial.yaml", "traffic.yaml")]

    assert len(demo) == sum(len(pack) for pack in packs)


# -- contract over every condition type --------------------------------------------

CONTRACT_RULES = {
    "value": ("{field: value, op: '>', threshold: 10}", "reading"),
    "anomaly-score": ("{field: anomaly_score, op: '>=', threshold: 0.5}", "reading"),
    "window-field": ("{field: window.max, op: '>', threshold: 10}", "window"),
    "rate": ("{field: value, rate_per_s: true, op: '>', threshold: 0.001}", "reading"),
    "window-rate": (
        "{field: window.mean, rate_per_s: true, op: '>', threshold: 0.0001}",
        "window",
    ),
    "other-metric": (
        "[{field: value, op: '>', threshold: 10}, "
        "{field: value, metric: speed, op: '<', threshold: 50}]",
        "reading",
    ),
}


def contract_evaluations(kind: str) -> list[Evaluation]:
    if kind == "window":
        return [window(10.0 + i, 60_000 * (i + 1)) for i in range(6)]
    speed = [reading(30.0, 0, metric="speed")]
    scored = [reading(9.0 + i, 1000 * (i + 1), score=0.2 * i) for i in range(6)]
    return speed + scored


@pytest.mark.parametrize("name", sorted(CONTRACT_RULES))
def test_every_condition_type_is_deterministic_and_leaves_input_alone(
    name: str,
) -> None:
    when, kind = CONTRACT_RULES[name]
    text = f"rules:\n  - id: r\n    when: {when}\n    for: 2\n    action: a\n"
    text += "    cooldown_s: 2\n    confidence: 0.8\n"
    evaluations = contract_evaluations(kind)
    before = copy.deepcopy(evaluations)

    outcomes = []
    for _ in range(2):
        state = RuleState()
        results = run(parse_rules(text), state, evaluations)
        outcomes.append((results, state.to_bytes()))

    assert evaluations == before
    assert outcomes[0] == outcomes[1]
    decisions = [r.decision for r in outcomes[0][0] if r.decision]
    assert decisions, f"{name} never fired"
    assert all(0.0 <= d.confidence <= 1.0 for d in decisions)
    assert len(outcomes[0][1]) < 512


def test_rules_check_refuses_what_a_decision_record_cannot_carry(
    tmp_path: Path,
) -> None:
    """A priority past 64 bits or a YAML-only payload value would fail at firing."""
    path = tmp_path / "rules.yaml"
    path.write_text(
        "rules:\n"
        "  - id: a\n"
        "    when: {field: value, op: '>', threshold: 1}\n"
        "    action: x\n"
        "    priority: 1000000000000000000000\n"
        "    command:\n"
        "      payload: {blob: !!binary aGVsbG8=, big: 18446744073709551616}\n"
    )

    problems = check_rules(path)

    assert [(p.line, p.path) for p in problems] == [
        (5, "rules[0].priority"),
        (7, "rules[0].command.payload.blob"),
        (7, "rules[0].command.payload.big"),
    ]
    assert "must fit in 64 bits" in problems[0].message
    assert "got bytes" in problems[1].message
