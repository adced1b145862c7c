"""Evaluation: metrics with bootstrap confidence intervals, and the report written for an evaluated model."""

from dermsight.evaluation.metrics import (
    ReliabilityBins,
    compute_metrics,
    expected_calibration_error,
    map_labels,
    map_probabilities,
    reliability_bins,
)
from dermsight.evaluation.report import write_report

__all__ = [
    "ReliabilityBins",
    "compute_metrics",
    "expected_calibration_error",
    "map_labels",
    "map_probabilities",
    "reliability_bins",
    "write_report",
]
