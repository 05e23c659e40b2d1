"""``bench nab``: NAB scores of the default detector against bare baselines.

Scores every series under ``data/nab`` with the default detector, exactly as the
worker would (one detector per series, ``score_then_learn`` in file order), and
with river's ``HalfSpaceTrees`` at its default settings behind a min-max scaler
(HalfSpaceTrees expects features in [0, 1]). A detector that never fires scores 0
by NAB's definition and is reported as such.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from river import anomaly, preprocessing

from models import nab
from models.csvseries import SeriesRow
from models.detectors import DetectorSpec, build_detector
from streams.bench import BenchFigure
from streams.scorecsv import read_series_file

DEFAULT_NAB_DIR = Path("data/nab")


def _load(nab_dir: Path) -> list[tuple[str, list[SeriesRow], list[tuple[int, int]]]]:
    labels = nab_dir / "labels" / "combined_windows.json"
    windows_ms = nab.parse_windows(labels.read_text(encoding="utf-8"))
    corpus = []
    for name in sorted(windows_ms):
        rows = read_series_file(nab_dir / "data" / name)
        times_ms = [row.time_ms for row in rows]
        corpus.append((name, rows, nab.window_rows(times_ms, windows_ms[name])))
    return corpus


def _score_default(
    corpus: list[tuple[str, list[SeriesRow], list[tuple[int, int]]]],
    spec: DetectorSpec,
) -> tuple[list[nab.LabelledSeries], float]:
    scored = []
    elapsed_s = 0.0
    n_readings = 0
    for name, rows, windows in corpus:
        detector = build_detector(spec)
        started = time.perf_counter()
        scores = [detector.score_then_learn(row.value, row.time_ms) for row in rows]
        elapsed_s += time.perf_counter() - started
        n_readings += len(rows)
        scored.append(nab.LabelledSeries(name, scores, windows))
    return scored, elapsed_s / n_readings * 1e6


def _score_half_space_trees(
    corpus: list[tuple[str, list[SeriesRow], list[tuple[int, int]]]], seed: int
) -> tuple[list[nab.LabelledSeries], float]:
    scored = []
    elapsed_s = 0.0
    n_readings = 0
    for name, rows, windows in corpus:
        detector: Any = preprocessing.MinMaxScaler() | anomaly.HalfSpaceTrees(seed=seed)
        scores = []
        started = time.perf_counter()
        for row in rows:
            features = {"value": row.value}
            scores.append(float(detector.score_one(features)))
            detector.learn_one(features)
        elapsed_s += time.perf_counter() - started
        n_readings += len(rows)
        scored.append(nab.LabelledSeries(name, scores, windows))
    return scored, elapsed_s / n_readings * 1e6


def run(nab_dir: Path = DEFAULT_NAB_DIR, seed: int = 42, **_: Any) -> list[BenchFigure]:
    """Score the NAB series in ``nab_dir`` and return the figures.

    Args:
        nab_dir: Directory holding ``data/`` and ``labels/combined_windows.json``.
        seed: Seed of the detectors (and of HalfSpaceTrees).

    Returns:
        Per profile the default detector's score against HalfSpaceTrees, then the
        chosen threshold and the cost per reading of both.
    """
    corpus = _load(nab_dir)
    spec = DetectorSpec(seed=seed)
    ours, ours_us = _score_default(corpus, spec)
    hst, hst_us = _score_half_space_trees(corpus, seed)

    figures = []
    for profile in nab.PROFILES.values():
        result = nab.score_corpus(ours, profile)
        baseline = nab.score_corpus(hst, profile)
        note = (
            f"threshold {result.threshold:.4f}, {result.windows_detected}/"
            f"{result.windows} windows, {result.detections} detections; "
            "never-firing detector: 0"
        )
        ratio = result.score / baseline.score if baseline.score > 0 else None
        standard = profile.name == "standard"
        figures.append(
            BenchFigure(
                bench="nab",
                name=f"score {profile.name}",
                value=round(result.score, 2),
                unit="NAB score",
                baseline=round(baseline.score, 2),
                baseline_name="river HalfSpaceTrees, defaults, min-max scaled",
                ratio=None if ratio is None else round(ratio, 2),
                target=">= 60 (standard)" if standard else None,
                met=result.score >= 60 if standard else None,
                note=note,
            )
        )

    threshold = nab.score_corpus(ours, nab.PROFILES["standard"]).threshold
    figures.append(
        BenchFigure(
            bench="nab",
            name="threshold standard",
            value=round(threshold, 4),
            unit="anomaly score",
            note="best single threshold for the whole corpus, standard profile",
        )
    )
    figures.append(
        BenchFigure(
            bench="nab",
            name="cost per reading",
            value=round(ours_us, 2),
            unit="us (score+learn)",
            baseline=round(hst_us, 2),
            baseline_name="river HalfSpaceTrees, defaults, min-max scaled",
            ratio=round(ours_us / hst_us, 3),
            target="<= 50 us",
            met=ours_us <= 50.0,
            note="lower is better; CPython, one core",
        )
    )
    return figures
