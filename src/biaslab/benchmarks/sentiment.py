"""Sentiment group fairness on the Czarnowska et al. (TACL 2021) templates, probed with learned soft prompts
(Tian et al. 2023, arXiv 2306.04735; docs/methods/softprompt.md). ``biaslab audit --bench sentiment``.

Not part of ``--bench all``: the default protocol prompt-tunes the model first (cached soft prompts under
``$BIASLAB_CACHE/softprompts`` are reused, so only the first audit of a model trains; the sweep is ~10–15 CPU
minutes on the default model). The full analysis with hand-written prompt comparison and plots is
``biaslab probe softprompt``.

Records: one per (template sentence, run); ``run`` is a kept soft prompt (or a hand-written prompt under the
``handwritten`` protocol). Metrics are computed per run and averaged over runs; gaps are group − unweighted
category mean (per run), see :mod:`biaslab.metrics.fairness`. The per-group breakdown uses ``category/group``.
By default the templates are a seeded subsample stratified by (category, group, label) (``template_limit``).
"""
from __future__ import annotations

from functools import partial

from ..metrics import fairness as F
from .base import Benchmark, MetricDef, Protocol

SOFT = Protocol("softprompt", "sentiment.softprompt.v1",
                "Top-R soft prompts (peft prompt tuning, k virtual tokens, SST-5→3 classes) prepended to "
                "'<sentence> Sentiment:'; argmax over the next-token logits of ' negative'/' neutral'/' positive'. "
                "Metrics averaged over the kept runs.")
HAND = Protocol("handwritten", "sentiment.handwritten.v1",
                "The same scorer under 4 hand-written zero-shot prompts (bare format, question, review, chat); "
                "the prompts play the role of the runs.")


def _mean(metric, records):
    return F.mean_metric(records, metric)


class SentimentFairness(Benchmark):
    name = "sentiment"
    description = ("Czarnowska sentiment fairness templates (8 categories, 53 groups) classified by a prompt-tuned "
                   "model (Tian et al. 2023): per-group accuracy / FPR / TPR gaps to the category mean, over runs.")
    protocols = (SOFT, HAND)
    default_protocol = "softprompt"
    group_field = "cat_group"
    coverage = ("a seeded, stratified 795-sentence subsample (option template_limit) of the 31,972 Czarnowska template sentences; not in --bench all (it prompt-tunes first)")
    strata = ("category", "group", "label")
    data_files = ("czarnowska_templates/sentiment_fairness_tests.tsv", "sst/sst5_train.tsv", "sst/sst5_dev.tsv")
    options = {"runs": 5, "virtual_tokens": 8, "train_limit": 384, "val_limit": 150, "template_limit": 795,
               "seeds": (0, 1, 2), "lrs": (5e-3, 1e-2), "epochs": 1, "batch_size": 16, "max_length": 64,
               "prompt_cache": None}
    chunk_size = 500

    def __init__(self, **options):
        super().__init__(**options)
        self._prompts: dict = {}

    def load_items(self) -> list[dict]:
        from ..probes.data import sample_templates   # torch-free: listing benchmarks need not import torch

        return sample_templates(self.opts["template_limit"], seed=0)

    def prompts(self, lm, protocol: Protocol):
        """The kept soft prompts (trained once, then from the cache) or the hand-written prompts."""
        if protocol.id == HAND.id:
            from ..probes.softprompt import HAND_PROMPTS

            return list(HAND_PROMPTS)
        key = tuple(sorted(lm.identity().items()))   # checkpoint and dtype
        if key not in self._prompts:
            from ..probes.softprompt import SoftPromptConfig
            from ..probes.sweep import sweep

            o = self.opts
            base = SoftPromptConfig(virtual_tokens=o["virtual_tokens"], epochs=o["epochs"], batch_size=o["batch_size"],
                                    max_length=o["max_length"], train_limit=o["train_limit"], val_limit=o["val_limit"])
            self._prompts[key] = sweep(lm, base, seeds=tuple(o["seeds"]), lrs=tuple(o["lrs"]), keep=o["runs"],
                                       cache_dir=o["prompt_cache"]).kept
        return self._prompts[key]

    def score(self, lm, items: list[dict], *, protocol: Protocol) -> list[dict]:
        from ..probes.softprompt import predict

        out = []
        for p in self.prompts(lm, protocol):
            preds = predict(lm, p, [it["text"] for it in items], max_length=self.opts["max_length"], desc=f"{p.id}")
            for it, pr in zip(items, preds):
                out.append({"id": it["id"], "run": p.id, "category": it["category"], "group": it["group"],
                            "cat_group": f"{it['category']}/{it['group']}", "label": it["label"], "pred": pr["pred"],
                            "correct": int(pr["pred"] == it["label"])})
        return out

    def metric_defs(self, protocol: Protocol) -> list[MetricDef]:
        defs = [MetricDef(m, partial(_mean, m), f"{m.replace('_', ' ')} (one-vs-rest for FPR/TPR), mean over runs",
                          headline=m in ("accuracy", "fpr_negative", "fpr_positive"))
                for m in ("accuracy", "fpr_negative", "fpr_positive", "tpr_negative", "tpr_positive")]
        for m in F.HEADLINE:
            defs.append(MetricDef(f"max_abs_gap_{m}", partial(F.max_abs_gap, metric=m),
                                  f"largest |group − category mean| of {m} (mean over runs) over all groups; null for a "
                                  "single group; no bootstrap interval (a maximum over groups is biased under resampling; "
                                  "the per-group gaps carry normal intervals over runs)", ideal=0.0, ci_method="none"))
        defs.append(MetricDef("n_flagged", F.n_flagged, "flagged (category, group, metric) triples for the negative and "
                              "positive FPR gaps: mean ± 1.96·sd/√n over runs excludes 0", scale="count", ideal=0.0))
        return defs

    def extra_results(self, records: list[dict], protocol: Protocol) -> dict:
        table = F.gap_table(records)
        return {"runs": sorted({r["run"] for r in records}), "gap_table": table,
                "flags": sorted(list(f) for f in F.flags(table))}
