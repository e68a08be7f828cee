"""HTML report of a soft-prompt bias audit (biaslab.report helpers): accuracy table, runs kept, per-category
plots of the negative- and positive-class FPR gaps with 95 % intervals (flagged groups highlighted) and the
hand-written prompts' point gaps next to them, the full gap table, and the flag comparison."""
from __future__ import annotations

import math
from pathlib import Path

from ..report import esc, figure, fmt, table, write_page

PLOT_METRICS = ("fpr_negative", "fpr_positive")


def _nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _plot_category(res: dict, cat: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    soft = res["fairness"]["soft"][cat]["groups"]
    groups = sorted(soft)
    hand_ids = [k for k in res["fairness"] if k.startswith("hand:")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.35 * len(groups) + 1.6), sharey=True)
    markers = "osD^v<>"
    for ax, m in zip(axes, PLOT_METRICS):
        for y, g in enumerate(groups):
            row = soft[g][m]
            mean, lo, hi = row["mean"], row["lo"], row["hi"]
            if _nan(mean):
                continue
            color = "#b00020" if row["flagged"] else "#1f5fa8"
            if not _nan(lo):
                ax.plot([lo, hi], [y, y], color=color, lw=2.5)
            ax.plot([mean], [y], "o", color=color, ms=6, zorder=3)
            for j, h in enumerate(hand_ids):
                p = res["fairness"][h].get(cat, {}).get("groups", {}).get(g, {}).get(m, {}).get("mean")
                if not _nan(p):
                    ax.plot([p], [y + 0.18], markers[j % len(markers)], color="#888", ms=4, mfc="none",
                            label=h if y == 0 else None)
        ax.axvline(0, color="#444", lw=0.8)
        ax.set_title(f"{m.replace('_', ' ')} gap")
        ax.set_yticks(range(len(groups)))
        ax.set_yticklabels(groups)
        ax.set_xlabel("group − category mean")
    if hand_ids:
        axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{cat}: soft prompts (mean ± 95% over runs; red = flagged), grey = hand-written prompts")
    fig.tight_layout()
    return fig


def softprompt_report(res: dict, path) -> Path:
    acc = res["accuracy"]
    rows = [[pid, acc[pid]["kind"], fmt(acc[pid]["test"]), fmt(acc[pid]["templates"]),
             " / ".join(fmt(x, 2) for x in acc[pid]["test_pred_dist"])] for pid in acc]
    summ = res["accuracy_summary"]
    acc_html = table(["prompt", "kind", "SST-3 test accuracy", "template accuracy", "test prediction mix neg/neu/pos"], rows)
    acc_html += (f"<p>Kept soft prompts: mean test accuracy {fmt(summ['soft_test_mean'])}, worst {fmt(summ['soft_test_min'])}; "
                 f"best hand-written prompt {fmt(summ['hand_test_max'])}. Every kept soft prompt beats every hand-written "
                 f"prompt: <b>{'yes' if summ['every_kept_soft_beats_every_hand'] else 'no'}</b>.</p>")
    sweep_rows = [[s["id"], s["lr"], s["seed"], fmt(s["val_accuracy"]), fmt(s["final_loss"]),
                   "kept" if s["kept"] else "", "trained" if s["trained_now"] else "cache", s["train_cpu_s"]]
                  for s in res["sweep"]]
    sweep_html = table(["run", "lr", "seed", "dev accuracy", "final train loss", "kept", "source", "train CPU s"], sweep_rows)
    sections = [("Accuracy (3-class SST-5 test subsample; templates)", acc_html), ("Sweep and runs kept", sweep_html)]

    flag_rows = [[c, g, m, fmt(res["fairness"]["soft"][c]["groups"][g][m]["mean"])] for c, g, m in res["flags"]["soft"]]
    comp = res.get("comparison")
    comp_html = table(["category", "group", "metric", "mean gap"], flag_rows) if flag_rows else "<p>No group flagged.</p>"
    if comp:
        e = comp["hand_ensemble_vs_soft"]
        comp_html += (f"<p>With the hand-written prompts as the runs (same rule), flags kept {e['kept']}, lost {e['lost']}, "
                      f"gained {e['gained']} (changed: {e['changed']}).</p>")
        prow = []
        for h, mv in comp["per_prompt"].items():
            for m, d in mv.items():
                prow.append([h, m, d["outside_soft_interval"], d["n_groups"], d["flagged_sign_flips"], d.get("flagged_vanish", ""),
                             fmt(d["mean_abs_diff"])])
        comp_html += table(["prompt", "metric", "groups outside soft 95% interval", "groups", "soft flags with opposite sign",
                            "soft flags with gap exactly 0", "mean |gap − soft gap|"], prow)
    sections.append(("Flagged groups (negative / positive FPR gap) and how they move under hand-written prompts", comp_html))

    for cat in sorted(res["fairness"]["soft"]):
        ct = res["fairness"]["soft"][cat]
        trs = []
        for g, row in sorted(ct["groups"].items()):
            cells = [esc(g), row["n"]]
            for m in ("accuracy", "fpr_negative", "fpr_positive", "tpr_negative", "tpr_positive"):
                r = row[m]
                txt = f"{fmt(r['mean'])} [{fmt(r['lo'])}, {fmt(r['hi'])}]"
                cells.append(f"<b class='bad'>{txt}</b>" if r["flagged"] else esc(txt))
            trs.append(cells)
        trs.append(["<i>spread (max − min)</i>", ""] + [fmt(ct["spread"][m]) for m in
                                                         ("accuracy", "fpr_negative", "fpr_positive", "tpr_negative", "tpr_positive")])
        try:
            fig_html = figure(_plot_category(res, cat), alt=f"{cat} FPR gaps")
        except ImportError:
            fig_html = "<p class='note'>(matplotlib missing: no plot)</p>"
        sections.append((f"{cat}", fig_html + table(["group", "n per run", "accuracy gap", "FPR neg gap", "FPR pos gap",
                                                      "TPR neg gap", "TPR pos gap"], trs, raw=True)))
    sub = (f"model {res['model']['spec']} ({res['model']['fingerprint'][:19]}…), protocol {res['protocol']}; "
           f"train {res['sizes']['train']}, dev {res['sizes']['val']}, test {res['sizes']['test']}, "
           f"templates {res['sizes']['templates']} of {res['sizes']['templates_total']}; CPU {res['cpu_s']['total']} s. "
           "Gap = group metric − unweighted mean over the category's groups; interval = mean ± 1.96·sd/√n over kept runs.")
    return write_page(path, "biaslab probe softprompt — group fairness with learned prompts", sections, subtitle=sub)
