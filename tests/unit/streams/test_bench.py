"""The bench runner's table, result files and bench selection (no timing)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from streams.bench import BenchFigure, runner
from streams.bench.live import percentile

FIGURES = [
    BenchFigure(
        bench="bridge",
        name="QoS 1 into Kafka",
        value=12345.6,
        unit="messages/s",
        baseline=15000.0,
        baseline_name="bare paho subscriber",
        ratio=0.823,
        target=">= 0.8",
        met=True,
        note="20,000 messages",
    ),
    BenchFigure(bench="nab", name="threshold | standard", value=0.5381, unit="score"),
]


def test_format_table_has_one_row_per_figure_under_the_header() -> None:
    table = runner.format_table(FIGURES)

    lines = table.splitlines()
    assert lines[0] == (
        "| figure | value | unit | baseline | baseline value | ratio | target | met |"
    )
    assert lines[1] == "|---|---|---|---|---|---|---|---|"
    assert lines[2] == (
        "| bridge: QoS 1 into Kafka | 12,346 | messages/s | bare paho subscriber"
        " | 15,000 | 0.823 | >= 0.8 | yes |"
    )
    assert len(lines) == 3 + 1


def test_format_table_shows_missing_values_as_dashes_and_escapes_pipes() -> None:
    row = runner.format_table(FIGURES).splitlines()[3]

    assert row == "| nab: threshold / standard | 0.538 | score | - | - | - | - | - |"


def test_unmet_target_is_marked_in_bold() -> None:
    figure = BenchFigure(bench="latency", name="p99", value=30.0, unit="ms", met=False)

    assert runner.table_rows([figure])[0][-1] == "**no**"


@pytest.mark.parametrize(
    ("value", "text"),
    [(123456.0, "123,456"), (250.04, "250.0"), (12.345, "12.35"), (0.8, "0.800")],
)
def test_format_number_keeps_about_four_significant_digits(
    value: float, text: str
) -> None:
    assert runner.format_number(value) == text


def test_write_results_appends_json_lines_and_rewrites_latest(tmp_path: Path) -> None:
    run_at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

    for _ in range(2):
        jsonl, latest = runner.write_results(
            FIGURES, out_dir=tmp_path, quick=True, command="edge-otlp bench all",
            run_at=run_at,
        )  # fmt: skip

    records = [orjson.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(records) == 2 * len(FIGURES)
    assert records[0]["bench"] == "bridge"
    assert records[0]["run_at"] == "2026-01-02T03:04:05+00:00"
    assert records[0]["quick"] is True
    assert "cpus" in records[0]["machine"]
    text = latest.read_text()
    assert text.count("| bridge: QoS 1 into Kafka |") == 1
    assert "`edge-otlp bench all`" in text
    assert "- bridge: QoS 1 into Kafka: 20,000 messages" in text


def test_run_benches_runs_chosen_benches_in_fixed_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, dict[str, object]]] = []

    class FakeBench:
        def __init__(self, name: str) -> None:
            self.name = name

        def run(self, **options: object) -> list[BenchFigure]:
            calls.append((self.name, options))
            return [BenchFigure(bench=self.name, name="x", value=1.0, unit="u")]

    monkeypatch.setattr(
        runner.importlib, "import_module", lambda path: FakeBench(path.split(".")[-1])
    )

    figures = runner.run_benches(["worker", "nab"], quick=True)

    assert [name for name, _ in calls] == ["nab", "worker"]
    assert calls[1][1] == runner.QUICK_OPTIONS["worker"]
    assert [f.bench for f in figures] == ["nab", "worker"]


def test_run_benches_all_means_every_bench(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    class FakeBench:
        def run(self, **options: object) -> list[BenchFigure]:
            return []

    def fake_import(path: str) -> FakeBench:
        seen.append(path.split(".")[-1])
        return FakeBench()

    monkeypatch.setattr(runner.importlib, "import_module", fake_import)

    runner.run_benches(["all"])

    assert seen == list(runner.BENCH_NAMES)


def test_run_benches_rejects_an_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown bench"):
        runner.run_benches(["speed"])


def test_percentile_uses_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]

    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([7.0], 0.99) == 7.0
