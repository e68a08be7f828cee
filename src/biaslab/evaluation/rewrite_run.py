"""``biaslab rewrite --out DIR``: a rewrite of many texts as a resumable run directory (the method module only
rewrites; the run directory lives here, beside the runner, as for every method's evaluation)."""
from __future__ import annotations

import hashlib

from ..methods.srllm.config import PROTOCOL_ID
from ..methods.srllm.rewriting import REWRITE_CHUNK, RewriteOutput, rewrite_lines, rewrite_shared
from ..runs import RunDir, atomic_write_text


def run_rewrite(lm, texts: list[str], *, patch=None, max_input_tokens: int = 256, max_new_cap: int = 256,
                out=None, force: bool = False, chunk: int = REWRITE_CHUNK) -> RewriteOutput:
    """:func:`~biaslab.methods.srllm.rewriting.rewrite_shared`, journaled in the run directory ``out`` when given:
    its arguments pin the model, patch, protocol, options and the texts' sha256 (a rerun of the same arguments
    resumes, others are refused), and it ends with ``rewrites.jsonl`` and ``results.json`` (the notices)."""
    run = None
    if out is not None:
        args = {"command": "rewrite", "model": lm.spec, **lm.identity(), "patch": patch.describe() if patch else None,
                "protocol": PROTOCOL_ID, "chat_template": lm.use_chat_template, "texts": len(texts),
                "texts_sha256": hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest(),
                "max_input_tokens": max_input_tokens, "max_new_tokens": max_new_cap, "chunk": chunk}
        run = RunDir(out, args, force=force, extra_manifest={"model": lm.describe()})
    res = rewrite_shared(lm, texts, patch=patch, max_input_tokens=max_input_tokens, max_new_cap=max_new_cap,
                         chunk=chunk, run=run)
    if run is not None and not run.follower:
        atomic_write_text(run.path / "rewrites.jsonl", rewrite_lines(texts, res.rewrites))
        run.write_results({"texts": len(texts), "cut": len(res.notices), "notices": res.notices,
                           "max_new_tokens": res.max_new_tokens})
        run.finish()
    return res
