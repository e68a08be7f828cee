"""Task specs: the ``--task`` strings of CRISPR and the calibration baselines, resolved to items.

``bbq:<Category>`` / ``bbq:A,B`` / ``bbq:all`` (:mod:`biaslab.benchmarks.bbq`), ``sst2`` (the vendored SST-2 test
split) and ``mc:PATH`` (a task file of the user's own, :func:`biaslab.tasks.load_mc_file`). Kept apart from
:mod:`biaslab.tasks` because the BBQ loader itself builds :class:`~biaslab.tasks.MCItem`s (no import cycle).
"""
from __future__ import annotations

from pathlib import Path

from .errors import BiaslabError, UnknownNameError
from .tasks import MCItem, load_mc_file, load_sst2

TASK_FAMILIES = ("bbq", "sst2", "mc")


def load_task(spec: str) -> tuple[str, list[MCItem]]:
    """``bbq:Age`` | ``bbq:Age,Religion`` | ``bbq:all`` | ``sst2`` | ``mc:PATH`` (:func:`load_mc_file`) →
    (canonical name, items)."""
    fam, _, arg = spec.partition(":")
    if fam == "sst2":
        # SST-2 test split: 1,821 labelled sentences (the dev split is kept for model selection elsewhere)
        return "sst2", load_sst2("test")
    if fam == "bbq":
        from .benchmarks.bbq import BBQ_CATEGORIES, load_bbq_items

        cats = list(BBQ_CATEGORIES) if arg in ("", "all") else [c.strip() for c in arg.split(",") if c.strip()]
        for c in cats:
            if c not in BBQ_CATEGORIES:
                raise UnknownNameError("BBQ category", c, BBQ_CATEGORIES)
        return "bbq:" + ("all" if arg in ("", "all") else ",".join(cats)), load_bbq_items(cats)
    if fam == "mc":
        if not arg:
            raise BiaslabError("--task mc:PATH needs the path of a JSON Lines task file after 'mc:'")
        return load_mc_file(arg)
    raise UnknownNameError("task", spec, ["bbq:<Category>", "bbq:all", "sst2", "mc:PATH"])


def task_data_files(spec: str) -> dict[str, Path]:
    """The files ``load_task(spec)`` reads ({label: path}), for the run manifest's data sha256."""
    from .data import DATA_ROOT

    fam, _, arg = spec.partition(":")
    if fam == "sst2":
        return {"sst/sst2_test.tsv": DATA_ROOT / "sst" / "sst2_test.tsv"}
    if fam == "bbq":
        from .benchmarks.bbq import BBQ_CATEGORIES, category_files

        cats = list(BBQ_CATEGORIES) if arg in ("", "all") else [c.strip() for c in arg.split(",") if c.strip()]
        return {label: p for c in cats for label, p in category_files(c).items()}
    if fam == "mc":
        return {arg: Path(arg)}
    return {}
