"""FAST as a registered method (``biaslab mitigate fast``): causal tracing → fairness stamp, with the FT-L and
α=β=0 baselines trained alongside and kept as patches (kind ``weights`` and ``stamp``), evaluated on the BiaScope
sets (SS, PS, PS-CrowS, RS) and StereoSet LMS/ICAT of the held-out pairs, retention on WikiText-2 + facts."""
from __future__ import annotations

import math
import random
from dataclasses import replace
from pathlib import Path

from ...errors import BiaslabError
from ...evaluation.method import Method
from ...evaluation.plan import Control, EvalSet, FitResult, MetricSpec, RetentionPlan, TaskData
from .config import BIAS_TYPES, METHOD_VERSION, TASKS, FastConfig, parse_task

DATA_FILES = ("biascope/paraphrases.jsonl", "biascope/crows_transfer.jsonl", "biascope/commonsense_retention.jsonl",
              "crows_pairs/crows_pairs_anonymized.csv", "wikitext2/valid.raw.txt")
# metric name in the summary -> (evaluation set, the set's metric)
STEREOSET_METRICS = {"ss": "stereoset_ss", "lms": "lms", "icat": "icat"}


def biascope_sets() -> tuple:
    """(set name, protocol, is-retention) of the four BiaScope evaluation sets."""
    from . import biascope as B

    return (("ss", B.PAIR_PROTOCOL, False), ("ps", B.PS_PROTOCOL, False), ("ps_crows", B.CROWS_PROTOCOL, False),
            ("rs", B.RS_PROTOCOL, True))


def spec_from_def(mdef, name: str | None = None) -> MetricSpec:
    """A benchmark MetricDef as a MetricSpec: an ideal at the top of its scale is 'higher is better'."""
    top = {"0-100": 100.0, "fraction 0-1": 1.0}.get(mdef.scale)
    if mdef.ideal is None or mdef.ideal == top:
        return MetricSpec(name or mdef.name, mdef.fn, mdef.description, mdef.scale, "higher")
    return MetricSpec(name or mdef.name, mdef.fn, mdef.description, mdef.scale, "ideal", mdef.ideal)


def split_of(bias_types, seed: int) -> dict:
    from .pairs import build_stereoset_pairs, split_pairs

    pairs, skipped = build_stereoset_pairs(bias_types)
    split = split_pairs(pairs, seed=seed)
    if not split["train"] or not split["test"]:
        raise BiaslabError(f"too few aligned pairs for {', '.join(bias_types)}: {len(pairs)} (skipped: {skipped})")
    return {"pairs": pairs, "skipped": skipped, **split}


def build_eval_sets(bias_types, test_pairs, *, limit: int | None, seed: int) -> dict:
    """The held-out evaluation sets (every set seeded-sampled to ``limit`` items, stratified by bias type)."""
    from ...benchmarks.base import stratified_sample
    from . import eval_pairs as E
    from . import pairs as P

    test_rows = [{"id": p.id, "bias_type": p.bias_type, "prompt_1": p.prompt_1, "prompt_2": p.prompt_2,
                  "object": p.object} for p in test_pairs]
    test_rows = stratified_sample(test_rows, limit, seed=seed, strata=("bias_type",))
    keep = {r["id"] for r in test_rows}
    para = E.load_paraphrases()
    ps_rows = [{**r, "id": r["pair_id"]} for pid in sorted(keep) for r in para.get(pid, [])]
    crows = stratified_sample(E.load_crows_transfer(bias_types), limit, seed=seed, strata=("bias_type",))
    cs = [{**r, "prompt_1": r["prompt_a"], "prompt_2": r["prompt_b"]} for r in E.load_commonsense(bias_types)]
    cs = stratified_sample(cs, limit, seed=seed, strata=("bias_type",)) if limit and limit < len(cs) else cs
    clusters = [c for c in P.stereoset_clusters(bias_types) if c["id"] in keep]
    return {"ss": test_rows, "ps": ps_rows, "ps_crows": crows, "rs": cs, "stereoset": clusters}


class Fast(Method):
    name = "fast"
    version = METHOD_VERSION
    paper = "Chen et al., NAACL Findings 2025 (arXiv 2405.09341): fairness stamp; a FAST-style reimplementation"
    config_class = FastConfig
    summary = "FAST-style fairness stamp at the layer causal tracing finds; BiaScope before / after / baselines."
    task_help = " | ".join(TASKS) + " (comma-separated)"
    default_task = "stereoset:gender"
    limit_help = "items per held-out evaluation set (seeded, stratified)"
    seed_help = "seed of the split, tracing, training, evaluation samples and bootstrap"

    def load_task(self, task, cfg) -> TaskData:
        from ...data import data_path

        bias_types = parse_task(task or self.default_task)
        name = "all" if bias_types == BIAS_TYPES and "all" in (task or "") else ",".join(f"stereoset:{b}" for b in bias_types)
        files = list(DATA_FILES) + [f"stereoset_partial/{b}_test.json" for b in bias_types]
        return TaskData(name, {"bias_types": bias_types}, {f: data_path(f) for f in files})

    def check_model(self, lm, cfg: FastConfig) -> None:
        from ...tracing import check_layer, layer_modules

        layer_modules(lm.model)   # a model without one MLP per layer is refused before the run directory
        if cfg.layer is not None:
            check_layer(lm.model, cfg.layer)

    # ------------------------------------------------------------------------------------------------ fit
    def fit(self, lm, task: TaskData, cfg: FastConfig, *, seed: int, cache, log) -> FitResult:
        from ...tracing import TraceItem, trace
        from . import training as T
        from .eval_pairs import crows_pairs
        from .stamp import StampPatch

        cfg = replace(cfg, seed=seed)
        bias_types = task.data["bias_types"]
        sp = split_of(bias_types, seed)
        _, crows_skipped = crows_pairs(bias_types)
        rng = random.Random(f"trace:{seed}")
        tr_pairs = rng.sample(sp["train"], min(cfg.n_trace, len(sp["train"])))
        tr = trace(lm, [TraceItem(p.id, p.prompt_1, tuple(p.span_1), p.object) for p in tr_pairs], n_noise=cfg.n_noise,
                   seed=seed)
        decisive = tr.decisive_layer("mlp")
        layer = decisive if cfg.layer is None else cfg.layer
        log(f"causal tracing: decisive layer {decisive}; stamp at layer {layer}", markup=False)
        kl_sets = T.make_kl_sets(lm, sp["train"], cfg)
        res = T.train(lm, sp["train"], layer, cfg, dev_pairs=sp["dev"], desc="FAST stamp", kl_sets=kl_sets)
        choices = T.choices(cfg)
        params = {"alpha": cfg.alpha, "beta": cfg.beta, "steps": cfg.steps, "lr": cfg.lr, "task": task.name, "seed": seed,
                  "fairness": cfg.fairness, "init": cfg.init, **({"js_weight": cfg.js_weight} if cfg.fairness != "gap" else {})}
        patch = StampPatch.from_stamp(lm, res.stamp, layer=layer, activation=cfg.activation, params=params,
                                      provenance={"method": METHOD_VERSION, "decisive_layer": decisive,
                                                  "layer_given": cfg.layer, "train_pairs": len(sp["train"]),
                                                  "choices": choices})
        shared = bool(cfg.micro_batch_pairs)   # every rank holds the same stamp: the dev split is shared too
        dev_before = T.dev_stats(lm, sp["dev"], "dev split without the stamp", shared=shared)
        with patch.applied(lm):
            dev_after = T.dev_stats(lm, sp["dev"], "dev split with the stamp", shared=shared)
        histories = {"fast": res.history}
        details = {"layer": {"used": layer, "decisive": decisive, "given": cfg.layer, "n_layers": tr.layers},
                   "dev_ss": {"before": dev_before["ss"] if sp["dev"] else math.nan, "after": res.dev_ss},
                   "dev": {"before": dev_before, "after": dev_after},
                   "training": {"history": res.history[-1:], "first": res.history[:1]},
                   "pairs": {"aligned": len(sp["pairs"]), "skipped": sp["skipped"], "crows_skipped": crows_skipped,
                             "split": {k: len(sp[k]) for k in ("train", "dev", "test")}},
                   "tracing": tr.to_json(seed=seed), "choices": choices, "baselines": {}}
        extra = {}
        if cfg.baselines:
            r0 = T.train(lm, sp["train"], layer, cfg, alpha=0.0, beta=0.0, dev_pairs=sp["dev"], desc="stamp α=β=0")
            extra["stamp_no_retention"] = StampPatch.from_stamp(
                lm, r0.stamp, layer=layer, activation=cfg.activation,
                params={"alpha": 0.0, "beta": 0.0, "steps": cfg.steps, "lr": cfg.lr, "init": cfg.init})
            details["baselines"]["stamp_no_retention"] = {
                "description": "the same stamp trained with α = β = 0 (fairness term only)", "dev_ss": r0.dev_ss}
            histories["stamp_no_retention"] = r0.history
            tried = [T.train(lm, sp["train"], layer, replace(cfg, ftl_lr=float(x)), mode="ftl", dev_pairs=sp["dev"],
                             match_dev_ss=res.dev_ss, match_dev_gap=dev_after["mean_abs_gap"], desc=f"FT-L lr {x:g}",
                             kl_sets=kl_sets) for x in cfg.ftl_lrs]
            r1 = min(tried, key=lambda r: r.match_key or (math.inf,))
            extra["ft_l"] = T.ftl_patch(lm, layer, r1.mlp_state, params={"lr": r1.lr, "chosen_step": r1.chosen_step})
            details["baselines"]["ft_l"] = {
                "description": f"fine-tune layer {layer}'s MLP weights with the same data and losses (Adam, lr "
                               f"{' or '.join(f'{x:g}' for x in cfg.ftl_lrs)}); of all learning rates and checkpoints, "
                               f"the one with dev SS closest to FAST's dev SS ({res.dev_ss:.1f}; ties: dev mean |gap| "
                               f"closest to FAST's {dev_after['mean_abs_gap']:.3f}) kept: lr {r1.lr:g}, step "
                               f"{r1.chosen_step}", "chosen_step": r1.chosen_step, "chosen_lr": r1.lr,
                "dev_ss": r1.dev_ss, "dev_mean_abs_gap": r1.dev_gap,
                "candidates": [{"lr": r.lr, "chosen_step": r.chosen_step, "dev_ss": r.dev_ss,
                                "dev_mean_abs_gap": r.dev_gap} for r in tried]}
            histories["ft_l"] = r1.history
            for r in tried:
                if r is not r1:
                    histories[f"ft_l (lr {r.lr:g}, not kept)"] = r.history
        details["histories"] = histories
        deviations = ["FAST-style reimplementation: the authors published no code; every open choice is listed in "
                      "details.choices"] + ([f"fairness loss {cfg.fairness} (the paper's L_e is the gap alone)"]
                                            if cfg.fairness != "gap" else [])
        return FitResult(patch, details, [], deviations, extra)

    def headline(self, summary: dict) -> str:
        lay = summary["details"]["layer"]
        return f"stamp at layer {lay['used']} (causal tracing's decisive layer: {lay['decisive']})"

    # ------------------------------------------------------------------------------------------------ evaluation
    def evaluation(self, lm, task: TaskData, cfg: FastConfig, fit: FitResult, *, limit, seed) -> list[EvalSet]:
        from ...benchmarks import get_benchmark
        from . import biascope as B

        bias_types = task.data["bias_types"]
        sets = build_eval_sets(bias_types, split_of(bias_types, seed)["test"], limit=limit, seed=seed)
        specs, refs = self.metrics_for(task, cfg), self.references_for(task, cfg)
        out = []
        for name, proto, _ in biascope_sets():
            out.append(EvalSet(name, sets[name], lambda lm_, part, name=name: B.score_pairs(lm_, part, desc=name),
                               specs[name], protocol=proto.id, chunk=10_000, group_field="group",
                               item_id=lambda r: f"{r['id']}/{r['variant']}" if "variant" in r else r["id"],
                               reference=refs.get(name)))
        if sets["stereoset"]:
            st = get_benchmark("stereoset")
            proto = st.protocol()
            out.append(EvalSet("stereoset", sets["stereoset"], lambda lm_, part: st.score(lm_, part, protocol=proto),
                               specs["stereoset"], protocol=proto.id, chunk=10_000, group_field=st.group_field))
        return out

    def metrics_for(self, task: TaskData, cfg: FastConfig) -> dict[str, list]:
        from ...benchmarks import get_benchmark
        from .biascope import BiaScopeSet

        out = {}
        for name, proto, retention in biascope_sets():
            defs = BiaScopeSet(name, proto, retention=retention).metric_defs(proto)
            out[name] = [spec_from_def(d, "rs_expected_rate" if d.name == "expected_rate" else None) for d in defs]
        st = get_benchmark("stereoset")
        defs = {d.name: d for d in st.metric_defs(st.protocol())}
        out["stereoset"] = [spec_from_def(defs[k], v) for k, v in STEREOSET_METRICS.items()]
        return out

    def references_for(self, task: TaskData, cfg: FastConfig) -> dict:
        from .biascope import attach_original

        return {name: attach_original for name, _, retention in biascope_sets() if retention}   # RS: vs the original

    def controls(self, lm, task: TaskData, cfg: FastConfig, fit: FitResult) -> list[Control]:
        b = fit.details.get("baselines", {})
        return [Control(name, b.get(name, {}).get("description", name), [p]) for name, p in sorted(fit.extra_patches.items())]

    def planned_control_states(self, cfg: FastConfig) -> None:
        return None   # one state per baseline patch the fit trains

    def retention(self, cfg: FastConfig) -> RetentionPlan | None:
        return None if cfg.retention_limit == 0 else RetentionPlan(("retention",), cfg.retention_limit)

    # ------------------------------------------------------------------------------------------------ report
    def report_sections(self, summary: dict, out: Path) -> list[tuple[str, str]]:
        import json

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from ...report import esc, figure

        d = summary["details"]
        tr, layer = d["tracing"], d["layer"]["used"]
        fig, ax = plt.subplots(figsize=(7, 3.2))
        for k, color in zip(tr["curves"], ("tab:blue", "tab:red")):
            c = tr["curves"][k]
            xs = range(len(c["mean"]))
            ax.plot(xs, c["mean"], color=color, label=f"restore {'hidden state' if k == 'hidden' else 'MLP output'}")
            ax.fill_between(xs, [x[0] for x in c["ci95"]], [x[1] for x in c["ci95"]], color=color, alpha=0.2)
        ax.axvline(layer, color="k", ls="--", lw=1, label=f"stamp layer {layer}")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("layer")
        ax.set_ylabel("indirect effect on log P(object)")
        ax.legend(fontsize=8)
        sections = [("Causal tracing", figure(fig, alt="causal tracing")
                     + f"<p class='note'>{esc(json.dumps(tr['params']))}</p>")]
        fig, ax = plt.subplots(figsize=(7, 3))
        for name, h in d.get("histories", {}).items():
            ax.plot([r["step"] for r in h], [r["L_e"] for r in h], label=f"{name}: L_e")
        ax.set_xlabel("step")
        ax.set_ylabel("L_e")
        ax.legend(fontsize=8)
        sections.append(("Training", figure(fig, alt="training loss")))
        for name, b in d.get("baselines", {}).items():
            sections.append((f"Baseline: {name}", f"<p>{esc(b['description'])}</p>"))
        sections.append(("Pairs", f"<pre>{esc(json.dumps(d['pairs'], indent=1))}</pre>"))
        sections.append(("Choices (FAST-style reimplementation; the paper published no code)",
                         "<ul>" + "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in d["choices"].items()
                                          if k != "config") + "</ul>"))
        return sections
