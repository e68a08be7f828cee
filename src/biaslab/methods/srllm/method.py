"""SR_LLM as a registered method (``biaslab mitigate srllm``): LoRA-tune the model to rewrite biased text, evaluate
untuned (before) vs tuned (after) rewrites of held-out pairs, with copying the input as the control, and audit
retention without / with the adapter."""
from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

from ... import distributed as D
from ...errors import BiaslabError, UnknownNameError
from ...evaluation.method import Method
from ...evaluation.plan import Control, EvalSet, FitResult, MetricSpec, RetentionPlan, TaskData
from .config import PROTOCOL_ID, SRLLMConfig

TASKS = ("debias_rewrites",)
RETENTION_BENCHES = ("stereoset", "crows", "retention")


def rewrite_metrics(with_cosine: bool = True) -> list[MetricSpec]:
    from ...metrics.rewrite import REWRITE_METRICS

    out = []
    for name, (fn, scale, higher, desc) in REWRITE_METRICS.items():
        if name == "content_preservation" and not with_cosine:
            continue
        if higher is None:  # copy rate: 0 is the ideal of a rewriter (never returning the biased input unchanged)
            out.append(MetricSpec(name, fn, desc, scale, "ideal", 0.0))
        else:
            out.append(MetricSpec(name, fn, desc, scale, "higher" if higher else "lower"))
    return out


class SRLLM(Method):
    name = "srllm"
    version = "srllm.v1"
    paper = "Raza et al. 2024 (arXiv 2404.01399): LoRA instruction-tuned debiasing rewriter"
    config_class = SRLLMConfig
    summary = "SR_LLM: LoRA-tune a rewriter of biased text; untuned vs tuned on held-out pairs; retention audit."
    task_help = ("training data: debias_rewrites (the vendored pairs) or pairs:PATH (your JSON Lines of "
                 "{biased, neutral}; docs/methods/srllm.md)")
    default_task = "debias_rewrites"
    default_limit = 100
    limit_help = "held-out test pairs rewritten and scored"
    seed_help = "seed of the pair samples, training and the bootstrap"

    def load_task(self, task, cfg) -> TaskData:
        from . import data as sd

        task = task or self.default_task
        if task.startswith("pairs:"):   # the user's own pair file
            arg = task.removeprefix("pairs:")
            if not arg.strip():
                raise BiaslabError("--task pairs:PATH needs the path of your pair file (JSON Lines of {biased, neutral})")
            path = Path(arg).expanduser()
            name, pairs = sd.load_user_pairs(path)
            return TaskData(name, {"splits": sd.split_user_pairs(pairs, seed=cfg.split_seed)}, {name: path},
                            f"pairs:{path.resolve()}")
        if task not in TASKS:
            raise UnknownNameError("srllm task", task, TASKS + ("pairs:PATH",))
        return TaskData(task, {"splits": sd.load_splits(seed=cfg.split_seed)}, sd.data_files())

    def fit(self, lm, task: TaskData, cfg: SRLLMConfig, *, seed: int, cache, log) -> FitResult:
        from . import data as sd
        from .training import train_lora

        cfg = replace(cfg, seed=seed)
        splits = task.data["splits"]
        train = sd.sample_pairs(splits["train"], cfg.train_limit, seed=seed)
        val = sd.sample_pairs(splits["validation"], cfg.val_limit, seed=seed)
        log(f"training LoRA on {len(train)} pairs (validation {len(val)})", markup=False)
        if D.world_size() > 1 and not cfg.rewrite_chunk:
            log(f"{D.world_size()} processes, no --rewrite-chunk: the held-out rewrites are one chunk, rewritten by "
                "one rank while the others wait (set --rewrite-chunk to about the held-out pairs / "
                f"{D.world_size()} to share them; a rewrite may then differ from the default's by float rounding)",
                markup=False)
        res = train_lora(lm, train, val, cfg, log=lambda m: log(m, markup=False),
                         provenance={"split_seed": cfg.split_seed, "train_limit": cfg.train_limit,
                                     "train_sources": dict(Counter(p.source for p in train))})
        h = res.history
        # wall-clock seconds stay out of the summary's details (the runner's timings_s hold them), so a resumed run
        # gives the identical summary
        details = {"training": {k: v for k, v in h.items() if k not in ("train_loss", "train_seconds")},
                   "train_loss": h["train_loss"],
                   "data": {"n_train": h["n_train"], "n_train_skipped_too_long": h["n_train_skipped_too_long"],
                            "n_validation": h["n_val"], "sampled_train_sources": dict(Counter(p.source for p in train)),
                            "n_train_by_source": h.get("n_train_by_source"), "split_seed": cfg.split_seed,
                            "splits": {k: len(v) for k, v in splits.items()}},
                   "protocol": PROTOCOL_ID}
        deviations = ["LoRA r = 16, α = 32, dropout 0.05, LR 5e-4, batch 8, max length 128, fp32 (the paper: QLoRA "
                      "4-bit, r = 64, α = 16, dropout 0.2, LR 2e-4, batch 4, max length 512) — sized for a 135M model",
                      "loss on the completion only, a real EOS learned, early stopping on validation loss (the "
                      "paper's code trains one fixed epoch)",
                      "the public pairs of data/debias_rewrites (the paper's data was never released)"]
        return FitResult(res.patch, details, [], deviations)

    def headline(self, summary: dict) -> str:
        t = summary["details"]["training"]
        return f"LoRA adapter, {t.get('steps')} steps on {summary['details']['data']['n_train']} pairs"

    def _embedder(self):
        if getattr(self, "_emb", None) is None:
            from .embedding import SentenceEmbedder

            self._emb = SentenceEmbedder()
        return self._emb

    def evaluation(self, lm, task: TaskData, cfg: SRLLMConfig, fit: FitResult, *, limit, seed) -> list[EvalSet]:
        from . import data as sd
        from .rewriting import evaluate_rewriter

        pairs = sd.sample_pairs(task.data["splits"]["test"], limit, seed=seed)
        return [EvalSet("rewrite", pairs, lambda lm_, part: evaluate_rewriter(lm_, part, embedder=self._embedder()),
                        rewrite_metrics(), protocol=PROTOCOL_ID, chunk=cfg.rewrite_chunk or 10_000, item_id=lambda p: p.id,
                        group_field="source")]

    def metrics_for(self, task: TaskData, cfg: SRLLMConfig) -> dict[str, list]:
        return {"rewrite": rewrite_metrics()}

    def controls(self, lm, task: TaskData, cfg: SRLLMConfig, fit: FitResult) -> list[Control]:
        from .rewriting import with_cosines

        def copy_input(before: dict) -> dict:
            return {"rewrite": with_cosines([{**r, "rewrite": r["biased"]} for r in before["rewrite"]], self._embedder())}

        return [Control("copy_input", "the input returned unchanged (a rewriter that does nothing)", derive=copy_input)]

    def retention(self, cfg: SRLLMConfig) -> RetentionPlan | None:
        return RetentionPlan(RETENTION_BENCHES, cfg.retention_limit) if cfg.retention else None

    def report_sections(self, summary: dict, out: Path) -> list[tuple[str, str]]:
        import json

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from ...report import esc, figure, table

        d = summary["details"]
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.plot(range(1, len(d["train_loss"]) + 1), d["train_loss"], lw=0.8, label="train (batch)")
        val = d["training"].get("val_loss") or []
        if val:
            ax.plot([v["step"] for v in val], [v["loss"] for v in val], "o-", label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("completion loss")
        ax.legend()
        sections = [("Training", figure(fig, alt="loss curves") + "<p class='note'>"
                     + esc({k: v for k, v in d["training"].items() if k != "val_loss"}) + "</p>")]
        rows = []
        p = out / "after" / "records.jsonl"
        b = out / "before" / "records.jsonl"
        if p.is_file() and b.is_file():
            from ...runs import read_records

            for u, t in list(zip(read_records(out / "before", "rewrite"), read_records(out / "after", "rewrite")))[:15]:
                rows.append([u["source"], u["biased"], u["reference"], u["rewrite"], t["rewrite"]])
            sections.append(("Examples", table(["source", "input", "reference", "untuned", "tuned"], rows)))
        sections.append(("Data", f"<pre>{esc(json.dumps(d['data'], indent=1))}</pre>"))
        return sections
