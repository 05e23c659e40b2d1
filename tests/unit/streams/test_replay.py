"""Device naming and scheduling of ``edge-otlp replay`` (no broker)."""

from __future__ import annotations

from pathlib import Path

from models.csvseries import read_series_rows
from streams.replay import _schedule, device_for, metric_for


def test_device_for_names_traffic_sensor_by_its_id() -> None:
    names = ["occupancy_t4013.csv", "speed_t4013.csv", "TravelTime_387.csv"]

    devices = [device_for(Path(name)) for name in names]

    assert devices == ["t4013", "t4013", "387"]


def test_device_for_keeps_other_file_names_whole() -> None:
    path = Path("realKnownCause/cpu_utilization_asg_misconfiguration.csv")

    assert device_for(path) == "cpu_utilization_asg_misconfiguration"
    assert metric_for(path) == "cpu_utilization"


def test_schedule_keeps_each_rows_device_and_metric_when_merging_files() -> None:
    speed = read_series_rows("timestamp,value\n2015-09-01 00:00:00,60\n")
    temperature = read_series_rows("timestamp,value\n2013-12-02 00:05:00,80\n")

    merged = list(
        _schedule([("t4013", "speed", speed), ("press", "temperature", temperature)])
    )

    assert [(device, metric) for _, device, metric, _ in merged] == [
        ("press", "temperature"),
        ("t4013", "speed"),
    ]


def test_schedule_aligns_files_of_one_device_on_its_first_row() -> None:
    """A device's second file keeps its event-time offset from the first."""
    speed = read_series_rows("timestamp,value\n2015-09-01 00:00:00,60\n")
    occupancy = read_series_rows("timestamp,value\n2015-09-01 00:10:00,9\n")

    merged = list(
        _schedule([("t4013", "speed", speed), ("t4013", "occupancy", occupancy)])
    )

    assert [(offset_s, metric) for offset_s, _, metric, _ in merged] == [
        (0.0, "speed"),
        (600.0, "occupancy"),
    ]
