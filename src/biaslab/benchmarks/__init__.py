"""Benchmarks, found through a lazy registry (``biaslab benchmarks`` lists them)."""
from __future__ import annotations

from ..registry import LazyRegistry
from .base import Benchmark, MetricDef, Protocol, stratified_sample

BENCHMARKS = LazyRegistry("benchmark", {
    "bbq": "biaslab.benchmarks.bbq:BBQ",
    "crows": "biaslab.benchmarks.crows:CrowSPairs",
    "stereoset": "biaslab.benchmarks.stereoset:StereoSet",
    "stereoset-inter": "biaslab.benchmarks.stereoset_inter:StereoSetInter",
    "stereoset-both": "biaslab.benchmarks.stereoset_inter:StereoSetBoth",
    "winobias": "biaslab.benchmarks.winobias:WinoBias",
    "bold": "biaslab.benchmarks.bold:BOLD",
    "retention": "biaslab.benchmarks.retention:Retention",
    "sentiment": "biaslab.benchmarks.sentiment:SentimentFairness",  # not in ALL: it prompt-tunes first
})
# what `--bench all` means: every registered benchmark
ALL = ("bbq", "crows", "stereoset", "winobias", "bold", "retention")


def get_benchmark(name: str, **options) -> Benchmark:
    return BENCHMARKS.get(name)(**options)


__all__ = ["BENCHMARKS", "ALL", "Benchmark", "MetricDef", "Protocol", "get_benchmark", "stratified_sample"]
