"""Reopen a finished ``biaslab mitigate crispr`` run directory (or a committed experiment folder holding its
``summary.json`` and ``patch.safetensors``) for a post-hoc analysis: its arguments, summary,
model, patch, config and the exact held-out test items it evaluated (checked against the summary's hash).
Shared by ``extend_test.py`` and ``second_instruction.py``; imported as a sibling module (run the scripts as
``python experiments/crispr/<script>.py``)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class FinishedRun:
    path: Path
    args: dict          # manifest.json "args"
    summary: dict
    lm: object
    patch: object
    task: str
    cfg: object         # CrisprConfig of the run (search off)
    test: list          # the whole held-out test split
    test_items: list    # the run's sample of it

    def records(self, name: str) -> list[dict]:
        """Finished records of a sub-run (``before``, ``after``, ``control/seed0`` …)."""
        from biaslab.runs import read_records

        return read_records(self.path / name)


def open_run(path) -> FinishedRun:
    from biaslab.methods import crispr as C
    from biaslab.models import load_model
    from biaslab.patches import load_patch
    from biaslab.task_specs import load_task

    run = Path(path)
    summary = json.loads((run / "summary.json").read_text())
    patch = load_patch(run / "patch.safetensors")
    if (run / "manifest.json").is_file():
        args = json.loads((run / "manifest.json").read_text())["args"]
    else:  # a committed experiment folder (summary.json + patch.safetensors): the arguments are in those two
        fields = set(C.CrisprConfig.__dataclass_fields__)
        ev = summary["evaluation"]
        args = {"model": summary["model"]["spec"], "task": summary["task"],
                "config": {k: v for k, v in patch.params.items() if k in fields},
                "test_limit": ev["n_test_items"], "test_seed": ev["test_seed"]}
    if "schema" in summary:  # a run of the runner: its arguments say limit / seed
        args = {**args, "test_limit": args["limit"], "test_seed": args["seed"]}
    lm = load_model(args["model"])
    lm.progress = False
    task, items = load_task(args["task"])
    fields = set(C.CrisprConfig.__dataclass_fields__)
    cfg = C.CrisprConfig(**{**{k: v for k, v in args["config"].items() if k in fields}, "search": False, "neurons": 0})
    _, test = C.split_dev_test(items, dev_fraction=cfg.dev_fraction, seed=cfg.split_seed)
    if (run / "items.json").is_file():  # the runner stores the ids it evaluated: nothing is re-derived
        by_id = {it.id: it for it in items}
        test_items = [by_id[i] for i in json.loads((run / "items.json").read_text())["test"]]
    else:  # a committed folder from before the runner: re-draw the sample and check it against the summary's hash
        test_items = C.sample_items(test, args["test_limit"], args["test_seed"])
        if C.ids_hash(test_items) != summary["evaluation"]["test_ids_hash"]:
            raise SystemExit(f"{run}: the re-drawn test items differ from the run's (test_ids_hash mismatch)")
    return FinishedRun(run, args, summary, lm, patch, task, cfg, test, test_items)
