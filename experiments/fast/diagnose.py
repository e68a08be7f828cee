"""FAST diagnostics on the train / dev splits only (issue 4): why did the 24-step stamp not move SS?

Parts (each writes its section of experiments/fast/diagnose.json, and diagnose.md is rebuilt from it):
  split     pre-edit SS and mean log-prob gap per split and per target gender (base model property; explains why
            dev and test SS disagree)
  trace     causal tracing on more training pairs, single-layer restoration (window 1) and ROME's 10-layer
            MLP window
  train     stamp training curves: L_e on *all* training pairs, train SS, dev SS and dev mean |gap| every
            EVAL steps, for (layer, lr) settings given as LAYER:LR

Run (CPU, 1 thread):
  nice -n 10 .venv/bin/python experiments/fast/diagnose.py split
  nice -n 10 .venv/bin/python experiments/fast/diagnose.py trace gender 32
  nice -n 10 .venv/bin/python experiments/fast/diagnose.py train gender 120 40 0:3e-3 15:3e-3 15:1e-2
  nice -n 10 .venv/bin/python experiments/fast/diagnose.py train race 60 20 0:3e-3 0:3e-3:gap+js:10 ftl:0:1e-3
  (setting = LAYER:LR[:FAIRNESS[:JS_WEIGHT[:ALPHA=BETA[:L_S2_WINDOW_TOKENS]]]] for the stamp, ftl:LAYER:LR for FT-L)
No test-split item is used after `split` (which only reports the base model's SS on it).
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "diagnose.json"
FEMALE = set("she her herself woman women girl girls mother mothers mom moms mommy grandmother sister sisters "
             "daughter daughters wife wives aunt aunts niece queen lady ladies female females schoolgirl "
             "schoolgirls girlfriend mrs madam gal".split())


def _load():
    return json.loads(OUT.read_text()) if OUT.exists() else {}


def _save(d):
    from biaslab.runs import atomic_write_json, atomic_write_text

    atomic_write_json(OUT, d)
    atomic_write_text(HERE / "diagnose.md", markdown(d))


def gaps(lm, pairs):
    """Summed log P(o|s1,r) − log P(o|s2,r) per pair (the SS protocol's quantity)."""
    sc = lm.loglikelihood([(p.prompt_1, " " + p.object) for p in pairs] + [(p.prompt_2, " " + p.object) for p in pairs],
                          desc="gaps")
    n = len(pairs)
    return [sc[i].logprob - sc[n + i].logprob for i in range(n)]


def _ss(g):
    return 100.0 * sum(1.0 if x > 0 else 0.5 if x == 0 else 0.0 for x in g) / len(g) if g else None


def part_split(lm, F):
    out = {}
    for bt in ("gender", "race"):
        pairs, _ = F.build_stereoset_pairs((bt,))
        sp = F.split_pairs(pairs, seed=0)
        out[bt] = {}
        for side, ps in sp.items():
            g = gaps(lm, ps)
            row = {"n": len(ps), "ss": _ss(g), "mean_gap": sum(g) / len(g), "mean_abs_gap": sum(map(abs, g)) / len(g)}
            if bt == "gender":
                for sex in ("female", "male"):
                    sel = [x for p, x in zip(ps, g) if (p.prompt_1[p.span_1[0]:p.span_1[1]].lower() in FEMALE) == (sex == "female")]
                    row[f"{sex}_target"] = {"n": len(sel), "ss": _ss(sel), "mean_gap": sum(sel) / len(sel) if sel else None}
            out[bt][side] = row
    return out


def part_trace(lm, F, bt, n):
    from biaslab.tracing import TraceItem, trace

    pairs, _ = F.build_stereoset_pairs((bt,))
    train = F.split_pairs(pairs, seed=0)["train"]
    sel = random.Random(f"trace:0").sample(train, min(n, len(train)))
    items = [TraceItem(p.id, p.prompt_1, tuple(p.span_1), p.object) for p in sel]
    res = {}
    for window, kinds in ((1, ("hidden", "mlp")), (10, ("mlp",))):
        t = time.time()
        tr = trace(lm, items, kinds=kinds, n_noise=2, window=window, seed=0)
        j = tr.to_json(n_boot=1000, seed=0)
        res[f"window{window}"] = {"n_items": len(items), "seconds": round(time.time() - t, 1),
                                  "curves": {k: {"mean": [round(x, 4) for x in v["mean"]], "argmax": v["argmax"],
                                                 "ci95_at_argmax": v["ci95"][v["argmax"]]}
                                             for k, v in j["curves"].items()},
                                  "logp_clean_mean": j["logp_clean_mean"], "logp_corrupt_mean": j["logp_corrupt_mean"]}
    return res


def part_train(lm, F, bt, steps, every, settings):
    pairs, _ = F.build_stereoset_pairs((bt,))
    sp = F.split_pairs(pairs, seed=0)
    train_eval = random.Random("diag").sample(sp["train"], min(120, len(sp["train"])))
    res = {}
    base_cfg = F.FastConfig()
    kl_sets = F.make_kl_sets(lm, sp["train"], base_cfg)
    # dev retention: WikiText-2 *validation* windows that L_s2 never trains on (the same seeded order as
    # make_kl_sets, after its n_text windows); the test windows stay for the reported perplexity
    dev_wiki = F.wiki_windows(lm, n=2 * base_cfg.n_text, tokens=base_cfg.text_tokens, seed=base_cfg.seed)[base_cfg.n_text:]

    def dev_nll():
        sc = lm.loglikelihood([("", " " + w) for w in dev_wiki], desc="dev wiki")
        return sum(x.logprob for x in sc) / sum(x.n_tokens for x in sc)

    nll0 = dev_nll()
    # dev retention under the retention benchmark's own protocol (128-word windows given 64 words of context),
    # on the WikiText-2 *validation* split (the benchmark scores test), 20 seeded windows
    from biaslab.benchmarks.retention import wikitext_windows
    from biaslab.data import data_path

    ret_wins = random.Random("dev-ret").sample(wikitext_windows(data_path("wikitext2", "valid.raw.txt")), 20)

    def dev_ret_nll():
        sc = lm.loglikelihood([(w["context"], w["text"]) for w in ret_wins], desc="dev retention windows")
        return sum(x.logprob for x in sc) / sum(x.n_tokens for x in sc)

    ret0 = dev_ret_nll()

    def snapshot(step, hist):
        with torch.no_grad():
            g_tr, g_dev = gaps(lm, train_eval), gaps(lm, sp["dev"])
            subj = kl_sets["subject"]
            kl_subj = float(subj.kl(list(range(len(subj.seqs)))))
            dppl = 100.0 * (math.exp(-(dev_nll() - nll0)) - 1.0)
            dret = 100.0 * (math.exp(-(dev_ret_nll() - ret0)) - 1.0)
        win = hist[max(0, len(hist) - every):]
        return {"step": step, "L_e_batches": sum(h["L_e"] for h in win) / len(win) if win else None,
                "L_s1": win[-1]["L_s1"] if win else None, "L_s2": win[-1]["L_s2"] if win else None,
                "JS": sum(h["JS"] for h in win) / len(win) if win and "JS" in win[-1] else None,
                "train_ss": _ss(g_tr), "train_mean_abs_gap": sum(map(abs, g_tr)) / len(g_tr),
                "train_mean_sq_gap": sum(x * x for x in g_tr) / len(g_tr),
                "dev_ss": _ss(g_dev), "dev_mean_abs_gap": sum(map(abs, g_dev)) / len(g_dev),
                "kl_subject_all": kl_subj, "dev_wiki_ppl_change_pct": dppl, "dev_retention_ppl_change_pct": dret}

    for s in settings:
        # LAYER:LR[:FAIRNESS[:JS_WEIGHT[:ALPHA=BETA]]] trains the stamp; ftl:LAYER:LR fine-tunes the MLP (FT-L)
        parts = s.split(":")
        mode = "ftl" if parts[0] == "ftl" else "stamp"
        parts = parts[1:] if mode == "ftl" else parts
        layer, lr = int(parts[0]), float(parts[1])
        fairness = parts[2] if len(parts) > 2 else "gap"
        js_weight = float(parts[3]) if len(parts) > 3 else F.FastConfig.js_weight
        ab = float(parts[4]) if len(parts) > 4 else 1.0  # α = β
        text_tokens = int(parts[5]) if len(parts) > 5 else F.FastConfig.text_tokens  # L_s2 window length
        cfg = F.FastConfig(layer=layer, lr=lr, steps=every, fairness=fairness, js_weight=js_weight,
                           ftl_lr=lr, alpha=ab, beta=ab, text_tokens=text_tokens)
        sets = kl_sets if text_tokens == base_cfg.text_tokens else F.make_kl_sets(lm, sp["train"], cfg)
        # train in chunks of `every` steps by continuing the same stamp: one run of `steps` steps with a hook
        # that snapshots; simplest exact way: re-run train with increasing steps is wasteful, so train once and
        # evaluate through a callback on the history length.
        t = time.time()
        curve = [snapshot(0, [])]
        cfg.steps = steps
        hist_holder = []

        def on_step(rec, hist_holder=hist_holder):
            hist_holder.append(rec)
            if rec["step"] % every == 0:
                curve.append(snapshot(rec["step"], hist_holder))
        F.train(lm, sp["train"], layer, cfg, mode=mode, kl_sets=sets, desc=f"{bt} {s}", on_step=on_step)
        res[s] = {"layer": layer, "lr": lr, "steps": steps, "mode": mode, "fairness": fairness,
                  "js_weight": js_weight if fairness != "gap" else None, "alpha_beta": ab, "text_tokens": text_tokens,
                  "seconds": round(time.time() - t, 1), "curve": curve}
        print(json.dumps(res[s]), flush=True)
    return {"n_train_eval": len(train_eval), "n_dev": len(sp["dev"]), "runs": res}


def markdown(d):
    out = ["# FAST diagnostics (train / dev splits; `experiments/fast/diagnose.py`)", ""]
    if "split" in d:
        out += ["## Pre-edit SS per split (base model)", "",
                "| bias | split | n | SS | mean gap | mean \\|gap\\| | female-target SS (n) | male-target SS (n) |",
                "|---|---|---|---|---|---|---|---|"]
        for bt, sides in d["split"].items():
            for side, r in sides.items():
                f, m = r.get("female_target"), r.get("male_target")
                fs = f"{f['ss']:.1f} ({f['n']})" if f and f["n"] else "–"
                ms = f"{m['ss']:.1f} ({m['n']})" if m and m["n"] else "–"
                out.append(f"| {bt} | {side} | {r['n']} | {r['ss']:.1f} | {r['mean_gap']:+.2f} | {r['mean_abs_gap']:.2f} | {fs} | {ms} |")
        out.append("")
    for bt, tr in d.get("trace", {}).items():
        out += [f"## Causal tracing, {bt} (training pairs)", ""]
        for w, r in tr.items():
            for k, c in r["curves"].items():
                out.append(f"- {w} {k}: argmax layer {c['argmax']} (CI there {[round(x, 3) for x in c['ci95_at_argmax']]}), "
                           f"n={r['n_items']}, {r['seconds']} s; curve: " + " ".join(f"{x:.2f}" for x in c["mean"]))
        out.append("")
    for bt, tr in d.get("train", {}).items():
        out += [f"## Stamp training curves, {bt} (train SS on {tr['n_train_eval']} training pairs, dev on {tr['n_dev']})", "",
                "| edit | layer | lr | step | L_e (batches) | JS (batches) | L_s1 | L_s2 | train SS | train mean \\|gap\\| | dev SS | dev mean \\|gap\\| | KL subject (all) | dev wiki ppl Δ% (32-token windows) | dev ppl Δ% (retention protocol, validation) |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for s, r in tr["runs"].items():
            for c in r["curve"]:
                f = lambda v, n=3: "–" if v is None else f"{v:.{n}f}"  # noqa: E731
                edit = ("FT-L" if r.get("mode") == "ftl" else "stamp, L_e " + r.get("fairness", "gap")
                        + (f" (JS × {r['js_weight']:g})" if r.get("js_weight") is not None else "")
                        + (f", α = β = {r['alpha_beta']:g}" if r.get("alpha_beta", 1.0) != 1.0 else "")
                        + (f", L_s2 windows {r['text_tokens']} tokens" if r.get("text_tokens", 32) != 32 else ""))
                out.append(f"| {edit} | {r['layer']} | {r['lr']:g} | {c['step']} | {f(c['L_e_batches'])} | {f(c.get('JS'), 4)} | {f(c['L_s1'], 4)} | "
                           f"{f(c['L_s2'], 4)} | {c['train_ss']:.1f} | {c['train_mean_abs_gap']:.3f} | {c['dev_ss']:.1f} | "
                           f"{c['dev_mean_abs_gap']:.3f} | {f(c.get('kl_subject_all'), 4)} | {f(c.get('dev_wiki_ppl_change_pct'), 2)} | {f(c.get('dev_retention_ppl_change_pct'), 2)} |")
        out.append("")
    return "\n".join(out) + "\n"


def main():
    torch.set_num_threads(int(os.environ.get("BIASLAB_THREADS", "1")))
    from biaslab.methods import fast as F
    from biaslab.models import load_model

    lm = load_model("smollm2-135m-instruct")
    lm.progress = False
    part = sys.argv[1]
    d = _load()
    if part == "split":
        d["split"] = part_split(lm, F)
    elif part == "trace":
        d.setdefault("trace", {})[sys.argv[2]] = part_trace(lm, F, sys.argv[2], int(sys.argv[3]))
    elif part == "train":
        bt, steps, every = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        new = part_train(lm, F, bt, steps, every, sys.argv[5:])
        d = _load()  # re-read: another diagnose process may have saved its runs meanwhile
        old = d.setdefault("train", {}).get(bt, {})
        new["runs"] = {**old.get("runs", {}), **new["runs"]}  # runs of earlier invocations are kept
        d["train"][bt] = new
    else:
        raise SystemExit(f"unknown part {part!r}")
    _save(d)
    print(markdown(d))


if __name__ == "__main__":
    main()
