"""The model card biaslab writes into every export (``README.md``, Hugging Face format with YAML metadata): the
base model and its fingerprint, what the patch changed, and — when the run's summary is given — the before / after
table with intervals and verdicts, retention, the policy result, the data provenance and the limits of the evidence.
"""
from __future__ import annotations

import json


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _ci(c) -> str:
    return f"[{_f(c[0])}, {_f(c[1])}]" if c else "–"


def _change(patch) -> list[str]:
    p = patch.params
    if patch.kind == "neuron-mask":
        units = patch.units
        return [f"- **Pruned neurons** (CRISPR): {patch.n_neurons} {p.get('sites', 'ffn')} units in {len(units)} modules "
                f"({', '.join(sorted(units)[:6])}{' …' if len(units) > 6 else ''}): their weights are zeroed."]
    if patch.kind == "lora":
        return [f"- **Merged LoRA adapter** (SR_LLM): rank {p.get('r')}, scale {p.get('scale')}, on "
                f"{', '.join(p.get('target_modules') or [])}: W += scale · B · A."]
    if patch.kind == "calibration":
        return [f"- **Nothing in the weights** ({p.get('method', 'calibration').upper()} calibration): the base model is "
                "exported unchanged; the calibration is a scoring-time correction of the answer tokens' logits, "
                "given in `calibration.json` (add `bias` to the logits of `token_ids`)."]
    if patch.kind == "stamp":
        return [f"- **Fairness stamp** (FAST): {p.get('width')} extra {p.get('activation')} neurons in the MLP of layer "
                f"{p.get('layer')} (zero-padded in the other layers), exported as a wider plain model."]
    if patch.kind == "weights":
        return [f"- **Replaced weights**: {len(patch.tensors)} parameters ({p.get('method', 'weights patch')})."]
    return [f"- **{patch.kind} patch** with params {json.dumps(p)[:300]}"]


def model_card(patch, summary: dict | None = None, *, export_check: dict | None = None,
               license_files: list[str] | None = None) -> str:
    meta = {"library_name": "transformers", "base_model": patch.base_spec, "tags": ["biaslab", f"biaslab-{patch.kind}"]}
    if license_files:
        meta = {"license": "other", "license_name": "gemma" if any("GEMMA" in f for f in license_files) else "other",
                "license_link": "LICENSE files in this directory", **meta}
    if summary:
        meta["tags"].append(f"biaslab-{summary['method']}")
    lines = ["---"] + [f"{k}: {json.dumps(v)}" for k, v in meta.items()] + ["---", "",
             f"# {patch.base_spec} + biaslab {patch.kind} patch", "",
             "This directory is a plain Hugging Face model: the base model with a biaslab patch baked into its weights "
             "(it loads with transformers alone, no biaslab needed).", "",
             "## Base model", "", f"- spec: `{patch.base_spec}`", f"- weights fingerprint: `{patch.base_fingerprint}`",
             "", "## What was changed", ""] + _change(patch)
    if license_files:
        lines += ["", "## License", "", "This model is a derivative of its base model, whose terms apply to it and to "
                  "any further distribution: " + ", ".join(f"`{f}`" for f in license_files) + " (in this directory)."]
    if export_check:
        lines += ["", f"Verified at export: reloaded with {export_check['loaded_with']}, max |logit difference| from the "
                      f"patched model {export_check['max_abs_logit_diff']:.2g} (allowed {export_check['atol']:g})."]
    else:
        lines += ["", "Not verified at export (`--no-verify`): the directory was not reloaded and compared with the "
                      "patched model."]
    if not summary:
        lines += ["", "## Evidence", "", "No run summary was given to the export, so this card carries no measurements. "
                  "Export from a run directory (`biaslab export --patch RUN/patch.safetensors`) to include them."]
        return "\n".join(lines) + "\n"
    ev = summary["evaluation"]
    lines += ["", f"Method: `{summary['method_version']}` on task `{summary['task']}`; settings in `biaslab_patch.json`.",
              "", "## Before / after (held-out evaluation sets)", "",
              "| metric | set | before | after | Δ (95% CI, paired) | verdict |", "|---|---|---|---|---|---|"]
    for name, m in summary["metrics"].items():
        lines.append(f"| {name} | {m['set']} | {_f(m['before'])} | {_f(m['after'])} | {_f(m['delta'])} "
                     f"{_ci(m.get('delta_ci95'))} | {m.get('verdict', '')} |")
    for cname, c in summary.get("controls", {}).items():
        acc = next(iter(c["metrics"].values()), None)
        if acc:
            first = next(iter(c["metrics"]))
            lines.append(f"\nControl `{cname}` ({c['description']}): after − control on {first} "
                         f"{_f(acc['method_minus_control'])} {_ci(acc.get('method_minus_control_ci95'))}.")
    ret = (summary.get("retention") or {}).get("benchmarks") or {}
    if ret:
        lines += ["", "## Retention (other benchmarks)", "", "| benchmark | metric | before | after | Δ (95% CI) | verdict |",
                  "|---|---|---|---|---|---|"]
        for b, sec in ret.items():
            for name, m in sec["metrics"].items():
                lines.append(f"| {b} | {name} | {_f(m['before'])} | {_f(m['after'])} | {_f(m['delta'])} "
                             f"{_ci(m.get('delta_ci95'))} | {m.get('verdict', '')} |")
    pol = summary.get("policy")
    if pol:
        from .policy import format_line

        lines += ["", f"## Release policy `{pol['policy']}`: {pol['status']}", "", "```"]
        lines += [format_line(r) for r in pol["rules"]] + ["```"]
    sets = ", ".join(f"{k}: {v['n_items']} items ({v['protocol']})" for k, v in ev["sets"].items())
    lines += ["", "## Data and limits of the evidence", "",
              f"- Evaluated on {sets}; seed {ev['seed']}; {ev['ci']}. Item ids are in the run's `items.json`.",
              f"- Model fingerprint of the run: `{summary['model']['fingerprint']}`, evaluated in "
              f"{summary['model'].get('dtype', 'float32')}.",
              "- The intervals cover item sampling only, on these benchmarks and this protocol; they say nothing about "
              "other tasks, languages or prompt formats. A verdict of 'no detectable change' is not evidence of no "
              "change."] + [f"- Deviation from the paper: {d}" for d in summary.get("deviations", [])]
    for n in summary.get("notes", []):
        lines.append(f"- Note: {n}")
    return "\n".join(lines) + "\n"
