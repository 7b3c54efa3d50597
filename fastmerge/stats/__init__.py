"""Activation statistics at a spec's tap points (streaming float64 covariances)."""

from .collect import Stats, StatsCollector, collect_stats, tap_features

__all__ = ["Stats", "StatsCollector", "collect_stats", "tap_features"]
