"""The interface every method implements, and the fit cache the runner gives it.

A method is a small class registered in :data:`biaslab.methods.METHODS`: its name and version, its config
dataclass (the one source of defaults, for Python and the CLI alike), and five hooks — ``load_task``, ``fit``,
``evaluation``, ``controls``, ``report_sections`` (+ optional ``retention`` and ``headline``). The runner calls
them in that order; a method module holds method code only (no run directories, bootstrap or HTML tables).
"""
from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

from ..errors import BiaslabError
from .plan import Control, EvalSet, FitResult, RetentionPlan, TaskData


def _rank0(read):
    """``read()`` in one process; under torch.distributed rank 0 reads and every rank gets its answer."""
    from .. import distributed as D

    if D.world_size() > 1:
        return D.broadcast(read() if D.is_main() else None)
    return read()


class FitCache:
    """Files a fit may reuse on resume, under ``DIR/fit/``: JSON documents and tensor files, each stored with a
    key; a load with another key (other settings) returns None, so stale work is never trusted."""

    def __init__(self, path):
        self.path = Path(path)

    def file(self, name: str) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path / name

    def load_json(self, name: str, key) -> Any | None:
        """The cached value (None when absent or made with another key). Under torch.distributed rank 0 reads it
        and every rank gets rank 0's answer, so all ranks take the same path through the fit."""
        return _rank0(lambda: self._load_json(name, key))

    def _load_json(self, name: str, key) -> Any | None:
        p = self.path / name
        if not p.is_file():
            return None
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return doc.get("value") if isinstance(doc, dict) and doc.get("key") == key else None

    def save_json(self, name: str, key, value) -> None:
        from .. import distributed as D
        from ..runs import atomic_write_json, clean_nan

        if not D.is_main():
            return
        atomic_write_json(self.file(name), clean_nan({"key": key, "value": value}))

    def load_tensors(self, name: str, key) -> tuple[dict, Any] | None:
        """Cached tensors and value (rank 0's, on every rank, as :meth:`load_json`)."""
        return _rank0(lambda: self._load_tensors(name, key))

    def _load_tensors(self, name: str, key) -> tuple[dict, Any] | None:
        from safetensors import safe_open

        p = self.path / name
        if not p.is_file():
            return None
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("biaslab.meta", "{}"))
                if meta.get("key") != key:
                    return None
                return {k: f.get_tensor(k) for k in f.keys()}, meta.get("value")
        except Exception:  # a corrupt cache file is recomputed, never trusted
            return None

    def save_tensors(self, name: str, key, tensors: dict, value=None) -> None:
        from safetensors.torch import save_file

        from .. import distributed as D

        if not D.is_main():
            return
        p = self.file(name)
        tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                      metadata={"biaslab.meta": json.dumps({"key": key, "value": value})})
            os.replace(tmp, p)
        finally:
            tmp.unlink(missing_ok=True)


class Method(ABC):
    """Base class of a registered method. Subclasses set the class attributes and implement the hooks."""

    name: str = ""
    version: str = ""            # recorded on every summary (method_version)
    paper: str = ""
    config_class: type = object  # a dataclass; its defaults are the method's defaults everywhere
    summary: str = ""            # one line for `biaslab mitigate --help`
    task_help: str = ""          # what --task accepts
    default_task: str | None = None
    limit_help: str = "evaluated items (seeded, stratified)"
    seed_help: str = "seed of the evaluation sample and the bootstrap"
    encoder_decoder: bool = False   # whether the method runs on a T5-style encoder-decoder (models.seq2seq)

    # ---- configuration
    def make_config(self, config=None, **overrides):
        """``config``: None (defaults), a config instance, a dict of fields, or a file / preset name
        (:func:`biaslab.evaluation.config.load_config`); ``overrides`` win over all of these."""
        from .config import config_from

        return config_from(self.config_class, config, overrides)

    def validate(self, cfg):
        check = getattr(cfg, "validate", None)
        return check() or cfg if callable(check) else cfg

    def config_dict(self, cfg) -> dict:
        return json.loads(json.dumps(asdict(cfg), default=list)) if is_dataclass(cfg) else dict(cfg)

    @classmethod
    def config_fields(cls) -> list:
        return list(fields(cls.config_class))

    # ---- hooks
    @abstractmethod
    def load_task(self, task: str | None, cfg) -> TaskData:
        """The task's items (or other data) and the files read, before any model loads."""

    def prepare(self, cfg, task: TaskData):
        """Checks and settings that need the task but not the model (run before the model loads)."""
        return cfg

    def check_model(self, lm, cfg) -> None:
        """Checks that need the loaded model but no work (e.g. a layer index in range); run before the run
        directory is touched."""

    @abstractmethod
    def fit(self, lm, task: TaskData, cfg, *, seed: int, cache: FitCache, log) -> FitResult:
        """Fit the patch (and any patches the controls need) on the task's training / dev data only."""

    @abstractmethod
    def evaluation(self, lm, task: TaskData, cfg, fit: FitResult | None, *, limit: int | None,
                   seed: int) -> list[EvalSet]:
        """The held-out sets scored in every state, with their metrics. They are fixed before the fit (``fit`` is
        None under ``--dry-run``): a held-out set never depends on what was fitted."""

    def controls(self, lm, task: TaskData, cfg, fit: FitResult) -> list[Control]:
        return []

    def planned_control_states(self, cfg) -> int | None:
        """How many model states the controls will score (for ``--dry-run``); None when only the fit knows."""
        return 0

    def metrics_for(self, task: TaskData, cfg) -> dict[str, list] | None:
        """{evaluation set: its MetricSpecs}, without a model (``biaslab compare`` of a run's states); None when
        the method cannot list them."""
        return None

    def references_for(self, task: TaskData, cfg) -> dict:
        """{evaluation set: its ``EvalSet.reference``} for the sets that have one, without a model: ``biaslab
        compare`` applies them to a state's journaled records (and the before state's) as the runner does."""
        return {}

    def retention(self, cfg) -> RetentionPlan | None:
        return None

    def headline(self, summary: dict) -> str:
        return f"{summary['patch']['kind']} patch"

    def report_sections(self, summary: dict, out: Path) -> list[tuple[str, str]]:
        return []

    def __repr__(self) -> str:
        return f"<method {self.name} {self.version}>"


def check_positive(flag: str, value, *, allow_none: bool = True, allow_zero: bool = False) -> None:
    """One clear error for a count option that must be positive (or ≥ 0)."""
    if value is None and allow_none:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise BiaslabError(f"{flag} must be {'≥ 0' if allow_zero else 'a positive number'}, got {value!r}")
