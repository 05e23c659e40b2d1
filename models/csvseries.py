"""Parse ``timestamp,value`` CSV text (the NAB layout) into readings of one series.

Pure: the caller reads the file. Rows keep file order, because a detector must see
readings in the order they were recorded; nothing is sorted or deduplicated.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)


class InvalidSeries(ValueError):
    """A line of series CSV text is not ``timestamp,value``."""


@dataclass(frozen=True, slots=True)
class SeriesRow:
    """One row of a series, with its original text kept for echoing it back.

    Attributes:
        timestamp_text: The timestamp field exactly as written.
        value_text: The value field exactly as written.
        time_ms: Event time in epoch milliseconds, UTC.
        value: The value as a float.
    """

    timestamp_text: str
    value_text: str
    time_ms: int
    value: float


def parse_time_ms(text: str) -> int:
    """Convert an ISO 8601 timestamp to epoch milliseconds.

    A timestamp without an offset is read as UTC, as NAB's are.

    Args:
        text: For example ``2014-04-01 00:05:00`` or ``2014-04-01T00:05:00+02:00``.

    Returns:
        Epoch milliseconds, UTC, rounded down to the millisecond.

    Raises:
        InvalidSeries: When ``text`` is not an ISO 8601 timestamp.

    >>> parse_time_ms("1970-01-01 00:00:01.5")
    1500
    """
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        message = f"timestamp must be ISO 8601, like 2014-04-01 00:05:00 (got {text!r})"
        raise InvalidSeries(message) from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // _ONE_MS


def read_series_rows(text: str) -> list[SeriesRow]:
    """Parse CSV text into rows, in file order.

    A first line whose first field is ``timestamp`` is a header and is skipped.
    Blank lines are skipped; CRLF line ends and a missing final newline are fine.
    Quoting is not supported: fields are split on the first comma only.

    Args:
        text: The whole file as text.

    Returns:
        One row per data line, in the order of the text.

    Raises:
        InvalidSeries: When a line has no comma, a bad timestamp or a value
            that is not a float; the message names the line number.
    """
    rows: list[SeriesRow] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        timestamp_text, comma, value_text = line.partition(",")
        if number == 1 and timestamp_text.strip().lower() == "timestamp":
            continue
        if not comma:
            message = f"line {number} must be timestamp,value (got no comma)"
            raise InvalidSeries(message)

        try:
            time_ms = parse_time_ms(timestamp_text)
            value = float(value_text)
        except ValueError as exc:
            message = f"line {number} must be timestamp,value: {exc}"
            raise InvalidSeries(message) from exc
        rows.append(SeriesRow(timestamp_text, value_text, time_ms, value))
    return rows


def read_series(text: str) -> list[tuple[int, float]]:
    r"""Parse CSV text into ``(time_ms, value)`` pairs, in file order.

    Args:
        text: The whole file as text; see :func:`read_series_rows`.

    Returns:
        ``(epoch milliseconds UTC, value)`` per data line.

    Raises:
        InvalidSeries: As :func:`read_series_rows`.

    >>> read_series("timestamp,value\r\n2014-04-01 00:00:00,2.5")
    [(1396310400000, 2.5)]
    """
    return [(row.time_ms, row.value) for row in read_series_rows(text)]
