"""Activation statistics at a spec's tap points (streaming float64 covariances)."""

from .collect import Stats, StatsCollector, collect_stats, tap_features
from .outputs import OutputMoments

__all__ = ["OutputMoments", "Stats", "StatsCollector", "collect_stats", "tap_features"]
