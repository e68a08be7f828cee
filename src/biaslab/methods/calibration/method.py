"""Contextual Calibration (``biaslab mitigate cc``) and Domain-context Calibration (``biaslab mitigate dc``) as
registered methods: CRISPR's tasks, dev/test split and held-out test set (so the numbers sit beside CRISPR's on
the same items), a fit that estimates the content-free label distribution on the dev split, and a
:class:`~biaslab.methods.calibration.patch.CalibrationPatch`. No training, no controls of their own (they are
CRISPR's baselines), no retention audit (the model's weights are unchanged)."""
from __future__ import annotations

from dataclasses import replace

from ...evaluation.plan import FitResult, TaskData
from ..crispr.method import Crispr
from .config import PAPERS, CalibrationConfig
from .fitting import DEVIATION



class _Calibration(Crispr):
    kind = ""
    config_class = CalibrationConfig
    default_limit = None

    def prepare(self, cfg: CalibrationConfig, task: TaskData) -> CalibrationConfig:
        from ...tasks import task_instruction_count
        from ..crispr.selection import check_task_items

        if cfg.instructions is None:
            cfg = replace(cfg, instructions=task_instruction_count(task.data))
        check_task_items(task.data, task.name, cfg.instructions)
        return cfg

    def fit(self, lm, task: TaskData, cfg: CalibrationConfig, *, seed: int, cache, log) -> FitResult:
        from ..crispr.selection import split_dev_test
        from .fitting import content_free_probs
        from .patch import CalibrationPatch

        dev, _ = split_dev_test(task.data, dev_fraction=cfg.dev_fraction, seed=cfg.split_seed)
        tokens, p_cf, inputs = content_free_probs(lm, self.kind, dev, cfg, list(range(cfg.instructions)))
        patch = CalibrationPatch.from_probs(lm, tokens, p_cf, params={
            "method": self.kind, "protocol": cfg.protocol, "instructions": cfg.instructions,
            "content_free_inputs": inputs[:5] + (["…"] if len(inputs) > 5 else [])})
        log(f"{self.kind}: content-free label distribution {[round(p, 3) for p in patch.params['p_cf']]}",
            markup=False, highlight=False)
        return FitResult(patch, {"p_cf": patch.params["p_cf"], "token_ids": tokens, "n_inputs": len(inputs)}, [],
                         [DEVIATION])

    def headline(self, summary: dict) -> str:
        return f"{self.kind.upper()} label calibration (p_cf {[round(p, 3) for p in summary['details']['p_cf']]})"

    def controls(self, lm, task, cfg, fit):
        return []

    def planned_control_states(self, cfg) -> int:
        return 0

    def retention(self, cfg):
        return None

    def report_sections(self, summary: dict, out) -> list:
        return []


class ContextualCalibration(_Calibration):
    name, kind = "cc", "cc"
    version = "cc.v1"
    paper = PAPERS["cc"]
    summary = "Contextual calibration: divide out the label distribution of content-free inputs (N/A, '', [MASK])."


class DomainContextCalibration(_Calibration):
    name, kind = "dc", "dc"
    version = "dc.v1"
    paper = PAPERS["dc"]
    summary = "Domain-context calibration: divide out the label distribution of random in-domain words."
