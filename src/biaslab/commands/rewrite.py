"""``biaslab rewrite``: debias text with a model, optionally under an SR_LLM LoRA patch (docs/methods/srllm.md)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import BiaslabError
from ._app import DEVICE_MAP_HELP, MAX_MEMORY_HELP, app, console, err_console


@app.command("rewrite")
def rewrite_cmd(
    text: Optional[list[str]] = typer.Argument(None, help="text(s) to rewrite"),
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m"),
    patch: Optional[Path] = typer.Option(None, "--patch", help="a lora patch from `biaslab mitigate srllm`"),
    input: Optional[Path] = typer.Option(None, "--input", "-i", help="a file with one text per line"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="write JSON lines {input, rewrite} here"),
    out: Optional[Path] = typer.Option(None, "--out", help="a run directory: each chunk of 64 texts is journaled as it "
                                       "finishes and a rerun of the same command resumes; it ends with rewrites.jsonl, "
                                       "results.json (notices) and manifest.json"),
    force: bool = typer.Option(False, "--force", help="replace a run made in --out with different arguments"),
    max_input_tokens: int = typer.Option(256, "--max-input-tokens", help="longer texts are cut (with a notice)"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="cap on generated tokens per text"),
    device: Optional[str] = typer.Option(None, "--device"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 (default: bf16 on GPU, fp32 on CPU)"),
    device_map: Optional[str] = typer.Option(None, "--device-map", help=DEVICE_MAP_HELP),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help=MAX_MEMORY_HELP),
):
    """Rewrite biased text into neutral text (greedy; with --patch, the SR_LLM-tuned rewriter). Under torchrun the
    texts are shared out in chunks of 64 and rank 0 writes the rewrites (the same as one process); with --out a
    killed run resumes."""
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
    if output is not None:
        if output.is_dir():
            raise BiaslabError(f"--output {output} is a directory; name a file to write the rewrites to")
        if output.exists():
            raise BiaslabError(f"--output {output} already exists; biaslab never overwrites a file it did not write — "
                               "choose a new file name")
    if max_input_tokens < 1 or max_new_tokens < 1:
        raise BiaslabError("--max-input-tokens and --max-new-tokens must be positive")
    if out is not None:
        from ..outputs import check_target, preflight

        preflight(check_target(out))   # a bad --out fails before the model loads
    from .. import distributed as D
    from ..evaluation.rewrite_run import run_rewrite
    from ..methods.srllm.rewriting import rewrite_lines
    from ..models import load_model
    from ..patches import load_patch
    from ..runs import atomic_write_text

    p = load_patch(patch) if patch else None
    if p is not None and p.kind != "lora":
        raise BiaslabError(f"{patch} is a {p.kind} patch; `biaslab rewrite` needs a lora patch from `biaslab mitigate srllm`")
    lm = load_model(model, device=device, dtype=dtype, device_map=device_map, max_memory=max_memory)
    from ..models.seq2seq import require_decoder_only

    require_decoder_only(lm, "biaslab rewrite")
    res = run_rewrite(lm, texts, patch=p, max_input_tokens=max_input_tokens, max_new_cap=max_new_tokens, out=out,
                      force=force)
    for n in res.notices:
        err_console.print(f"notice: {n}", highlight=False, markup=False)
    if output and D.is_main():   # under torchrun every rank holds the gathered rewrites; rank 0 writes them
        atomic_write_text(output, rewrite_lines(texts, res.rewrites))
        console.print(f"{len(texts)} rewrites → {output}", markup=False, highlight=False)
    elif out is not None:
        console.print(f"{len(texts)} rewrites → {out / 'rewrites.jsonl'}", markup=False, highlight=False)
    else:
        for r in res.rewrites:
            console.print(r, highlight=False, markup=False)
