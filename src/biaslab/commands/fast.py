"""`biaslab mitigate fast`: causal tracing → fairness stamp → before/after BiaScope audit (FAST-style; see
biaslab.mitigations.fast for every choice the paper left open). Python equivalent: :func:`mitigate_fast`."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer

from ..cli import console, mitigate_app
from ..errors import BiaslabError, UnknownNameError

TASKS = ("stereoset:gender", "stereoset:race", "stereoset:religion", "all")


def parse_task(task: str) -> tuple[str, ...]:
    """``stereoset:gender,stereoset:race`` / ``all`` -> bias types."""
    from ..mitigations.fast import BIAS_TYPES

    out = []
    for t in [x.strip() for x in task.split(",") if x.strip()]:
        if t == "all":
            return BIAS_TYPES
        if t not in TASKS:
            raise UnknownNameError("fast task", t, TASKS)
        out.append(t.split(":", 1)[1])
    if not out:
        raise BiaslabError(f"--task is empty; choose from {', '.join(TASKS)}")
    return tuple(dict.fromkeys(out))


# ------------------------------------------------------------------------------------------- evaluation
def build_eval_sets(bias_types, test_pairs, *, limit: int | None, seed: int) -> dict:
    """The held-out evaluation sets (every set seeded-sampled to ``limit`` items, stratified by bias type)."""
    from ..benchmarks.base import stratified_sample
    from ..mitigations import fast as F

    test_rows = [{"id": p.id, "bias_type": p.bias_type, "prompt_1": p.prompt_1, "prompt_2": p.prompt_2,
                  "object": p.object} for p in test_pairs]
    test_rows = stratified_sample(test_rows, limit, seed=seed, strata=("bias_type",))
    keep = {r["id"] for r in test_rows}
    para = F.load_paraphrases()
    ps_rows = [{**r, "id": r["pair_id"]} for pid in sorted(keep) for r in para.get(pid, [])]
    crows = stratified_sample(F.load_crows_transfer(bias_types), limit, seed=seed, strata=("bias_type",))
    cs = [{**r, "prompt_1": r["prompt_a"], "prompt_2": r["prompt_b"]} for r in F.load_commonsense(bias_types)]
    cs = stratified_sample(cs, limit, seed=seed, strata=("bias_type",)) if limit and limit < len(cs) else cs
    clusters = [c for c in F.stereoset_clusters(bias_types) if c["id"] in keep]
    return {"ss": test_rows, "ps": ps_rows, "ps_crows": crows, "rs": cs, "stereoset": clusters}


def evaluate(lm, sets: dict, *, retention_limit: int | None, seed: int, original: dict | None = None) -> dict:
    """Records of every BiaScope set (+ StereoSet LMS on the held-out clusters + retention) on ``lm`` as is."""
    from ..audit import audit
    from ..benchmarks import get_benchmark
    from ..metrics import biascope as B

    recs = {name: B.score_pairs(lm, sets[name], desc=name) for name in ("ss", "ps", "ps_crows")}
    rs = B.score_pairs(lm, sets["rs"], desc="rs")
    recs["rs"] = B.attach_original(rs, original["rs"] if original else rs)
    st = get_benchmark("stereoset")
    recs["stereoset"] = st.score(lm, sets["stereoset"], protocol=st.protocol()) if sets["stereoset"] else []
    if retention_limit != 0:
        res = audit(lm, ["retention"], limit=retention_limit, seed=seed, n_boot=0)
        recs["retention"] = res.records["retention"]
    return recs


def _benches():
    from ..benchmarks import get_benchmark
    from ..metrics import biascope as B

    return {"ss": (B.BiaScopeSet("ss", B.PAIR_PROTOCOL), B.PAIR_PROTOCOL),
            "ps": (B.BiaScopeSet("ps", B.PS_PROTOCOL), B.PS_PROTOCOL),
            "ps_crows": (B.BiaScopeSet("ps_crows", B.CROWS_PROTOCOL), B.CROWS_PROTOCOL),
            "rs": (B.BiaScopeSet("rs", B.RS_PROTOCOL, retention=True), B.RS_PROTOCOL),
            "stereoset": (get_benchmark("stereoset"), get_benchmark("stereoset").protocol()),
            "retention": (get_benchmark("retention"), get_benchmark("retention").protocol())}


# summary metric name -> (set, metric name inside the set)
SUMMARY_METRICS = {
    "ss": ("ss", "ss"), "ss_abs_dev": ("ss", "ss_abs_dev"), "ss_mean_abs_gap": ("ss", "ss_mean_abs_gap"),
    "ps": ("ps", "ps"), "ps_abs_dev": ("ps", "ps_abs_dev"), "ps_mean_abs_gap": ("ps", "ps_mean_abs_gap"),
    "ps_crows": ("ps_crows", "ps_crows"), "ps_crows_abs_dev": ("ps_crows", "ps_crows_abs_dev"),
    "rs": ("rs", "rs"), "rs_expected_rate": ("rs", "expected_rate"),
    "stereoset_ss": ("stereoset", "ss"), "lms": ("stereoset", "lms"), "icat": ("stereoset", "icat"),
    "perplexity": ("retention", "perplexity"), "knowledge_accuracy": ("retention", "knowledge_accuracy"),
}


def results_of(records: dict, *, n_boot: int, seed: int) -> dict:
    """Audit-format sections (metrics with bootstrap CIs, per bias type) of one model state."""
    from ..audit import summarize

    out = {}
    for name, (bench, proto) in _benches().items():
        if records.get(name):
            out[name] = summarize(bench, records[name], proto, n_boot=n_boot, seed=seed)
    return out


def compare(before: dict, after: dict, *, n_boot: int, seed: int) -> dict:
    """{metric: before, after, delta, delta_ci95, p} by paired bootstrap over the same items."""
    from .. import stats
    from ..runs import clean_nan

    benches = _benches()
    out = {}
    for name, (set_name, metric) in SUMMARY_METRICS.items():
        if not before.get(set_name) or not after.get(set_name):
            continue
        bench, proto = benches[set_name]
        fn = {m.name: m.fn for m in bench.metric_defs(proto)}[metric]
        out[name] = stats.paired_bootstrap(before[set_name], after[set_name], fn, n_boot=n_boot, seed=seed)
    if "perplexity" in out and out["perplexity"]["before"]:
        ppl = out["perplexity"]
        ppl["relative_change"] = ppl["delta"] / ppl["before"]
        # CI of ppl_after / ppl_before − 1: the paired bootstrap of log perplexity, mapped through exp(·) − 1
        # (monotone, so its percentile interval is exactly the ratio's)
        from ..metrics.retention import perplexity

        def log_ppl(recs):
            v = perplexity(recs)
            return math.log(v) if v and not math.isnan(v) else math.nan

        r = stats.paired_bootstrap(before["retention"], after["retention"], log_ppl, n_boot=n_boot, seed=seed)
        ci = r.get("delta_ci95")
        ppl["relative_change_ci95"] = [math.expm1(ci[0]), math.expm1(ci[1])] if ci else None
    return clean_nan(out)


# ------------------------------------------------------------------------------------------- the pipeline
def mitigate_fast(model="smollm2-135m-instruct", task: str = "stereoset:gender", *, out, layer: int | None = None,
                  stamp_width: int = 64, activation: str = "relu", stamp_init: str = "pytorch", steps: int = 60,
                  lr: float = 3e-3,
                  alpha: float = 1.0, beta: float = 1.0, limit: int | None = None, retention_limit: int | None = 60,
                  n_trace: int = 24, n_noise: int = 3, baselines: bool = True, seed: int = 0, n_boot: int = 1000,
                  fairness: str = "gap", js_weight: float = 10.0, ftl_lrs: tuple = (1e-4, 1e-3),
                  text_tokens: int = 128, force: bool = False) -> dict:
    """Run FAST end to end and write OUT/{patch.safetensors, summary.json, manifest.json, report.html,
    before/, after/, baselines/}. Returns the summary dict."""
    import math
    import random
    from dataclasses import replace as dc_replace

    from ..data import data_path, sha256_file
    from ..mitigations import fast as F
    from ..models import LanguageModel, load_model
    from ..runs import RunDir, Timer, atomic_write_json
    from ..tracing import TraceItem, check_layer, trace

    if limit is not None and limit <= 0:
        raise BiaslabError(f"--limit must be a positive number of items, got {limit}")
    if steps <= 0:
        raise BiaslabError(f"--steps must be positive, got {steps}")
    if stamp_width <= 0:
        raise BiaslabError(f"--stamp-width must be positive, got {stamp_width}")
    if activation not in F.ACTIVATIONS:
        raise UnknownNameError("stamp activation", activation, F.ACTIVATIONS)
    if stamp_init not in F.STAMP_INITS:
        raise UnknownNameError("stamp initialisation", stamp_init, F.STAMP_INITS)
    bias_types = parse_task(task)
    lm = model if isinstance(model, LanguageModel) else load_model(model)
    if layer is not None:
        check_layer(lm.model, layer)
    if text_tokens < 2:
        raise BiaslabError(f"--text-tokens must be at least 2, got {text_tokens}")
    if not ftl_lrs or any(x <= 0 for x in ftl_lrs):
        raise BiaslabError(f"--ftl-lr needs one or more positive learning rates, got {list(ftl_lrs)}")
    cfg = F.FastConfig(layer=layer, width=stamp_width, activation=activation, init=stamp_init, alpha=alpha, beta=beta,
                       steps=steps,
                       lr=lr, seed=seed, fairness=fairness, js_weight=js_weight,
                       ftl_lrs=tuple(float(x) for x in ftl_lrs), text_tokens=text_tokens)
    args = {"model": lm.spec, "fingerprint": lm.fingerprint, "task": task, "bias_types": list(bias_types),
            "limit": limit, "retention_limit": retention_limit, "n_trace": n_trace, "n_noise": n_noise,
            "baselines": baselines, "n_boot": n_boot, "config": cfg.to_json()}
    out = Path(out)
    data_files = ["biascope/paraphrases.jsonl", "biascope/crows_transfer.jsonl", "biascope/commonsense_retention.jsonl",
                  "crows_pairs/crows_pairs_anonymized.csv", "wikitext2/valid.raw.txt"] + \
                 [f"stereoset_partial/{b}_test.json" for b in bias_types]
    run = RunDir(out, args, force=force, extra_manifest={
        "method": F.METHOD_VERSION, "model": lm.describe(), "choices": F.choices(cfg),
        "data_sha256": {f: "sha256:" + sha256_file(data_path(f)) for f in data_files}})
    timings = {}

    # 1. pairs and split
    t = Timer()
    pairs, skipped = F.build_stereoset_pairs(bias_types)
    split = F.split_pairs(pairs, seed=seed)
    if not split["train"] or not split["test"]:
        raise BiaslabError(f"too few aligned pairs for {task}: {len(pairs)} (skipped: {skipped})")
    sets = build_eval_sets(bias_types, split["test"], limit=limit, seed=seed)
    _, crows_skipped = F.crows_pairs(bias_types)
    run.write_manifest(pairs={"aligned": len(pairs), "skipped": skipped, "crows_skipped": crows_skipped,
                              "split": {k: len(v) for k, v in split.items()},
                              "eval_sizes": {k: len(v) for k, v in sets.items()}})

    # 2. causal tracing on training pairs
    t = Timer()
    rng = random.Random(f"trace:{seed}")
    tr_pairs = rng.sample(split["train"], min(n_trace, len(split["train"])))
    tr = trace(lm, [TraceItem(p.id, p.prompt_1, tuple(p.span_1), p.object) for p in tr_pairs], n_noise=n_noise, seed=seed)
    decisive = tr.decisive_layer("mlp")
    use_layer = decisive if layer is None else layer
    cfg.layer = use_layer
    timings["tracing"] = t.elapsed()
    trace_json = tr.to_json(n_boot=n_boot, seed=seed)
    atomic_write_json(out / "tracing.json", trace_json)

    # 3. before
    t = Timer()
    before = evaluate(lm, sets, retention_limit=retention_limit, seed=seed)
    timings["eval_before"] = t.elapsed()
    _write_state(out / "before", before, n_boot=n_boot, seed=seed)

    # 4. FAST
    t = Timer()
    kl_sets = F.make_kl_sets(lm, split["train"], cfg)
    res = F.train(lm, split["train"], use_layer, cfg, dev_pairs=split["dev"], desc="FAST stamp", kl_sets=kl_sets)
    timings["train_fast"] = t.elapsed()
    patch = F.StampPatch.from_stamp(
        lm, res.stamp, layer=use_layer, activation=activation,
        params={"alpha": alpha, "beta": beta, "steps": steps, "lr": lr, "task": task, "seed": seed,
                "fairness": fairness, "init": stamp_init, **({"js_weight": js_weight} if fairness != "gap" else {})},
        provenance={"method": F.METHOD_VERSION, "decisive_layer": decisive, "layer_given": layer,
                    "train_pairs": len(split["train"]), "choices": F.choices(cfg)})
    patch.save(out / "patch.safetensors")
    dev_before = F.dev_stats(lm, split["dev"])
    with patch.applied(lm):
        dev_after = F.dev_stats(lm, split["dev"])
    t = Timer()
    with patch.applied(lm):
        after = evaluate(lm, sets, retention_limit=retention_limit, seed=seed, original=before)
    timings["eval_after"] = t.elapsed()
    _write_state(out / "after", after, n_boot=n_boot, seed=seed)
    summary = {"method": "fast", "implementation": F.METHOD_VERSION, "task": task, "bias_types": list(bias_types),
               "model": {"spec": lm.spec, "fingerprint": lm.fingerprint},
               "patch": {**patch.describe(), "file": "patch.safetensors", "exportable": patch.exportable},
               "layer": {"used": use_layer, "decisive": decisive, "given": layer, "n_layers": tr.layers},
               "metrics": compare(before, after, n_boot=n_boot, seed=seed),
               "dev_ss": {"before": dev_before["ss"] if split["dev"] else math.nan, "after": res.dev_ss},
               "dev": {"before": dev_before, "after": dev_after},
               "training": {"history": res.history[-1:], "first": res.history[:1]},
               "pairs": {"aligned": len(pairs), "skipped": skipped, "crows_skipped": crows_skipped,
                         "split": {k: len(v) for k, v in split.items()},
                         "eval_sizes": {k: len(v) for k, v in sets.items()}},
               "choices": F.choices(cfg), "control": None, "baselines": {}}
    histories = {"fast": res.history}

    # 5. baselines: stamp without retention terms, FT-L at matched dev SS
    if baselines:
        t = Timer()
        r0 = F.train(lm, split["train"], use_layer, cfg, alpha=0.0, beta=0.0, dev_pairs=split["dev"],
                     desc="stamp α=β=0")
        p0 = F.StampPatch.from_stamp(lm, r0.stamp, layer=use_layer, activation=activation,
                                     params={"alpha": 0.0, "beta": 0.0, "steps": steps, "lr": lr})
        with p0.applied(lm):
            a0 = evaluate(lm, sets, retention_limit=retention_limit, seed=seed, original=before)
        _write_state(out / "baselines" / "stamp_no_retention", a0, n_boot=n_boot, seed=seed)
        summary["baselines"]["stamp_no_retention"] = {
            "description": "the same stamp trained with α = β = 0 (fairness term only)", "dev_ss": r0.dev_ss,
            "metrics": compare(before, a0, n_boot=n_boot, seed=seed)}
        histories["stamp_no_retention"] = r0.history
        timings["baseline_stamp_no_retention"] = t.elapsed()

        t = Timer()
        tried = [F.train(lm, split["train"], use_layer, dc_replace(cfg, ftl_lr=float(x)), mode="ftl",
                         dev_pairs=split["dev"], match_dev_ss=res.dev_ss, match_dev_gap=dev_after["mean_abs_gap"],
                         desc=f"FT-L lr {x:g}", kl_sets=kl_sets) for x in cfg.ftl_lrs]
        r1 = min(tried, key=lambda r: r.match_key or (math.inf,))
        with F.ftl_applied(lm, use_layer, r1.mlp_state):
            a1 = evaluate(lm, sets, retention_limit=retention_limit, seed=seed, original=before)
        _write_state(out / "baselines" / "ft_l", a1, n_boot=n_boot, seed=seed)
        summary["baselines"]["ft_l"] = {
            "description": f"fine-tune layer {use_layer}'s MLP weights with the same data and losses (Adam, lr "
                           f"{' or '.join(f'{x:g}' for x in cfg.ftl_lrs)}); of all learning rates and checkpoints, "
                           f"the one with dev SS closest to FAST's dev SS ({res.dev_ss:.1f}; ties: dev mean |gap| "
                           f"closest to FAST's {dev_after['mean_abs_gap']:.3f}) kept: lr {r1.lr:g}, step "
                           f"{r1.chosen_step}", "chosen_step": r1.chosen_step, "chosen_lr": r1.lr,
            "dev_ss": r1.dev_ss, "dev_mean_abs_gap": r1.dev_gap,
            "candidates": [{"lr": r.lr, "chosen_step": r.chosen_step, "dev_ss": r.dev_ss, "dev_mean_abs_gap": r.dev_gap}
                           for r in tried],
            "metrics": compare(before, a1, n_boot=n_boot, seed=seed)}
        histories["ft_l"] = r1.history
        for r in tried:
            if r is not r1:
                histories[f"ft_l (lr {r.lr:g}, not kept)"] = r.history
        timings["baseline_ft_l"] = t.elapsed()

    atomic_write_json(out / "training_history.json", histories)
    summary["timings_s"] = timings
    atomic_write_json(out / "summary.json", summary)
    write_report(out / "report.html", summary, tr, histories, use_layer)
    run.finish(timings_s=timings, layer=summary["layer"])
    return summary


def _write_state(path: Path, records: dict, *, n_boot: int, seed: int) -> None:
    from ..runs import atomic_write_json, atomic_write_text

    atomic_write_json(path / "results.json", {"benchmarks": results_of(records, n_boot=n_boot, seed=seed)})
    lines = [json.dumps({**r, "set": name}) for name, rs in records.items() for r in rs]
    atomic_write_text(path / "records.jsonl", "".join(x + "\n" for x in lines))


def write_report(path, summary: dict, tr, histories: dict, layer: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..report import esc, figure, fmt, fmt_ci, table, write_page
    from ..tracing import plot_trace

    def rows_of(metrics):
        rows = []
        for k, v in metrics.items():
            rows.append([k, fmt(v.get("before")), fmt(v.get("after")), fmt(v.get("delta")), fmt_ci(v.get("delta_ci95"))])
            if k == "perplexity" and v.get("relative_change") is not None:
                rows.append(["perplexity, relative change", "", "", fmt(v["relative_change"]),
                             fmt_ci(v.get("relative_change_ci95"))])
        return rows

    heads = ["metric", "before", "after", "delta", "delta 95% CI (paired bootstrap)"]
    sections = [("FAST stamp: before → after (held-out)", table(heads, rows_of(summary["metrics"])) +
                 "<p class='note'>ss/ps/ps_crows: 50 ideal; rs: original = 100; lms/icat: StereoSet held-out "
                 "clusters; perplexity/knowledge_accuracy: retention benchmark.</p>")]
    for name, b in summary.get("baselines", {}).items():
        sections.append((f"baseline: {name}", f"<p>{esc(b['description'])}</p>" + table(heads, rows_of(b["metrics"]))))
    sections.append(("causal tracing", figure(plot_trace(tr, title=f"indirect effect ({tr.layers} layers, "
                                                                    f"{len(tr.item_ids)} pairs)", decisive=layer),
                                              alt="causal tracing") +
                     f"<p class='note'>{esc(json.dumps(tr.params))}</p>"))
    fig, ax = plt.subplots(figsize=(7, 3))
    for name, h in histories.items():
        ax.plot([r["step"] for r in h], [r["L_e"] for r in h], label=f"{name}: L_e")
    ax.set_xlabel("step")
    ax.set_ylabel("L_e")
    ax.legend(fontsize=8)
    sections.append(("training", figure(fig, alt="training loss")))
    pr = summary["pairs"]
    sections.append(("data", f"<pre>{esc(json.dumps(pr, indent=1))}</pre>"))
    sections.append(("choices (FAST-style reimplementation; the paper published no code)",
                     "<ul>" + "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in summary["choices"].items()) + "</ul>"))
    return write_page(path, f"biaslab mitigate fast — {summary['task']}", sections,
                      subtitle=f"model {summary['model']['spec']}, stamp at layer {layer}")


@mitigate_app.command("fast")
def fast_command(
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m", help="model spec (see `biaslab models`)"),
    task: str = typer.Option("stereoset:gender", "--task", help="stereoset:gender|stereoset:race|stereoset:religion|all"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory"),
    layer: Optional[int] = typer.Option(None, "--layer", help="stamp layer (default: decisive layer from causal tracing)"),
    stamp_width: int = typer.Option(64, "--stamp-width", help="hidden width of the stamp FFN"),
    activation: str = typer.Option("relu", "--activation", help="stamp activation: relu|gelu|silu|tanh"),
    stamp_init: str = typer.Option("pytorch", "--stamp-init",
                                   help="first-layer initialisation: pytorch (nn.Linear's) | xavier | normal (std "
                                        "0.02); the second layer starts at 0, so the stamped model starts identical"),
    steps: int = typer.Option(60, "--steps", help="training steps (default chosen on dev)"),
    lr: float = typer.Option(3e-3, "--lr"),
    alpha: float = typer.Option(1.0, "--alpha", help="weight of the same-subject KL term L_s1"),
    beta: float = typer.Option(1.0, "--beta", help="weight of the unrelated-text KL term L_s2"),
    limit: Optional[int] = typer.Option(None, "--limit", help="items per evaluation set (seeded, stratified)"),
    retention_limit: int = typer.Option(60, "--retention-limit", help="retention items (windows + facts); 0 = skip"),
    n_trace: int = typer.Option(24, "--n-trace", help="training pairs used for causal tracing"),
    baselines: bool = typer.Option(True, "--baselines/--no-baselines", help="also run FT-L and the α=β=0 stamp"),
    fairness: str = typer.Option("gap", "--fairness",
                                 help="L_e: gap (the paper: squared log-prob gap of o) | gap+js (+ JS divergence "
                                      "of the two prompts' next-token distributions; a deviation)"),
    js_weight: float = typer.Option(10.0, "--js-weight", help="weight of the JS part under --fairness gap+js"),
    text_tokens: int = typer.Option(128, "--text-tokens", help="length (tokens) of the WikiText windows of L_s2"),
    ftl_lr: Optional[list[float]] = typer.Option(None, "--ftl-lr",
                                                 help="FT-L learning rate(s), repeatable (default 1e-4 and 1e-3; "
                                                      "the dev match to FAST picks one)"),
    seed: int = typer.Option(0, "--seed"),
    n_boot: int = typer.Option(1000, "--n-boot"),
    force: bool = typer.Option(False, "--force", help="overwrite a run made with different arguments"),
):
    """FAST-style fairness stamp: tracing, training, before/after BiaScope audit, patch, summary, report."""
    s = mitigate_fast(model, task, out=out, layer=layer, stamp_width=stamp_width, activation=activation,
                      stamp_init=stamp_init, steps=steps,
                      lr=lr, alpha=alpha, beta=beta, limit=limit, retention_limit=retention_limit or 0,
                      n_trace=n_trace, baselines=baselines, seed=seed, n_boot=n_boot, fairness=fairness,
                      js_weight=js_weight, ftl_lrs=tuple(ftl_lr) if ftl_lr else (1e-4, 1e-3),
                      text_tokens=text_tokens, force=force)
    from rich.table import Table

    t = Table(title=f"FAST — {task} (stamp at layer {s['layer']['used']})")
    for c in ("metric", "before", "after", "delta", "95% CI"):
        t.add_column(c)
    for k, v in s["metrics"].items():
        ci = v.get("delta_ci95")
        f = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
        t.add_row(k, f(v.get("before")), f(v.get("after")), f(v.get("delta")), f"[{f(ci[0])}, {f(ci[1])}]" if ci else "–")
        if k == "perplexity" and v.get("relative_change") is not None:
            rc = v.get("relative_change_ci95")
            t.add_row("perplexity, relative", "", "", f(v["relative_change"]), f"[{f(rc[0])}, {f(rc[1])}]" if rc else "–")
    console.print(t)
    console.print(f"patch, summary and report in {out}")
