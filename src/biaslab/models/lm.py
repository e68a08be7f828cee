"""LanguageModel: the few scoring primitives every benchmark and method needs, on any HF causal LM.

- ``next_token_logprobs``: log P(candidate's first token | prompt) at the last prompt position (letter answers).
- ``loglikelihood``: log-likelihood of a continuation given a context; only the continuation's positions are
  soft-maxed (the LM head runs on those positions alone).
- ``generate``: batched greedy generation.

Batching (:meth:`LanguageModel.scoring_mode`): sequences are laid out as prefix tries (:mod:`.packing`) and run
with tree attention (only ancestor pairs, no padding) or, where a model does not support that, as dense-mask
rows; ``packing=False`` gives plain length-sorted padded batches. Each mode is self-checked once against
scoring sequences alone. Explicit position ids make the numbers independent of padding side, batch size and
mode (up to float noise), which the tests check.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..progress import progress_bar
from .finite import NanGuard, refuse_nan
from .flex import FLEX_ATTENTION, TREE_KERNELS, default_tree_kernel, flex_plan
from .flex import PLAN_KWARG as FLEX_PLAN_KWARG
from .head import _upcast, after_head, float32_head, head_logits, head_split_matches, wanted_columns
from .packing import (PLAN_KWARG, ROW_TOKENS, TREE_ATTENTION, batch_rows, flat_batches, pack, row_tensors, tree_attention_supported, tree_plan,
                      use_tree_attention)
from .quantized import quantization_method
from .spans import attention_span, check_context


@dataclass
class ContinuationScore:
    logprob: float                 # sum of the continuation tokens' log-probabilities
    n_tokens: int                  # number of continuation tokens
    greedy: bool                   # every continuation token is the argmax
    token_logprobs: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)

    @property
    def mean_logprob(self) -> float:
        return self.logprob / max(self.n_tokens, 1)


ANSWER_CUE = "Answer:"   # the line that ends a prompt for a model without a chat template


class LanguageModel:
    """Wraps a Hugging Face causal LM + tokenizer. See module docstring."""

    is_seq2seq = False   # True on the encoder-decoder subclass (biaslab.models.seq2seq)

    def __init__(self, model, tokenizer, *, spec: str = "custom", fingerprint: str | None = None,
                 chat_template: bool | None = None, token_budget: int = 4096, max_batch: int = 64,
                 padding_side: str = "right", progress: bool | None = None, packing: bool | None = None,
                 row_tokens: int | None = None, tree_attention: bool | None = None, tree_kernel: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        if fingerprint is None:
            from .fingerprint import weights_fingerprint

            fingerprint = weights_fingerprint(model)
        self.fingerprint = fingerprint
        self.fingerprint_kind = "weights" if fingerprint.startswith("sha256:") else "checkpoint files"
        self.device_map = None          # set by load_model when the model spans several devices
        self.license_files: list = []   # notice / terms files every export of this model must carry
        has_template = getattr(tokenizer, "chat_template", None) is not None
        self.use_chat_template = has_template if chat_template is None else (chat_template and has_template)
        self.token_budget = token_budget
        self.max_batch = max_batch
        if padding_side not in ("left", "right"):
            raise ValueError("padding_side must be 'left' or 'right'")
        self.padding_side = padding_side
        self.progress = progress
        self.packing = packing          # None: on when the model passes a one-off self-check (_packing_ok)
        self.row_tokens = row_tokens    # None: ROW_TOKENS[mode] (tree attention affords longer rows)
        self.tree_attention = tree_attention  # None: on when supported and it passes the self-check
        self.tree_kernel = tree_kernel or default_tree_kernel()   # "sdpa" (chain buckets) | "flex" (models/flex.py)
        if self.tree_kernel not in TREE_KERNELS:
            raise ValueError(f"tree_kernel must be one of {TREE_KERNELS}, got {self.tree_kernel!r}")
        self._mode_checked: dict[str, bool] = {}
        self._head_split: bool | None = None   # checked below, before any hook can see the check's forwards
        self.after_head = after_head(model)    # the model's own step after its head (soft-cap, scale) or None
        self.span_fallbacks = 0         # scoring calls sent to padded mode by a sliding window (describe())
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self._use_head_split()   # now: later it could run inside an attribution pass, whose hooks would see it

    # ------------------------------------------------------------------ basics
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def config(self):
        return self.model.config

    def identity(self) -> dict:
        """What a run's numbers depend on besides its inputs, for run arguments and cache keys: the checkpoint (the
        fingerprint, the same in every dtype, so a patch applies to any load of it) and the dtype when it is not
        float32 — bf16 scores and attributions differ from float32 ones (other CRISPR neurons:
        experiments/crispr/bf16_attribution.md), so a float32 rerun must not resume a bf16 run's records. float32
        adds nothing, so the float32 runs and caches made before keep their identity."""
        dtype = str(self.dtype).replace("torch.", "")
        return {"fingerprint": self.fingerprint, **({"dtype": dtype} if dtype != "float32" else {})}

    def describe(self) -> dict:
        """Provenance for run manifests; ``scoring_mode`` says how sequences were batched (numbers agree across
        modes to float noise)."""
        mode, quant = self.scoring_mode(), quantization_method(self.config)
        return {"spec": self.spec, "fingerprint": self.fingerprint, "fingerprint_kind": self.fingerprint_kind,
                **({"device_map": sorted({str(v) for v in self.device_map.values()})} if self.device_map else {}),
                "device": str(self.device),
                "dtype": str(self.dtype).replace("torch.", ""), "chat_template": self.use_chat_template,
                "architecture": (self.config.architectures or [type(self.model).__name__])[0],
                **({"quantization": quant} if quant else {}),
                "scoring_mode": mode,
                **({"tree_kernel": "flex"} if self.tree_kernel == "flex" and mode == "tree" else {}),
                **({"attention_span": attention_span(self.model),
                    "span_fallbacks_to_padded": self.span_fallbacks} if attention_span(self.model) else {})}

    def render(self, user: str, *, system: str | None = None, assistant_prefix: str = "", cue: str = ANSWER_CUE) -> str:
        """The prompt text the model sees: the chat template (with generation prompt) when on; else the text followed
        by a line with the answer cue (``Answer:``), so a base model sees where its answer starts (without it, the
        first option wins every time and a tuned rewriter learns to stop at once)."""
        if not self.use_chat_template:
            return (system + "\n\n" if system else "") + user + (f"\n{cue}" if cue else "") + assistant_prefix
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return text + assistant_prefix

    @contextmanager
    def plain_text(self):
        """Within the block prompts are plain text: :meth:`render` applies no chat template and :meth:`encode`
        adds the tokenizer's own special tokens (the completion-style ``cloze`` task protocol uses this)."""
        saved = self.use_chat_template
        self.use_chat_template = False
        try:
            yield self
        finally:
            self.use_chat_template = saved

    def encode(self, text: str) -> list[int]:
        """Token ids of a text. Chat-rendered text already holds its special tokens, so none are added then."""
        return self.tokenizer(text, add_special_tokens=not self.use_chat_template).input_ids

    # ------------------------------------------------------------------ batching
    def _batches(self, lengths: list[int]) -> list[list[int]]:
        """Indices sorted by length (longest first) packed so that batch_size × max_len ≤ token_budget."""
        return batch_rows(lengths, self.token_budget, self.max_batch)

    def pad(self, seqs: list[list[int]], side: str | None = None):
        """Pad to a batch; returns input_ids, attention_mask, position_ids and each row's offset of token 0."""
        side = side or self.padding_side
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        offsets = []
        for r, s in enumerate(seqs):
            off = width - len(s) if side == "left" else 0
            ids[r, off:off + len(s)] = torch.tensor(s, dtype=torch.long)
            mask[r, off:off + len(s)] = 1
            offsets.append(off)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        dev = self.device
        return ids.to(dev), mask.to(dev), pos.to(dev), offsets

    def _use_head_split(self) -> bool:
        """Whether logits are taken by running the body, then the LM head on the wanted positions only (and the
        model's known step after its head, ``after_head``): where that gives the model's own logits (checked once
        on a short sequence, :func:`.head.head_split_matches`)."""
        if self._head_split is None:
            self._head_split = head_split_matches(self)
        return self._head_split

    def logits_at(self, input_ids, attention_mask, position_ids, rows, cols, **model_kwargs) -> torch.Tensor:
        """Logits (float32) at positions (rows[k], cols[k]); runs the LM head on those positions only.

        ``model_kwargs`` go to the model's forward (tree attention passes its plan this way). Gradients flow
        when called under ``torch.enable_grad()`` (the attribution engine uses this). Under a device map the
        last layers sit on another GPU than the inputs: the positions are picked on the hidden states' device and
        the logits come back on the inputs' device, as from a model on one device."""
        m = self.model
        if self._use_head_split():
            out = m.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False, **model_kwargs)
            hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
            picked = hidden[rows.to(hidden.device), cols.to(hidden.device)]
            return head_logits(m.get_output_embeddings(), picked, self.after_head).to(input_ids.device)
        # the model's own forward: only the wanted columns' logits (``logits_to_keep``), float32 from the head
        keep_kw, at, kept = wanted_columns(m, cols)
        with float32_head(m.get_output_embeddings()):
            lg = m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                   **model_kwargs, **keep_kw).logits
        at = at if lg.shape[1] == kept else cols   # a forward that ignored logits_to_keep: every column
        return _upcast(lg[rows.to(lg.device), at.to(lg.device)]).to(input_ids.device)

    # ------------------------------------------------------------------ scoring passes
    def _self_check(self, mode: str) -> bool:
        """Whether scoring in ``mode`` ("tree" or "dense") gives the same logits as each sequence alone, on three
        short sequences that share prefixes and sit side by side (checked once per mode; any error = no)."""
        key = f"tree:{self.tree_kernel}" if mode == "tree" and self.tree_kernel != "sdpa" else mode
        if key not in self._mode_checked:
            base = [self.prefix_id] + [5, 17, 29, 41, 53, 65]
            seqs = [base + [77, 89], base[:4] + [91], [self.prefix_id, 13, 23]]
            wanted = [[len(s) - 2, len(s) - 1] for s in seqs]
            try:
                packed = dict(self._padded_or_packed(seqs, wanted, mode=mode))
                alone = dict(self._padded_or_packed(seqs, wanted, mode="padded"))
                tol = 1e-3 if self.dtype in (torch.float32, torch.float64) else 5e-2
                self._mode_checked[key] = all(torch.allclose(packed[i], alone[i], atol=tol) for i in range(len(seqs)))
            except Exception:  # noqa: BLE001 - any failure means: do not use this mode for this model
                self._mode_checked[key] = False
        return self._mode_checked[key]

    def scoring_mode(self) -> str:
        """How sequences are batched: ``"tree"`` (prefix-sharing packing with tree attention: only ancestor
        pairs are attended, no padding), ``"dense"`` (prefix-sharing rows with a dense 4-D mask) or
        ``"padded"`` (length-sorted padded batches). See :mod:`.packing`.

        ``packing`` False → padded; True → packed without a self-check; None → packed when the model passes the
        self-check. ``tree_attention`` False → dense rows; True → tree (error if the model's attention is not
        supported); None → tree when supported and it passes the self-check."""
        if self.packing is False:
            return "padded"
        if self.tree_attention is True:
            if not tree_attention_supported(self.model):
                raise ValueError("tree_attention=True, but this model's attention is not plain causal attention "
                                 "dispatched through transformers' AttentionInterface (sdpa/eager)")
            return "tree"
        if self.tree_attention is None and tree_attention_supported(self.model) and self._self_check("tree"):
            return "tree"
        if self.packing is True or self._self_check("dense"):
            return "dense"
        return "padded"

    def _packing_ok(self) -> bool:
        """Whether prefix-sharing packing (either kind) is used for this model."""
        return self.scoring_mode() != "padded"

    def _log_softmax(self, logits: torch.Tensor, used=slice(None)) -> torch.Tensor:
        """Log-softmax over the vocabulary; NaN at the ``used`` positions is an error (:mod:`.finite`)."""
        return refuse_nan(torch.log_softmax(logits, dim=-1), self.spec, self.dtype, used)

    def _padded_or_packed(self, seqs: list[list[int]], wanted: list[list[int]], *, mode: str, advance=None):
        """Yield ``(i, logprobs)`` for every sequence i: log-softmax over the vocabulary (float32) at the
        positions ``wanted[i]`` of ``seqs[i]`` (position t holds the distribution of token t + 1).

        ``mode`` as in :meth:`scoring_mode`. The LM head runs only on the wanted positions (once per shared
        node)."""
        if mode in ("tree", "dense"):
            layout = pack(seqs, self.row_tokens or ROW_TOKENS[mode])
            lengths = [len(r) for r in layout.rows]
            groups = (flat_batches(lengths, self.token_budget, self.max_batch) if mode == "tree"
                      else batch_rows(lengths, self.token_budget, self.max_batch))
            for batch in groups:
                rows = [layout.rows[b] for b in batch]
                if mode == "tree":  # one flat sequence; the plan travels as a forward kwarg
                    if self.tree_kernel == "flex":
                        ids, pos, offsets, plan = flex_plan(rows, self.device)
                        impl, kw = FLEX_ATTENTION, {FLEX_PLAN_KWARG: plan}
                    else:
                        ids, pos, offsets, plan = tree_plan(rows, self.dtype, self.device)
                        impl, kw = TREE_ATTENTION, {PLAN_KWARG: plan}
                    node = lambda k, n: (0, offsets[k] + n)  # noqa: E731

                    def forward(r, c):
                        with use_tree_attention(self.model, impl):
                            return self.logits_at(ids, None, pos, r, c, **kw)
                else:  # one row per trie under its dense 4-D mask
                    ids, mask, pos = row_tensors(rows, self.pad_id, self.dtype, self.device)
                    node = lambda k, n: (k, n)  # noqa: E731

                    def forward(r, c):
                        return self.logits_at(ids, mask, pos, r, c)
                where: dict[tuple[int, int], int] = {}
                members = []
                for k, r in enumerate(rows):
                    for i in r.members:
                        members.append(i)
                        for t in wanted[i]:
                            where.setdefault(node(k, layout.nodes_of[i][t]), len(where))
                rc = torch.tensor(list(where), dtype=torch.long, device=ids.device).reshape(-1, 2)
                lp = self._log_softmax(forward(rc[:, 0], rc[:, 1]))
                for k, r in enumerate(rows):
                    for i in r.members:
                        cols = [where[node(k, layout.nodes_of[i][t])] for t in wanted[i]]
                        yield i, lp[cols]
                if advance:
                    advance(len(members))
            return
        for batch in self._batches([len(s) for s in seqs]):
            ids, mask, pos, offs = self.pad([seqs[i] for i in batch])
            rows, cols, spans = [], [], []
            for k, i in enumerate(batch):
                rows += [k] * len(wanted[i])
                cols += [offs[k] + t for t in wanted[i]]
                spans.append((len(rows) - len(wanted[i]), len(rows)))
            lp = self._log_softmax(self.logits_at(ids, mask, pos, torch.tensor(rows, device=ids.device),
                                                  torch.tensor(cols, device=ids.device)))
            for k, i in enumerate(batch):
                yield i, lp[spans[k][0]:spans[k][1]]
            if advance:
                advance(len(batch))

    def _score_positions(self, seqs, wanted, desc):
        check_context(self, seqs, what=desc)
        mode = self.scoring_mode()
        span = attention_span(self.model)
        if mode != "padded" and span is not None and max((len(s) for s in seqs), default=0) > span:
            # packed rows carry their own attention mask, which has no sliding window: a sequence longer than the
            # window is scored padded (transformers builds the windowed masks itself), exact for every family
            mode = "padded"
            self.span_fallbacks += 1
        with progress_bar(len(seqs), desc, enabled=self.progress) as advance:
            yield from self._padded_or_packed(seqs, wanted, mode=mode, advance=advance)

    # ------------------------------------------------------------------ primitives
    @torch.no_grad()
    def next_token_logprobs(self, prompts: list[str], candidates, *, desc: str = "scoring") -> list[list[float]]:
        """For each prompt, log P(first token of each candidate | prompt), soft-maxed over the full vocabulary.

        ``candidates`` is one list of strings for all prompts, or one list per prompt."""
        if candidates and isinstance(candidates[0], str):
            candidates = [candidates] * len(prompts)
        enc = [self.encode(p) for p in prompts]
        cand_ids = [[self.candidate_token_id(c) for c in cs] for cs in candidates]
        results: list[list[float]] = [None] * len(prompts)  # type: ignore[list-item]
        for i, lp in self._score_positions(enc, [[len(e) - 1] for e in enc], desc):
            results[i] = lp[0, cand_ids[i]].cpu().tolist()
        return results

    def candidate_token_id(self, text: str) -> int:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if not ids:
            raise ValueError(f"candidate {text!r} encodes to no tokens")
        return ids[0]

    def split_context(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation, tokenised together (trailing context spaces move to the
        continuation, as lm-evaluation-harness does). An empty context becomes the BOS/EOS prefix token."""
        n_space = len(context) - len(context.rstrip(" "))
        if n_space:
            context, continuation = context[:-n_space], context[-n_space:] + continuation
        if not context:
            return [self.prefix_id], self.tokenizer(continuation, add_special_tokens=False).input_ids
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        # tokenisation may merge across the boundary; fall back to the longest common prefix
        k = 0
        while k < min(len(ctx), len(whole)) and ctx[k] == whole[k]:
            k += 1
        return whole[:k], whole[k:]

    @torch.no_grad()
    def loglikelihood(self, requests: list[tuple[str, str]], *, desc: str = "log-likelihood",
                      max_length: int | None = None) -> list[ContinuationScore]:
        """log P(continuation | context) for each (context, continuation) pair."""
        pieces = [self.split_context(c, x) for c, x in requests]
        for i, (ctx, cont) in enumerate(pieces):
            if not cont:
                raise ValueError(f"request {i}: the continuation {requests[i][1]!r} has no tokens")
        seqs = [(ctx + cont)[:-1] for ctx, cont in pieces]
        if max_length:
            for i, (ctx, cont) in enumerate(pieces):  # keep the continuation, cut the context's left
                if len(seqs[i]) > max_length:
                    seqs[i] = seqs[i][-max_length:]
        results: list[ContinuationScore] = [None] * len(requests)  # type: ignore[list-item]
        wanted = [list(range(len(s) - len(pieces[i][1]), len(s))) for i, s in enumerate(seqs)]
        for i, lp in self._score_positions(seqs, wanted, desc):
            target = torch.tensor(pieces[i][1], device=lp.device)
            tok_lp = lp.gather(1, target[:, None])[:, 0]
            greedy = bool((lp.argmax(-1) == target).all())
            results[i] = ContinuationScore(float(tok_lp.sum()), len(target), greedy, tok_lp.cpu().tolist(),
                                           list(pieces[i][1]))
        return results

    @torch.no_grad()
    def generate(self, prompts: list[str], *, max_new_tokens: int = 64, desc: str = "generating") -> list[str]:
        """Greedy continuations (special tokens stripped), batched with left padding."""
        enc = [self.encode(p) for p in prompts]
        check_context(self, enc, extra=max_new_tokens, what=desc)
        out: list[str] = [None] * len(prompts)  # type: ignore[list-item]
        eos = [t for t in {self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)}
               if isinstance(t, int)]
        budget_len = lambda n: n + max_new_tokens  # noqa: E731
        with progress_bar(len(prompts), desc, enabled=self.progress) as advance:
            for batch in self._batches([budget_len(len(e)) for e in enc]):
                ids, mask, _, _ = self.pad([enc[i] for i in batch], side="left")
                with float32_head(self.model.get_output_embeddings()):   # greedy picks need untied logits
                    gen = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                              do_sample=False, num_beams=1, pad_token_id=self.pad_id,
                                              eos_token_id=eos or None, temperature=None, top_p=None, top_k=None,
                                              logits_processor=NanGuard.processors(self.spec, self.dtype))
                for k, i in enumerate(batch):
                    out[i] = self.tokenizer.decode(gen[k, ids.shape[1]:], skip_special_tokens=True).strip()
                advance(len(batch))
        return out
