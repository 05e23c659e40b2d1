"""Rules: parse and check rule files, then decide per evaluation with cooldowns.

A rule file (YAML, format in ``docs/RULES.md``) is parsed into :class:`RuleConfig`
objects, each checked with its line number, which build :class:`Rule` objects for
fast evaluation. :func:`decide` is a pure function of a :class:`RuleSet`, one
device's :class:`RuleState` and one :class:`Evaluation` (a reading with its anomaly
score, or a closed window summary); it updates that state in place and returns at
most one :class:`~models.records.Decision`.

Why one decision per evaluation: rules of one file often overlap (an anomaly rule
and a threshold rule see the same overheating), and a device should get one
command, the most important, not a burst. Only the top-priority applicable rule is
considered; when it is cooling down it is suppressed and no lower rule fires in its
place, so a cooldown really silences that situation for the device.

Cooldowns run on event time by default, so replaying the same readings gives the
same decisions. Nothing here does I/O except :func:`load_rules` and
:func:`check_rules`, which read the rule file (and the files it includes).
"""

from __future__ import annotations

import fnmatch
import math
import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
import yaml

from models.records import AnomalyScore, Decision, Reading, WindowSummary

__all__ = [
    "OPS",
    "WINDOW_FIELDS",
    "CommandConfig",
    "ConditionConfig",
    "Confidence",
    "DecideResult",
    "Evaluation",
    "Rule",
    "RuleConfig",
    "RuleProblem",
    "RuleSet",
    "RuleSetError",
    "RuleState",
    "check_rules",
    "decide",
    "load_rules",
    "parse_rules",
]

OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}
WINDOW_FIELDS = ("count", "sum", "min", "max", "mean", "last", "p50", "p95", "p99")
READING_FIELDS = ("value", "anomaly_score")
FIELDS = READING_FIELDS + tuple(f"window.{name}" for name in WINDOW_FIELDS)

_COMMON_PLACEHOLDERS = ("device_id", "metric", "rule_id", "action", "time_ms", "unit")
_KIND_PLACEHOLDERS: dict[str, tuple[str, ...]] = {
    "reading": READING_FIELDS,
    "window": ("window_start_ms", "window_end_ms")
    + tuple(f"window.{name}" for name in WINDOW_FIELDS),
}
PLACEHOLDERS: dict[str, tuple[str, ...]] = {
    kind: _COMMON_PLACEHOLDERS + names for kind, names in _KIND_PLACEHOLDERS.items()
}
DEFAULT_TOPIC = "devices/{device_id}/commands"
# A cross-metric condition older than this is stale: 15 minutes covers the 5-minute
# sampling of the traffic sensors with two missed readings.
DEFAULT_MAX_AGE_S = 900.0

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)?)\}")
_RULE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# A cached match list per (device, metric) series; cleared when it grows past this,
# which bounds memory at a few MB for sites with more series than that.
_MATCH_CACHE_LIMIT = 100_000

Kind = Literal["reading", "window"]
CooldownClock = Literal["event", "wall"]


# -- problems ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RuleProblem:
    """One problem in a rule file, with where it is.

    ``line`` and ``column`` count from 1; ``path`` is the field path in the file,
    for example ``rules[2].when.op``.
    """

    source: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}:{self.column}"
        if self.path:
            return f"{where}: {self.path}: {self.message}"
        return f"{where}: {self.message}"


class RuleSetError(ValueError):
    """A rule file is invalid; ``problems`` lists every problem found."""

    def __init__(self, problems: list[RuleProblem]) -> None:
        self.problems = problems
        lines = "\n".join(str(problem) for problem in problems)
        super().__init__(f"{len(problems)} problem(s) in rules:\n{lines}")


# -- configuration -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConditionConfig:
    """One comparison of a field against a number.

    With ``rate_per_s`` the field's change per second since the previous
    evaluation of the same series is compared instead of the field itself. With
    ``metric`` the latest ``value`` of another metric of the same device is
    compared, if it is at most ``max_age_s`` older or newer than the evaluation.
    """

    field: str
    op: str
    threshold: float
    rate_per_s: bool = False
    metric: str | None = None
    max_age_s: float = DEFAULT_MAX_AGE_S

    @property
    def kind(self) -> Kind:
        """Return the evaluation kind this condition needs."""
        return _field_kind(self.field)


@dataclass(frozen=True, slots=True)
class Confidence:
    """How a decision's confidence is set.

    ``fixed``: ``value`` itself. ``anomaly_score``: the evaluation's anomaly score
    clamped to ``[0, 1]``, or 0.5 when it has none. ``margin``: 0.5 at the
    threshold of the first condition, rising linearly to 1.0 when the observed
    value is ``value`` (in the field's unit) past it.
    """

    mode: Literal["fixed", "anomaly_score", "margin"] = "fixed"
    value: float = 1.0


@dataclass(frozen=True, slots=True)
class CommandConfig:
    """An MQTT command to send when the rule fires: topic and payload templates.

    ``payload`` is a string template, or a mapping whose string leaves are
    templates and which is sent as JSON.
    """

    topic: str = DEFAULT_TOPIC
    payload: str | dict[str, Any] = ""


@dataclass(frozen=True, slots=True)
class RuleConfig:
    """A rule as written in the file, already checked; :meth:`build` makes a Rule."""

    id: str
    action: str
    conditions: tuple[ConditionConfig, ...]
    device: str = "*"
    metric: str = "*"
    for_count: int = 1
    priority: int = 0
    cooldown_s: float = 0.0
    confidence: Confidence = field(default_factory=Confidence)
    command: CommandConfig | None = None
    description: str = ""

    @property
    def kind(self) -> Kind:
        """Return ``"window"`` for rules on window fields, else ``"reading"``."""
        return self.conditions[0].kind

    def build(self, order: int = 0) -> Rule:
        """Build the runtime rule; ``order`` breaks priority ties (lower wins)."""
        return Rule(self, order)


# -- runtime -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Evaluation:
    """What rules look at once: one reading (with its score) or one closed window.

    ``time_ms`` is event time: the reading's time, or the window's end.
    """

    device_id: str
    metric: str
    time_ms: int
    value: float | None = None
    anomaly_score: float | None = None
    unit: str | None = None
    window: WindowSummary | None = None

    @property
    def kind(self) -> Kind:
        """Return ``"window"`` when this evaluates a window summary."""
        return "window" if self.window is not None else "reading"

    @classmethod
    def of_reading(
        cls, reading: Reading, anomaly_score: float | None = None
    ) -> Evaluation:
        """Evaluate a reading, with its anomaly score when the detector gave one."""
        return cls(
            device_id=reading.device_id,
            metric=reading.metric,
            time_ms=reading.time_ms,
            value=reading.value,
            anomaly_score=anomaly_score,
            unit=reading.unit,
        )

    @classmethod
    def of_score(cls, score: AnomalyScore) -> Evaluation:
        """Evaluate a scored reading."""
        return cls(
            device_id=score.device_id,
            metric=score.metric,
            time_ms=score.time_ms,
            value=score.value,
            anomaly_score=score.anomaly_score,
            unit=score.unit,
        )

    @classmethod
    def of_window(cls, summary: WindowSummary) -> Evaluation:
        """Evaluate a closed window summary at its end time."""
        return cls(
            device_id=summary.device_id,
            metric=summary.metric,
            time_ms=summary.window_end_ms,
            unit=summary.unit,
            window=summary,
        )

    def observe(self, name: str) -> float | None:
        """Return a field (``value``, ``anomaly_score``, ``window.mean``, ...)."""
        if name == "value":
            return self.value
        if name == "anomaly_score":
            return self.anomaly_score
        if self.window is None:
            return None
        return float(getattr(self.window, name[len("window.") :]))


@dataclass(slots=True)
class RuleState:
    """One device's rule state: cooldowns, streaks and remembered values.

    Plain dicts so it encodes to a few hundred bytes of JSON for a Faust table:
    ``cooldowns`` maps rule_id to last_fired_at_ms; ``streaks`` maps metric to
    rule_id to the count of consecutive evaluations meeting the condition (zero
    counts are dropped); ``previous`` maps metric to field to ``[time_ms, value]``
    for rate-of-change conditions; ``latest`` maps metric to ``[time_ms, value]``
    for metrics that other metrics' conditions refer to.
    """

    cooldowns: dict[str, int] = field(default_factory=dict)
    streaks: dict[str, dict[str, int]] = field(default_factory=dict)
    previous: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    latest: dict[str, list[float]] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """Encode as compact JSON."""
        return orjson.dumps(
            {
                "cooldowns": self.cooldowns,
                "streaks": self.streaks,
                "previous": self.previous,
                "latest": self.latest,
            }
        )

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> RuleState:
        """Decode :meth:`to_bytes` output; ``None`` or empty bytes give a new state.

        Raises:
            ValueError: ``raw`` is not JSON or not a JSON object.
        """
        if not raw:
            return cls()
        data = orjson.loads(raw)
        if not isinstance(data, dict):
            raise ValueError(f"rule state must be a JSON object, got {type(data)}")
        return cls(
            cooldowns=dict(data.get("cooldowns", {})),
            streaks=dict(data.get("streaks", {})),
            previous=dict(data.get("previous", {})),
            latest=dict(data.get("latest", {})),
        )


@dataclass(frozen=True, slots=True)
class DecideResult:
    """The outcome of one evaluation.

    ``decision`` is the decision of the top applicable rule, or ``None``;
    ``suppressed`` holds its rule_id when that rule was cooling down.
    """

    decision: Decision | None = None
    suppressed: tuple[str, ...] = ()


_Template = tuple[str | tuple[str], ...]


def _compile_template(text: str) -> _Template:
    parts: list[str | tuple[str]] = []
    position = 0
    for found in _PLACEHOLDER.finditer(text):
        if found.start() > position:
            parts.append(text[position : found.start()])
        parts.append((found.group(1),))
        position = found.end()
    if position < len(text):
        parts.append(text[position:])
    return tuple(parts)


def _placeholders(text: str) -> list[str]:
    return [found.group(1) for found in _PLACEHOLDER.finditer(text)]


def _format_scalar(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _render(template: _Template, values: dict[str, Any]) -> Any:
    # A leaf that is exactly one placeholder keeps the value's type (a number stays
    # a number in a JSON payload); anything else renders as text.
    if len(template) == 1 and isinstance(template[0], tuple):
        return values[template[0][0]]
    return "".join(
        _format_scalar(values[part[0]]) if isinstance(part, tuple) else part
        for part in template
    )


def _compile_payload(payload: Any) -> Any:
    if isinstance(payload, str):
        return _compile_template(payload)
    if isinstance(payload, dict):
        return {key: _compile_payload(item) for key, item in payload.items()}
    if isinstance(payload, list):
        return [_compile_payload(item) for item in payload]
    return payload


def _render_payload(compiled: Any, values: dict[str, Any]) -> Any:
    if isinstance(compiled, tuple):
        return _render(compiled, values)
    if isinstance(compiled, dict):
        return {key: _render_payload(item, values) for key, item in compiled.items()}
    if isinstance(compiled, list):
        return [_render_payload(item, values) for item in compiled]
    return compiled


class Rule:
    """A rule ready for evaluation, built from a :class:`RuleConfig`.

    Immutable after construction; safe to share between tasks.
    """

    __slots__ = (
        "config",
        "order",
        "_device",
        "_metric",
        "_compares",
        "_topic",
        "_payload",
        "_payload_is_text",
    )

    def __init__(self, config: RuleConfig, order: int = 0) -> None:
        self.config = config
        self.order = order
        self._device = re.compile(fnmatch.translate(config.device)).match
        self._metric = re.compile(fnmatch.translate(config.metric)).match
        self._compares = tuple(OPS[c.op] for c in config.conditions)
        command = config.command
        self._topic = _compile_template(command.topic) if command else None
        self._payload = _compile_payload(command.payload) if command else None
        self._payload_is_text = command is not None and isinstance(command.payload, str)

    @property
    def id(self) -> str:
        """Return the rule's id."""
        return self.config.id

    def matches(self, device_id: str, metric: str) -> bool:
        """Return whether the rule's device and metric globs match the series."""
        return bool(self._device(device_id)) and bool(self._metric(metric))

    def check(
        self,
        evaluation: Evaluation,
        state: RuleState,
        rates: dict[str, float | None],
    ) -> list[dict[str, Any]] | None:
        """Return the evidence of each condition when all hold, else ``None``.

        ``rates`` maps a field to its change per second in this evaluation. Does
        not touch the state's streaks; :func:`decide` does.
        """
        evidence = []
        for condition, compare in zip(
            self.config.conditions, self._compares, strict=True
        ):
            observed = _observe(condition, evaluation, state, rates)
            if observed is None or not compare(observed, condition.threshold):
                return None
            evidence.append(_condition_evidence(condition, observed))
        return evidence

    def render_command(self, values: dict[str, Any]) -> dict[str, Any] | None:
        """Render the MQTT command as ``{"topic": ..., "payload": ...}``."""
        if self._topic is None:
            return None
        topic = _render(self._topic, values)
        payload = _render_payload(self._payload, values)
        if not self._payload_is_text:
            payload = orjson.dumps(payload).decode()
        return {"topic": _format_scalar(topic), "payload": _format_scalar(payload)}

    def __repr__(self) -> str:
        return f"Rule(id={self.id!r}, priority={self.config.priority})"


def _observe(
    condition: ConditionConfig,
    evaluation: Evaluation,
    state: RuleState,
    rates: dict[str, float | None],
) -> float | None:
    if condition.rate_per_s:
        return rates.get(condition.field)
    if condition.metric is None or condition.metric == evaluation.metric:
        return evaluation.observe(condition.field)
    latest = state.latest.get(condition.metric)
    if latest is None:
        return None
    age_ms = abs(evaluation.time_ms - latest[0])
    if age_ms > condition.max_age_s * 1000:
        return None
    return latest[1]


def _condition_evidence(condition: ConditionConfig, observed: float) -> dict[str, Any]:
    evidence: dict[str, Any] = {
        "field": condition.field,
        "observed": observed,
        "op": condition.op,
        "threshold": condition.threshold,
    }
    if condition.rate_per_s:
        evidence["rate_per_s"] = True
    if condition.metric is not None:
        evidence["metric"] = condition.metric
    return evidence


class RuleSet:
    """The rules of one or more files, ordered by priority (then file order).

    Holds a memo of which rules match each (device, metric) series; otherwise
    immutable. Not safe for use from several threads at once; one per worker.
    """

    def __init__(
        self, rules: Iterable[Rule], cooldown_clock: CooldownClock = "event"
    ) -> None:
        self.rules = tuple(
            sorted(rules, key=lambda rule: (-rule.config.priority, rule.order))
        )
        self.cooldown_clock = cooldown_clock
        self.watched_metrics = frozenset(
            condition.metric
            for rule in self.rules
            for condition in rule.config.conditions
            if condition.metric is not None
        )
        self._matches: dict[tuple[str, str], tuple[Rule, ...]] = {}

    def __len__(self) -> int:
        return len(self.rules)

    def rule(self, rule_id: str) -> Rule:
        """Return the rule with this id.

        Raises:
            KeyError: no rule has this id.
        """
        for rule in self.rules:
            if rule.id == rule_id:
                return rule
        raise KeyError(rule_id)

    def rules_for(self, device_id: str, metric: str) -> tuple[Rule, ...]:
        """Return the rules matching a series, highest priority first."""
        key = (device_id, metric)
        found = self._matches.get(key)
        if found is None:
            if len(self._matches) >= _MATCH_CACHE_LIMIT:
                self._matches.clear()
            found = tuple(r for r in self.rules if r.matches(device_id, metric))
            self._matches[key] = found
        return found


# -- decide ------------------------------------------------------------------------


def decide(
    ruleset: RuleSet, state: RuleState, evaluation: Evaluation, now_ms: int
) -> DecideResult:
    """Evaluate one device's rules on one evaluation and pick at most one decision.

    Every rule matching the series and of the evaluation's kind is evaluated, and
    its streak of consecutive evaluations meeting the condition is updated (a rule
    whose field is missing, such as an anomaly score during warm-up, is skipped
    and keeps its streak). Among the rules whose streak reached their ``for``
    count, the highest priority (then the earliest in the file) is the top rule.
    It fires unless it fired for this device less than ``cooldown_s`` ago; then it
    is suppressed and nothing fires. A cooldown of ``cooldown_s`` ends exactly
    ``cooldown_s`` after the last firing.

    Args:
        ruleset: the rules.
        state: this device's rule state; updated in place (streaks, remembered
            values and, when a rule fires, its cooldown).
        evaluation: the reading or window; never modified.
        now_ms: wall clock, epoch ms UTC: the decision's ``decided_at_ms``, and the
            cooldown clock when the rule set uses ``cooldown_clock: wall``.

    Returns:
        The decision, if any, and the rule ids suppressed by a cooldown.
    """
    metric = evaluation.metric
    rules = ruleset.rules_for(evaluation.device_id, metric)
    rates = _rates(rules, state, evaluation)
    streaks = state.streaks.get(metric, {})
    top: tuple[Rule, list[dict[str, Any]], int] | None = None

    for rule in rules:
        config = rule.config
        if config.kind != evaluation.kind or not _evaluable(config, evaluation):
            continue
        evidence = rule.check(evaluation, state, rates)
        if evidence is None:
            streaks.pop(rule.id, None)
            continue
        count = streaks.get(rule.id, 0) + 1
        streaks[rule.id] = count
        if top is None and count >= config.for_count:
            top = (rule, evidence, count)

    _store_streaks(state, metric, streaks)
    _remember(ruleset, state, evaluation, rules)
    if top is None:
        return DecideResult()
    return _fire(ruleset, state, evaluation, now_ms, *top)


def _evaluable(config: RuleConfig, evaluation: Evaluation) -> bool:
    # Only the anomaly score can be absent from its kind of evaluation.
    if evaluation.anomaly_score is not None or evaluation.kind == "window":
        return True
    return all(c.field != "anomaly_score" for c in config.conditions)


def _store_streaks(state: RuleState, metric: str, streaks: dict[str, int]) -> None:
    if streaks:
        state.streaks[metric] = streaks
    else:
        state.streaks.pop(metric, None)


def _rates(
    rules: tuple[Rule, ...], state: RuleState, evaluation: Evaluation
) -> dict[str, float | None]:
    rates: dict[str, float | None] = {}
    previous = state.previous.get(evaluation.metric, {})
    for rule in rules:
        for condition in rule.config.conditions:
            name = condition.field
            if not condition.rate_per_s or name in rates:
                continue
            rates[name] = None
            current = evaluation.observe(name)
            before = previous.get(name)
            if current is None or before is None:
                continue
            elapsed_s = (evaluation.time_ms - before[0]) / 1000
            # Out of order or repeated times give no rate rather than a huge one.
            if elapsed_s > 0:
                rates[name] = (current - before[1]) / elapsed_s
    return rates


def _remember(
    ruleset: RuleSet,
    state: RuleState,
    evaluation: Evaluation,
    rules: tuple[Rule, ...],
) -> None:
    time_ms = evaluation.time_ms
    if evaluation.metric in ruleset.watched_metrics and evaluation.value is not None:
        state.latest[evaluation.metric] = [time_ms, evaluation.value]
    fields = {
        condition.field
        for rule in rules
        for condition in rule.config.conditions
        if condition.rate_per_s
    }
    if not fields:
        return
    previous = state.previous.setdefault(evaluation.metric, {})
    for name in fields:
        current = evaluation.observe(name)
        before = previous.get(name)
        if current is None or (before is not None and time_ms <= before[0]):
            continue
        previous[name] = [time_ms, current]


def _fire(
    ruleset: RuleSet,
    state: RuleState,
    evaluation: Evaluation,
    now_ms: int,
    rule: Rule,
    evidence: list[dict[str, Any]],
    count: int,
) -> DecideResult:
    config = rule.config
    clock_ms = evaluation.time_ms if ruleset.cooldown_clock == "event" else now_ms
    last_ms = state.cooldowns.get(config.id)
    if last_ms is not None and clock_ms - last_ms < config.cooldown_s * 1000:
        return DecideResult(suppressed=(config.id,))

    state.cooldowns[config.id] = clock_ms
    values = _template_values(config, evaluation)
    decision = Decision(
        rule_id=config.id,
        device_id=evaluation.device_id,
        metric=evaluation.metric,
        action=config.action,
        priority=config.priority,
        confidence=_confidence(config, evaluation, evidence),
        time_ms=evaluation.time_ms,
        decided_at_ms=now_ms,
        evidence={
            "conditions": evidence,
            "consecutive": count,
            "anomaly_score": evaluation.anomaly_score,
        },
        command=rule.render_command(values),
    )
    return DecideResult(decision=decision)


def _template_values(config: RuleConfig, evaluation: Evaluation) -> dict[str, Any]:
    values: dict[str, Any] = {
        "device_id": evaluation.device_id,
        "metric": evaluation.metric,
        "rule_id": config.id,
        "action": config.action,
        "time_ms": evaluation.time_ms,
        "unit": evaluation.unit,
        "value": evaluation.value,
        "anomaly_score": evaluation.anomaly_score,
    }
    window = evaluation.window
    if window is not None:
        values["window_start_ms"] = window.window_start_ms
        values["window_end_ms"] = window.window_end_ms
        for name in WINDOW_FIELDS:
            values[f"window.{name}"] = getattr(window, name)
    return values


def _confidence(
    config: RuleConfig, evaluation: Evaluation, evidence: list[dict[str, Any]]
) -> float:
    confidence = config.confidence
    if confidence.mode == "fixed":
        return confidence.value
    if confidence.mode == "anomaly_score":
        score = evaluation.anomaly_score
        return 0.5 if score is None else min(1.0, max(0.0, score))
    first = evidence[0]
    excess = float(first["observed"]) - float(first["threshold"])
    if first["op"] in ("<", "<="):
        excess = -excess
    elif first["op"] in ("==", "!="):
        excess = abs(excess)
    return 0.5 + 0.5 * min(1.0, max(0.0, excess) / confidence.value)


# -- loading and checking ----------------------------------------------------------


_TOP_KEYS = {"version", "cooldown_clock", "include", "rules"}
_RULE_KEYS = {
    "id",
    "description",
    "match",
    "when",
    "for",
    "priority",
    "cooldown_s",
    "action",
    "confidence",
    "command",
}
_MATCH_KEYS = {"device", "metric"}
_CONDITION_KEYS = {"field", "op", "threshold", "rate_per_s", "metric", "max_age_s"}
_COMMAND_KEYS = {"topic", "payload"}
_Node = yaml.Node


def _got(value: Any) -> str:
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"got {orjson.dumps(shown).decode()}"
    if value is None:
        return "got null"
    if isinstance(value, bool | int | float):
        return f"got {value!r} ({type(value).__name__})"
    if isinstance(value, dict):
        return "got a mapping"
    if isinstance(value, list):
        return "got a list"
    return f"got {type(value).__name__}"


def _field_kind(name: str) -> Kind:
    return "window" if name.startswith("window.") else "reading"


_ALL_PLACEHOLDERS_TEXT = (
    f"known in every rule: {', '.join(_COMMON_PLACEHOLDERS)};"
    f" rules on readings add {', '.join(_KIND_PLACEHOLDERS['reading'])};"
    f" rules on windows add {', '.join(_KIND_PLACEHOLDERS['window'])}"
)


def _glob_problem(pattern: str) -> str | None:
    if not pattern.strip():
        return "must be a non-empty glob"
    depth = 0
    for char in pattern:
        if char == "[":
            depth += 1
        elif char == "]" and depth:
            depth -= 1
    if depth:
        return f'must be a valid glob (unclosed "["), {_got(pattern)}'
    return None


class _Parser:
    """Walks a composed YAML tree, collecting problems with their positions."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[RuleProblem] = []
        # Every well-formed rule id with its node and field path, also of rules
        # that are invalid otherwise, so duplicates are found in any case.
        self.ids: list[tuple[str, _Node, str]] = []
        self._loader = yaml.SafeLoader("")

    def problem(self, node: _Node, path: str, message: str) -> None:
        mark = node.start_mark
        self.problems.append(
            RuleProblem(self.source, mark.line + 1, mark.column + 1, path, message)
        )

    def value(self, node: _Node) -> Any:
        return self._loader.construct_object(node, deep=True)

    def mapping(
        self, node: _Node, path: str, allowed: set[str], required: Iterable[str] = ()
    ) -> dict[str, _Node] | None:
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, path, f"must be a mapping, {_got(self.value(node))}")
            return None
        found: dict[str, _Node] = {}
        for key_node, value_node in node.value:
            key = self.value(key_node)
            where = f"{path}.{key}" if path else str(key)
            if not isinstance(key, str) or key not in allowed:
                known = ", ".join(sorted(allowed))
                self.problem(key_node, where, f"unknown key (known: {known})")
            elif key in found:
                self.problem(key_node, where, "duplicate key")
            else:
                found[key] = value_node
        for key in required:
            if key not in found:
                where = f"{path}.{key}" if path else key
                self.problem(node, where, "is required")
        return found

    def string(self, node: _Node, path: str) -> str | None:
        value = self.value(node)
        if isinstance(value, str) and value:
            return value
        self.problem(node, path, f"must be a non-empty string, {_got(value)}")
        return None

    def number(
        self, node: _Node, path: str, minimum: float | None = None
    ) -> float | None:
        value = self.value(node)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problem(node, path, f"must be a number, {_got(value)}")
            return None
        if not math.isfinite(value):
            self.problem(node, path, f"must be a finite number, {_got(value)}")
            return None
        if minimum is not None and value < minimum:
            self.problem(node, path, f"must be >= {minimum:g}, {_got(value)}")
            return None
        return float(value)

    def integer(self, node: _Node, path: str, minimum: int | None = None) -> int | None:
        value = self.value(node)
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(node, path, f"must be an integer, {_got(value)}")
            return None
        if minimum is not None and value < minimum:
            self.problem(node, path, f"must be >= {minimum}, {_got(value)}")
            return None
        if not -(2**63) <= value < 2**63:
            # Decision records carry it as a JSON integer of 64 bits.
            self.problem(node, path, f"must fit in 64 bits, {_got(value)}")
            return None
        return value

    def boolean(self, node: _Node, path: str) -> bool | None:
        value = self.value(node)
        if isinstance(value, bool):
            return value
        self.problem(node, path, f"must be true or false, {_got(value)}")
        return None

    def glob(self, node: _Node, path: str) -> str | None:
        pattern = self.string(node, path)
        if pattern is None:
            return None
        problem = _glob_problem(pattern)
        if problem is not None:
            self.problem(node, path, problem)
            return None
        return pattern

    # -- file ----------------------------------------------------------------------

    def top(self, node: _Node) -> tuple[CooldownClock, list[_Node], list[RuleConfig]]:
        """Return the cooldown clock, the include nodes and the valid rules."""
        keys = self.mapping(node, "", _TOP_KEYS)
        if keys is None:
            return "event", [], []
        if "version" in keys:
            version = self.value(keys["version"])
            if version != 1:
                self.problem(keys["version"], "version", f"must be 1, {_got(version)}")
        clock: CooldownClock = "event"
        if "cooldown_clock" in keys:
            value = self.value(keys["cooldown_clock"])
            if value in ("event", "wall"):
                clock = value
            else:
                message = f'must be "event" or "wall", {_got(value)}'
                self.problem(keys["cooldown_clock"], "cooldown_clock", message)
        includes = self.include_list(keys.get("include"))
        rules: list[RuleConfig] = []
        rules_node = keys.get("rules")
        if rules_node is None:
            if not includes:
                self.problem(node, "rules", "is required (or include)")
        elif not isinstance(rules_node, yaml.SequenceNode):
            message = f"must be a list, {_got(self.value(rules_node))}"
            self.problem(rules_node, "rules", message)
        else:
            for index, item in enumerate(rules_node.value):
                rule = self.rule(item, f"rules[{index}]")
                if rule is not None:
                    rules.append(rule)
        return clock, includes, rules

    def include_list(self, node: _Node | None) -> list[_Node]:
        if node is None:
            return []
        if not isinstance(node, yaml.SequenceNode):
            self.problem(node, "include", f"must be a list, {_got(self.value(node))}")
            return []
        good = []
        for index, item in enumerate(node.value):
            if self.string(item, f"include[{index}]") is not None:
                good.append(item)
        return good

    def rule(self, node: _Node, path: str) -> RuleConfig | None:
        keys = self.mapping(node, path, _RULE_KEYS, ("id", "when", "action"))
        if keys is None:
            return None
        before = len(self.problems)
        rule_id = self.rule_id(keys.get("id"), f"{path}.id")
        if rule_id is not None:
            self.ids.append((rule_id, keys["id"], f"{path}.id"))
        device, metric = self.match(keys.get("match"), f"{path}.match")
        conditions = self.conditions(keys.get("when"), f"{path}.when")
        kind = self.kind(keys.get("when"), f"{path}.when")
        fields: dict[str, Any] = {}
        optional = (
            ("for", "for_count", lambda n, p: self.integer(n, p, minimum=1)),
            ("priority", "priority", self.integer),
            ("cooldown_s", "cooldown_s", lambda n, p: self.number(n, p, minimum=0)),
            ("description", "description", self.string),
            ("action", "action", self.string),
        )
        for key, name, read in optional:
            if key in keys:
                fields[name] = read(keys[key], f"{path}.{key}")
        if "confidence" in keys:
            fields["confidence"] = self.confidence(
                keys["confidence"], f"{path}.confidence", conditions, kind
            )
        if "command" in keys:
            fields["command"] = self.command(keys["command"], f"{path}.command", kind)
        if len(self.problems) > before or rule_id is None or not conditions:
            return None
        return RuleConfig(
            id=rule_id, device=device, metric=metric, conditions=tuple(conditions),
            **fields,
        )  # fmt: skip

    def rule_id(self, node: _Node | None, path: str) -> str | None:
        if node is None:
            return None
        value = self.value(node)
        if isinstance(value, str) and _RULE_ID.match(value):
            return value
        message = "must be 1-64 letters, digits, '_', '-' or '.'"
        self.problem(node, path, f"{message}, {_got(value)}")
        return None

    def match(self, node: _Node | None, path: str) -> tuple[str, str]:
        if node is None:
            return "*", "*"
        keys = self.mapping(node, path, _MATCH_KEYS) or {}
        device = metric = "*"
        if "device" in keys:
            device = self.glob(keys["device"], f"{path}.device") or "*"
        if "metric" in keys:
            metric = self.glob(keys["metric"], f"{path}.metric") or "*"
        return device, metric

    def conditions(self, node: _Node | None, path: str) -> list[ConditionConfig]:
        if node is None:
            return []
        if isinstance(node, yaml.SequenceNode):
            items = [(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
            if not items:
                self.problem(node, path, "must hold at least one condition")
        else:
            items = [(node, path)]
        found = [self.condition(item, where) for item, where in items]
        return [condition for condition in found if condition is not None]

    def condition(self, node: _Node, path: str) -> ConditionConfig | None:
        keys = self.mapping(node, path, _CONDITION_KEYS, ("field", "op", "threshold"))
        if keys is None:
            return None
        before = len(self.problems)
        name = op = None
        if "field" in keys:
            name = self.value(keys["field"])
            if name not in FIELDS:
                known = ", ".join(FIELDS)
                message = f"must be one of {known}, {_got(name)}"
                self.problem(keys["field"], f"{path}.field", message)
        if "op" in keys:
            op = self.value(keys["op"])
            if op not in OPS:
                message = f"must be one of {', '.join(OPS)}, {_got(op)}"
                self.problem(keys["op"], f"{path}.op", message)
        threshold = None
        if "threshold" in keys:
            threshold = self.number(keys["threshold"], f"{path}.threshold")
        rate = False
        if "rate_per_s" in keys:
            rate = bool(self.boolean(keys["rate_per_s"], f"{path}.rate_per_s"))
        metric = None
        if "metric" in keys:
            metric = self.string(keys["metric"], f"{path}.metric")
            if name != "value" or rate:
                message = "is allowed only with field: value and no rate_per_s"
                self.problem(keys["metric"], f"{path}.metric", message)
        max_age_s = DEFAULT_MAX_AGE_S
        if "max_age_s" in keys:
            max_age_s = self.number(keys["max_age_s"], f"{path}.max_age_s", 0) or 0.0
            if metric is None:
                message = "is allowed only with metric"
                self.problem(keys["max_age_s"], f"{path}.max_age_s", message)
        if len(self.problems) > before or name is None or op is None:
            return None
        if threshold is None:
            return None
        return ConditionConfig(name, op, threshold, rate, metric, max_age_s)

    def kind(self, node: _Node | None, path: str) -> Kind | None:
        """Return the kind of the known fields named in ``when``, if there is one.

        Conditions with other problems count too (a bad ``op`` does not hide that
        the rule is on windows), so the placeholders are checked against the kind
        the author meant. ``None`` when no known field is named, or they mix kinds.
        """
        items = node.value if isinstance(node, yaml.SequenceNode) else [node]
        kinds = set()
        for item in items:
            if not isinstance(item, yaml.MappingNode):
                continue
            for key_node, value_node in item.value:
                name = self.value(value_node) if key_node.value == "field" else None
                if name in FIELDS:
                    kinds.add(_field_kind(name))
        if len(kinds) > 1 and node is not None:
            message = "cannot mix window fields with value or anomaly_score"
            self.problem(node, path, message)
            return None
        return kinds.pop() if kinds else None

    def confidence(
        self,
        node: _Node,
        path: str,
        conditions: list[ConditionConfig],
        kind: Kind | None,
    ) -> Confidence:
        value = self.value(node)
        if value == "anomaly_score":
            if kind == "window":
                message = "anomaly_score needs a rule on value or anomaly_score"
                self.problem(node, path, message)
            return Confidence("anomaly_score")
        if isinstance(node, yaml.MappingNode):
            keys = self.mapping(node, path, {"margin"}, ("margin",)) or {}
            margin = None
            if "margin" in keys:
                margin = self.number(keys["margin"], f"{path}.margin", minimum=0)
                if margin == 0:
                    self.problem(keys["margin"], f"{path}.margin", "must be > 0")
                    margin = None
            return Confidence("margin", margin or 1.0)
        number = self.number(node, path)
        if number is not None and not 0 <= number <= 1:
            message = "must be a number in [0, 1], anomaly_score or {margin: N}"
            self.problem(node, path, f"{message}, {_got(value)}")
        return Confidence("fixed", 1.0 if number is None else number)

    def command(self, node: _Node, path: str, kind: Kind | None) -> CommandConfig:
        keys = self.mapping(node, path, _COMMAND_KEYS)
        if keys is None:
            keys = {}
        elif "payload" not in keys:
            # An empty message is rarely meant; one who means it can write it.
            message = 'is required (the message body; payload: "" sends an empty one)'
            self.problem(node, f"{path}.payload", message)
        topic = DEFAULT_TOPIC
        if "topic" in keys:
            topic = self.string(keys["topic"], f"{path}.topic") or DEFAULT_TOPIC
            self.template(keys["topic"], f"{path}.topic", topic, kind)
            if "+" in topic or "#" in topic:
                message = "must not contain the MQTT wildcards + or #"
                self.problem(keys["topic"], f"{path}.topic", message)
        payload: Any = ""
        if "payload" in keys:
            payload = self.payload(keys["payload"], f"{path}.payload", kind)
        return CommandConfig(topic, payload)

    def payload(self, node: _Node, path: str, kind: Kind | None) -> Any:
        if isinstance(node, yaml.MappingNode):
            result = {}
            for key_node, value_node in node.value:
                key = self.value(key_node)
                if not isinstance(key, str):
                    self.problem(key_node, path, f"keys must be strings, {_got(key)}")
                    continue
                result[key] = self.payload(value_node, f"{path}.{key}", kind)
            return result
        if isinstance(node, yaml.SequenceNode):
            items = enumerate(node.value)
            return [self.payload(item, f"{path}[{i}]", kind) for i, item in items]
        value = self.value(node)
        if isinstance(value, str):
            self.template(node, path, value, kind)
        elif isinstance(value, int) and not -(2**63) <= value < 2**64:
            self.problem(node, path, f"must fit in 64 bits, {_got(value)}")
        elif value is not None and not isinstance(value, bool | int | float):
            # YAML also makes bytes (!!binary), dates and timestamps; the command
            # payload is JSON, which has none of them.
            message = (
                "must be text, a number, true, false or null (quote dates),"
                f" {_got(value)}"
            )
            self.problem(node, path, message)
        return value

    def template(self, node: _Node, path: str, text: str, kind: Kind | None) -> None:
        """Report each placeholder of ``text`` that a rule of ``kind`` lacks.

        With ``kind`` unknown (``when`` names no known field) only names that no
        rule has are reported, and the message lists what each kind has.
        """
        for name in _placeholders(text):
            if kind is not None and name not in PLACEHOLDERS[kind]:
                known = f"known here: {', '.join(PLACEHOLDERS[kind])}"
            elif kind is None and not any(name in p for p in PLACEHOLDERS.values()):
                known = _ALL_PLACEHOLDERS_TEXT
            else:
                continue
            self.problem(node, path, f"unknown placeholder {{{name}}} ({known})")


def _read_source(source: str | Path) -> tuple[str, str, Path | None]:
    """Return (name, text, path) of a rule source; see :func:`load_rules`."""
    is_path = isinstance(source, Path) or (
        "\n" not in source and source.endswith((".yaml", ".yml"))
    )
    if not is_path:
        return "<rules>", str(source), None
    path = Path(source)
    return str(path), path.read_text(encoding="utf-8"), path


@dataclass(slots=True)
class _Parsed:
    """What reading a rule file (and the files it includes) found."""

    problems: list[RuleProblem] = field(default_factory=list)
    clock: CooldownClock = "event"
    rules: list[RuleConfig] = field(default_factory=list)
    # (source, rule id, node of the id, field path) of every well-formed id.
    ids: list[tuple[str, str, _Node, str]] = field(default_factory=list)


def _parse(
    source: str | Path, seen: frozenset[Path] = frozenset(), text: str | None = None
) -> _Parsed:
    path: Path | None = None
    if text is not None:
        name = str(source)
    else:
        try:
            name, text, path = _read_source(source)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            problem = RuleProblem(str(source), 1, 1, "", f"cannot read: {reason}")
            return _Parsed([problem])
    parser = _Parser(name)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        message = f"invalid YAML: {exc.problem or exc.context}"
        return _Parsed([RuleProblem(name, line, column, "", message)])
    except yaml.YAMLError as exc:
        return _Parsed([RuleProblem(name, 1, 1, "", f"invalid YAML: {exc}")])
    if root is None:
        return _Parsed([RuleProblem(name, 1, 1, "", "file is empty")])

    clock, includes, configs = parser.top(root)
    ids = [(name, *found) for found in parser.ids]
    parsed = _Parsed(parser.problems, clock, configs, ids)
    for include in includes:
        target = str(parser.value(include))
        if path is None:
            message = "include is allowed only in files"
            parser.problem(include, "include", message)
            continue
        target_path = (path.parent / target).resolve()
        if not target_path.is_file():
            parser.problem(
                include,
                "include",
                f"no such file: {target_path} (paths are relative to this file;"
                " copy the included files too)",
            )
            continue
        if target_path in seen or target_path == path.resolve():
            parser.problem(include, "include", f"includes itself: {target}")
            continue
        more = _parse(target_path, seen | {path.resolve()})
        parsed.problems.extend(more.problems)
        parsed.rules.extend(more.rules)
        parsed.ids.extend(more.ids)
    return parsed


def _duplicate_ids(ids: list[tuple[str, str, _Node, str]]) -> list[RuleProblem]:
    """Return a problem for each repeat of a rule id, pointing at the first."""
    first: dict[str, tuple[str, _Node]] = {}
    problems = []
    for source, rule_id, node, path in ids:
        if rule_id not in first:
            first[rule_id] = (source, node)
            continue
        first_source, first_node = first[rule_id]
        where = f"{first_source}:{first_node.start_mark.line + 1}"
        message = f'duplicate rule id "{rule_id}" (first at {where})'
        mark = node.start_mark
        problems.append(
            RuleProblem(source, mark.line + 1, mark.column + 1, path, message)
        )
    return problems


def _check(
    source: str | Path, text: str | None = None
) -> tuple[list[RuleProblem], RuleSet]:
    parsed = _parse(source, text=text)
    problems = parsed.problems + _duplicate_ids(parsed.ids)
    problems.sort(key=lambda p: (p.source, p.line, p.column))
    rules = [config.build(order) for order, config in enumerate(parsed.rules)]
    return problems, RuleSet(rules, parsed.clock)


def check_rules(source: str | Path) -> list[RuleProblem]:
    """Check a rule file and return every problem found, in file order.

    Args:
        source: as for :func:`load_rules`.

    Returns:
        The problems; empty when the file is valid.
    """
    return _check(source)[0]


def load_rules(source: str | Path) -> RuleSet:
    """Load a rule file (and the files it includes) into a rule set.

    Args:
        source: a :class:`~pathlib.Path`, or a ``str`` without line breaks ending
            in ``.yaml`` or ``.yml``, is read as a file; any other ``str`` is YAML
            text. Included files are resolved relative to the including file.

    Returns:
        The rules, highest priority first.

    Raises:
        RuleSetError: the file is unreadable or invalid; ``problems`` lists each
            problem with its line, column and field path.
    """
    problems, ruleset = _check(source)
    if problems:
        raise RuleSetError(problems)
    return ruleset


def parse_rules(text: str, source: str = "<rules>") -> RuleSet:
    """Load rules from YAML text, naming it ``source`` in problems.

    Raises:
        RuleSetError: the text is invalid.
    """
    problems, ruleset = _check(source, text=text)
    if problems:
        raise RuleSetError(problems)
    return ruleset
