"""What a method hands the runner: its task data, its fit, its evaluation sets, its controls.

These are plain data classes: a method describes *what* is scored and measured; the runner
(:mod:`biaslab.evaluation.runner`) does the scoring, the journal, the comparisons, the summary and the report,
the same way for every method (the fairlearn rule: mitigators never evaluate themselves).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BiaslabError

if TYPE_CHECKING:  # pragma: no cover
    from ..patches import Patch

DIRECTIONS = ("higher", "lower", "ideal")


@dataclass(frozen=True)
class MetricSpec:
    """One number measured on an evaluation set: ``fn(records) -> float`` (NaN when undefined).

    ``direction``: ``higher`` / ``lower`` is better, or ``ideal`` (closer to ``ideal`` is better, e.g. 50 for a
    stereotype score, 0 for a bias score or gap)."""
    name: str
    fn: Callable[[Sequence[dict]], float]
    description: str = ""
    scale: str = "fraction 0-1"
    direction: str = "higher"
    ideal: float | None = None

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise BiaslabError(f"metric {self.name}: direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.direction == "ideal" and self.ideal is None:
            raise BiaslabError(f"metric {self.name}: direction 'ideal' needs an ideal value")

    def describe(self) -> dict:
        return {"scale": self.scale, "direction": self.direction, "ideal": self.ideal, "description": self.description}


def default_item_id(item) -> str:
    return str(item["id"] if isinstance(item, dict) else item.id)


@dataclass
class EvalSet:
    """Items scored in every model state (before, after, each control) and the metrics measured on them.

    ``score(lm, items) -> records`` (each record has the item's ``id``); the runner scores ``chunk`` items at a
    time through the run directory's journal. ``reference(records, before_records)`` (optional) adds what a
    metric needs from the unpatched model's records (e.g. FAST's retention score); it runs on every state,
    the before state included, and its output is not journaled. ``group_field`` names a record field for the
    per-group breakdown in each state's ``results.json``."""
    name: str
    items: list
    score: Callable[[Any, list], list[dict]]
    metrics: list[MetricSpec]
    protocol: str = ""
    chunk: int = 32
    item_id: Callable[[Any], str] = default_item_id
    group_field: str | None = None
    reference: Callable[[list[dict], list[dict]], list[dict]] | None = None

    def ids(self) -> list[str]:
        return [self.item_id(it) for it in self.items]


@dataclass
class Control:
    """A comparison state: either ``members`` (one or more patches, e.g. random pruning under several seeds,
    scored like the method's own patch and pooled, each record tagged ``control_member``) or ``derive`` (the
    records computed from the before state's records without the model, e.g. SR_LLM's copy-the-input)."""
    name: str
    description: str
    members: list["Patch"] = field(default_factory=list)
    derive: Callable[[dict[str, list[dict]]], dict[str, list[dict]]] | None = None
    labels: list[str] = field(default_factory=list)   # one per member (default member0, member1, …)

    def __post_init__(self):
        if bool(self.members) == (self.derive is not None):
            raise BiaslabError(f"control {self.name}: give patches (members) or a derive function, not both or neither")
        if not self.labels:
            self.labels = [f"member{k}" for k in range(len(self.members))] if self.members else ["derived"]
        if len(self.labels) != max(1, len(self.members)) or len(set(self.labels)) != len(self.labels):
            raise BiaslabError(f"control {self.name}: one distinct label per member")


@dataclass
class FitResult:
    """What ``Method.fit`` returns: the patch, method-specific details for the summary (JSON), notes for the
    user, the deviations from the paper this fit made, and further patches the fit trained alongside (FAST's
    baselines) that the controls use. The runner saves all of it, so a resumed run never fits twice."""
    patch: "Patch"
    details: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    deviations: list[str] = field(default_factory=list)
    extra_patches: dict[str, "Patch"] = field(default_factory=dict)


@dataclass
class TaskData:
    """A loaded task: its canonical name, the method's data, every file read ({label: path}) for the
    manifest's data sha256, and ``spec``: the ``--task`` string that loads it again (a file task's, with the
    file's absolute path; None when the name does), recorded in the manifest for ``biaslab compare``."""
    name: str
    data: Any
    data_files: dict[str, Path] = field(default_factory=dict)
    spec: str | None = None


@dataclass(frozen=True)
class RetentionPlan:
    """Benchmarks audited before and after the patch (headline metrics, paired intervals)."""
    benchmarks: tuple[str, ...]
    limit: int | None = 50
