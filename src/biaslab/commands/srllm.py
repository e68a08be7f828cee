"""CLI for SR_LLM (METHODS.md §4): ``biaslab mitigate srllm`` (train + evaluate + retention audit) and
``biaslab rewrite`` (debias text with a model, optionally under a LoRA patch)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..cli import app, console, err_console, mitigate_app
from ..errors import BiaslabError


@mitigate_app.command("srllm")
def srllm_cmd(
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m", help="model spec (see `biaslab models`)"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory"),
    task: str = typer.Option("debias_rewrites", "--task", help="training data (only debias_rewrites)"),
    epochs: float = typer.Option(1.0, "--epochs", help="passes over the training pairs (early stopping may end sooner)"),
    train_limit: Optional[int] = typer.Option(640, "--train-limit", help="training pairs (seeded, balanced over sources)"),
    val_limit: Optional[int] = typer.Option(96, "--val-limit", help="validation pairs for early stopping"),
    eval_limit: Optional[int] = typer.Option(100, "--eval-limit", help="held-out test pairs to evaluate the rewriter on"),
    retention_limit: Optional[int] = typer.Option(200, "--retention-limit", help="items per retention benchmark"),
    no_retention: bool = typer.Option(False, "--no-retention", help="skip the before/after retention audit"),
    r: int = typer.Option(16, "--r", help="LoRA rank"),
    alpha: float = typer.Option(32.0, "--alpha", help="LoRA alpha (scale = alpha / r)"),
    dropout: float = typer.Option(0.05, "--dropout", help="LoRA dropout"),
    targets: str = typer.Option(",".join(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
                                "--targets", help="comma-separated Linear module names to adapt"),
    lr: float = typer.Option(5e-4, "--lr"),
    batch_size: int = typer.Option(8, "--batch-size"),
    max_length: int = typer.Option(128, "--max-length", help="longest training example in tokens (longer are skipped)"),
    eval_every: int = typer.Option(25, "--eval-every", help="steps between validation-loss checks"),
    patience: int = typer.Option(3, "--patience", help="validation checks without improvement before stopping"),
    seed: int = typer.Option(0, "--seed"),
    split_seed: int = typer.Option(0, "--split-seed", help="seed of the train/validation/test split"),
    n_boot: int = typer.Option(1000, "--n-boot"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads"),
    force: bool = typer.Option(False, "--force", help="overwrite a run made with different arguments"),
):
    """SR_LLM: LoRA-tune a model to rewrite biased text neutrally; evaluate vs the untuned model; audit retention."""
    if task != "debias_rewrites":
        from ..errors import UnknownNameError

        raise UnknownNameError("srllm task", task, ["debias_rewrites"])
    import torch

    from ..mitigations.srllm import SRLLMConfig, mitigate

    if threads:
        torch.set_num_threads(threads)
    cfg = SRLLMConfig(r=r, alpha=alpha, dropout=dropout, target_modules=tuple(t.strip() for t in targets.split(",") if t.strip()),
                      lr=lr, epochs=epochs, batch_size=batch_size, max_length=max_length, eval_every=eval_every,
                      patience=patience, seed=seed)
    s = mitigate(model, out, cfg=cfg, train_limit=train_limit, val_limit=val_limit, eval_limit=eval_limit,
                 retention_limit=retention_limit, retention=not no_retention, split_seed=split_seed, n_boot=n_boot,
                 force=force, log=lambda m: err_console.print(f"[biaslab] {m}", highlight=False))
    from rich.table import Table

    t = Table(title=f"SR_LLM on {s['model']['spec']} (before = untuned, after = tuned)")
    for c in ("metric", "before", "after", "Δ", "Δ 95% CI"):
        t.add_column(c, justify="left" if c == "metric" else "right")
    for name, m in s["metrics"].items():
        ci = m.get("delta_ci95")
        f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        t.add_row(name, f(m.get("before")), f(m.get("after")), f(m.get("delta")), f"[{f(ci[0])}, {f(ci[1])}]" if ci else "–")
    console.print(t)
    console.print(f"trained on {s['data']['n_train']} pairs in {s['training'].get('train_seconds')} s; "
                  f"patch, summary.json and report.html in {out}")


@app.command("rewrite")
def rewrite_cmd(
    text: Optional[list[str]] = typer.Argument(None, help="text(s) to rewrite"),
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m"),
    patch: Optional[Path] = typer.Option(None, "--patch", help="a lora patch from `biaslab mitigate srllm`"),
    input: Optional[Path] = typer.Option(None, "--input", "-i", help="a file with one text per line"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="write JSON lines {input, rewrite} here"),
    max_input_tokens: int = typer.Option(256, "--max-input-tokens", help="longer texts are cut (with a notice)"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="cap on generated tokens per text"),
):
    """Rewrite biased text into neutral text (greedy; with --patch, the SR_LLM-tuned rewriter)."""
    texts = list(text or [])
    if input is not None:
        if not input.is_file():
            raise BiaslabError(f"input file not found or not a regular file: {input}")
        try:
            texts += [ln for ln in input.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except UnicodeDecodeError:
            raise BiaslabError(f"{input} is not UTF-8 text") from None
    if not texts:
        raise BiaslabError("no text to rewrite: pass TEXT arguments or --input FILE with one non-empty text per line")
    for i, t in enumerate(texts):
        if not t.strip():
            raise BiaslabError(f"text {i + 1} is empty: nothing to rewrite")
    if max_input_tokens < 1 or max_new_tokens < 1:
        raise BiaslabError("--max-input-tokens and --max-new-tokens must be positive")
    from ..mitigations.srllm import rewrite
    from ..models import load_model
    from ..patches import load_patch
    from ..runs import atomic_write_text

    p = load_patch(patch) if patch else None
    if p is not None and p.kind != "lora":
        raise BiaslabError(f"{patch} is a {p.kind} patch; `biaslab rewrite` needs a lora patch from `biaslab mitigate srllm`")
    lm = load_model(model)
    res = rewrite(lm, texts, patch=p, max_input_tokens=max_input_tokens, max_new_cap=max_new_tokens)
    for n in res.notices:
        err_console.print(f"[yellow]notice:[/] {n}", highlight=False)
    if output:
        atomic_write_text(output, "".join(json.dumps({"input": t, "rewrite": r}) + "\n" for t, r in zip(texts, res.rewrites)))
        console.print(f"{len(texts)} rewrites → {output}")
    else:
        for r in res.rewrites:
            console.print(r, highlight=False, markup=False)
