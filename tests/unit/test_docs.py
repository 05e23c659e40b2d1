"""Keep the README and the operator docs true to the code.

The settings table is checked against ``streams.config.Settings`` (names and
defaults), every ``EDGE_*`` name the docs mention must be one edge-otlp reads,
every ``edge-otlp`` command the README shows must exist, and the flags that set a
setting are listed in the docs with the variable their help names. Run this module
as a script to print a fresh settings table:
``.venv/bin/python -m tests.unit.test_docs``.
"""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from models.records import AnomalyScore, DeadLetter, Decision, Reading, WindowSummary
from streams.cli import main as cli_main
from streams.config import Settings
from tests.unit.test_deployment import known_edge_variables, settings_variables

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
TOPICS = ROOT / "docs" / "TOPICS.md"
CONFIGURATION = ROOT / "docs" / "CONFIGURATION.md"
OPERATOR_DOCS = [README, TOPICS, CONFIGURATION]

EDGE_VARIABLE = re.compile(r"\bEDGE_[A-Z0-9_]+\b")
TABLE_ROW = re.compile(r"^\| `(EDGE_[A-Z0-9_]+)` \| (.+?) \| (.+) \|$")
FLAG_ROW = re.compile(r"^\| `(--[a-z/-]+)` \| `(EDGE_[A-Z0-9_]+)` \| .+ \|$")
# Read by the command line itself rather than by Settings.
CLI_VARIABLES = {"log_level"}


def default_text(name: str) -> str:
    """Return how a field's default is written in the settings table."""
    default = Settings.model_fields[name].default
    if hasattr(default, "get_secret_value"):
        default = default.get_secret_value()
    if default is None:
        return "(unset)"
    if default == "":
        return "(empty)"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    return f"`{default}`"


def render_settings_table() -> str:
    """Return a settings table with the field descriptions of Settings."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for name, info in Settings.model_fields.items():
        variable = f"EDGE_{name.upper()}"
        lines.append(f"| `{variable}` | {default_text(name)} | {info.description} |")
    return "\n".join(lines)


def settings_table(path: Path) -> dict[str, str]:
    """Return variable -> default text of the settings table in ``path``."""
    rows = {}
    for line in path.read_text().splitlines():
        found = TABLE_ROW.match(line)
        if found:
            rows[found.group(1)] = found.group(2)
    return rows


def cli_command_paths() -> set[str]:
    """Return every command as typed, e.g. ``edge-otlp stack up``."""
    paths: set[str] = set()
    pending: list[tuple[str, click.Command]] = [("edge-otlp", cli_main)]
    while pending:
        prefix, command = pending.pop()
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                paths.add(f"{prefix} {name}")
                pending.append((f"{prefix} {name}", sub))
    return paths


def cli_options() -> list[tuple[str, click.Option]]:
    """Return every option of every command, with the command as typed."""
    found = []
    pending: list[tuple[str, click.Command]] = [("edge-otlp", cli_main)]
    while pending:
        prefix, command = pending.pop()
        found += [(prefix, p) for p in command.params if isinstance(p, click.Option)]
        if isinstance(command, click.Group):
            pending += [(f"{prefix} {n}", c) for n, c in command.commands.items()]
    return found


def flag_text(option: click.Option) -> str:
    """Return a flag as the docs write it, e.g. ``--collector/--no-collector``."""
    return "/".join(option.opts + option.secondary_opts)


def setting_flags() -> dict[str, str]:
    """Return flag -> variable of every flag that sets a setting (or the log level)."""
    return {
        flag_text(option): f"EDGE_{option.name.upper()}"
        for _, option in cli_options()
        if option.name in Settings.model_fields or option.name in CLI_VARIABLES
    }


def test_every_flag_of_a_setting_has_help_that_names_its_variable() -> None:
    wrong = []
    for command, option in cli_options():
        name = option.name or ""
        if name not in Settings.model_fields and name not in CLI_VARIABLES:
            continue
        suffix = f" [env EDGE_{name.upper()}]"
        help_text = option.help or ""
        if not help_text.endswith(suffix) or not help_text.removesuffix(suffix):
            wrong.append(f"{command} {flag_text(option)}: {help_text!r}")

    assert not wrong


def test_configuration_doc_lists_every_flag_with_its_variable() -> None:
    rows = [FLAG_ROW.match(line) for line in CONFIGURATION.read_text().splitlines()]

    listed = {row.group(1): row.group(2) for row in rows if row}
    assert listed == setting_flags()


def test_readme_names_every_flag_of_a_setting() -> None:
    text = README.read_text()

    missing = [flag for flag in setting_flags() if f"`{flag}`" not in text]
    assert not missing


@pytest.mark.parametrize("path", [README, CONFIGURATION], ids=lambda p: p.name)
def test_settings_table_lists_every_settings_field(path: Path) -> None:
    table = settings_table(path)

    assert set(table) == settings_variables()


@pytest.mark.parametrize("path", [README, CONFIGURATION], ids=lambda p: p.name)
def test_settings_table_gives_each_default_as_settings_declares(path: Path) -> None:
    table = settings_table(path)

    wrong = {
        variable: (written, default_text(variable.removeprefix("EDGE_").lower()))
        for variable, written in table.items()
        if written != default_text(variable.removeprefix("EDGE_").lower())
    }
    assert not wrong


@pytest.mark.parametrize("path", OPERATOR_DOCS, ids=lambda p: p.name)
def test_docs_mention_no_edge_variable_the_code_does_not_read(path: Path) -> None:
    mentioned = set(EDGE_VARIABLE.findall(path.read_text()))

    assert not mentioned - known_edge_variables()


def test_readme_shows_every_cli_command() -> None:
    text = README.read_text()

    missing = [path for path in cli_command_paths() if path not in text]
    assert not missing


def test_readme_shows_only_cli_commands_that_exist() -> None:
    commands = cli_command_paths()
    # Commands as a user types them, in code spans; prose may say "edge-otlp is".
    typed = r"`edge-otlp ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?"
    shown = re.findall(typed, README.read_text())

    unknown = []
    for first, second in shown:
        if f"edge-otlp {first}" not in commands:
            unknown.append(first)
        elif second and f"edge-otlp {first} {second}" in commands:
            continue
        elif any(c.startswith(f"edge-otlp {first} ") for c in commands) and second:
            unknown.append(f"{first} {second}")
    assert not unknown


@pytest.mark.parametrize(
    "record", [Reading, WindowSummary, AnomalyScore, Decision, DeadLetter]
)
def test_topics_doc_lists_every_field_of_each_record(record: type) -> None:
    text = TOPICS.read_text()

    missing = [
        name for name in record.__dataclass_fields__ if f"| `{name}` |" not in text
    ]
    assert not missing


def test_topics_doc_lists_the_headers_the_bridge_sets() -> None:
    text = TOPICS.read_text()

    for header in ("mqtt_topic", "mqtt_qos", "mqtt_retain", "received_at_ms"):
        assert f"| `{header}` |" in text


if __name__ == "__main__":
    import sys

    sys.stdout.write(render_settings_table() + "\n")
