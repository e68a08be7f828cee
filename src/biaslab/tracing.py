"""Causal tracing (Meng et al. 2022, ROME, NeurIPS; as used by FAST, Chen et al. 2025) on any causal LM.

For a prompt whose next token should be an *object* o, with a *subject* span inside the prompt:
1. clean run: record each layer's hidden state (the layer's output, i.e. the residual stream) and MLP output at
   the **last subject token**, and P_clean(o);
2. corrupted run: add Gaussian noise to the input embeddings of the subject tokens (noise std = ``noise_scale``
   × the standard deviation of the subject tokens' embedding entries, ROME's choice; default 3), giving
   P_corrupt(o);
3. restored runs: the corrupted run with one layer's clean hidden state (or MLP output, kind ``mlp``) put back
   at the last subject token, giving P_restored(o).
The indirect effect of a site is IE = log P_restored − log P_corrupt (nats), averaged over ``n_noise`` noise
samples (seeded)
and then over pairs; the curve over layers comes with percentile-bootstrap 95 % intervals over pairs. The
decisive layer is the argmax of the mean curve (default: the MLP curve, since the stamp is added to an MLP).

Choices the FAST paper leaves open, made here: P(o) is the mean per-token probability of the whole object in
log space (deviation from ROME, which uses the probability of the first token: stereotype fillers are
low-probability continuations for which raw probabilities differ only in the fourth decimal); one layer
is restored at a time (``window=1``; ROME's MLP plots restore a 10-layer window — set ``window`` for that);
all restorations of one noise sample share the same noise and run in one batch.

Layers and MLPs are found through :func:`biaslab.models.sites.find_sites` (layer containers of the site table),
so any architecture in that table works (decoder-only models; T5 is refused).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .errors import BiaslabError
from .interventions import Hooks, Intervention
from .models.finite import refuse_nan
from .progress import progress_bar

TRACE_PROTOCOL = "tracing.rome-noise.v1"


@dataclass
class TraceItem:
    """One prompt to trace: ``prompt`` text, char span of the subject in it, and the object continuation."""
    id: str
    prompt: str
    subject_span: tuple[int, int]
    object: str


@dataclass
class TraceResult:
    layers: int
    kinds: tuple[str, ...]
    per_item: dict[str, np.ndarray]            # kind -> (n_items, layers) indirect effects
    p_clean: np.ndarray       # mean log-prob of the object, clean run
    p_corrupt: np.ndarray     # the same, corrupted run (mean over noise samples)
    item_ids: list[str]
    params: dict = field(default_factory=dict)

    def mean(self, kind: str) -> np.ndarray:
        return self.per_item[kind].mean(axis=0)

    def ci95(self, kind: str, *, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
        """(layers, 2) percentile-bootstrap interval of the mean over items."""
        x = self.per_item[kind]
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(x), (n_boot, len(x)))
        boots = x[idx].mean(axis=1)  # (n_boot, layers)
        return np.quantile(boots, [0.025, 0.975], axis=0).T

    def decisive_layer(self, kind: str = "mlp") -> int:
        return int(np.argmax(self.mean(kind)))

    def to_json(self, *, n_boot: int = 1000, seed: int = 0) -> dict:
        out = {"protocol": TRACE_PROTOCOL, "n_items": len(self.item_ids), "layers": self.layers,
               "params": self.params, "logp_clean_mean": float(self.p_clean.mean()),
               "logp_corrupt_mean": float(self.p_corrupt.mean()), "curves": {}}
        for k in self.kinds:
            ci = self.ci95(k, n_boot=n_boot, seed=seed)
            out["curves"][k] = {"mean": self.mean(k).tolist(), "ci95": ci.tolist(),
                                "argmax": self.decisive_layer(k)}
        return out


def layer_modules(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(decoder layers, their MLP modules) in order, via the neuron-site table (the MLP is the module that
    holds the FFN down projection)."""
    from .models.sites import find_sites, model_family

    if model_family(model) == "t5":
        raise BiaslabError("causal tracing / the FAST stamp support decoder-only models; T5 is not supported")
    layers, mlps, seen = [], [], set()
    for site in find_sites(model, "ffn"):
        if site.layer in seen:     # a second FFN site in a layer (a MoE layer's shared expert): the MLP is known
            continue
        seen.add(site.layer)
        parts = site.name.split(".")
        # "<container>.<i>.<mlp path>.<down>": the layer is container.i, the MLP the down projection's parent
        for j in range(len(parts) - 1, 0, -1):
            if parts[j].isdigit():
                layers.append(model.get_submodule(".".join(parts[:j + 1])))
                break
        mlp = model.get_submodule(".".join(parts[:-1]))
        if mlp is layers[-1]:
            raise BiaslabError(f"causal tracing / the FAST stamp need an MLP sub-module in each layer; "
                               f"{type(model).__name__} ({model.config.model_type}) has its FFN projections "
                               "directly in the decoder layer, so there is no MLP output to trace or stamp")
        mlps.append(mlp)
    return layers, mlps


def n_layers(model: nn.Module) -> int:
    return len(layer_modules(model)[0])


def check_layer(model: nn.Module, layer: int) -> int:
    n = n_layers(model)
    if not isinstance(layer, int) or not 0 <= layer < n:
        raise BiaslabError(f"layer {layer} is outside the model: valid layers are 0..{n - 1} ({n} layers)")
    return layer


def _replace_rows(h: torch.Tensor, rows: list[int], pos: int, values: torch.Tensor) -> torch.Tensor:
    """A copy of the hidden states ``h`` with ``h[rows, pos] = values`` (values: (len(rows), d))."""
    h = h.clone()
    h[rows, pos] = values.to(h.dtype)
    return h


def subject_token_positions(lm, prompt: str, span: tuple[int, int]) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` (as ``lm.encode`` makes them) and the indices of tokens overlapping ``span``."""
    tok = lm.tokenizer
    enc = tok(prompt, add_special_tokens=not lm.use_chat_template, return_offsets_mapping=True)
    ids, offs = list(enc["input_ids"]), enc["offset_mapping"]
    a, b = span
    pos = [i for i, (s, e) in enumerate(offs) if e > s and s < b and e > a]
    if not pos:
        raise BiaslabError(f"the subject {prompt[a:b]!r} maps to no token of {prompt!r}")
    return ids, pos


@torch.no_grad()
def trace(lm, items: list[TraceItem], *, kinds=("hidden", "mlp"), noise_scale: float = 3.0, n_noise: int = 3,
          window: int = 1, seed: int = 0, progress: bool | None = None) -> TraceResult:
    """Causal tracing of ``items`` on ``lm``; see the module docstring."""
    if not items:
        raise BiaslabError("causal tracing needs at least one pair")
    kinds = tuple(kinds)
    for k in kinds:
        if k not in ("hidden", "mlp"):
            raise BiaslabError(f"unknown tracing kind {k!r}; choose hidden or mlp")
    model = lm.model
    layers, mlps = layer_modules(model)
    L = len(layers)
    emb = model.get_input_embeddings()
    dev = lm.device

    prepared = []
    for it in items:
        ids, spos = subject_token_positions(lm, it.prompt, it.subject_span)
        obj = it.object if it.object.startswith(" ") else " " + it.object.strip()
        ctx, cont = lm.split_context(it.prompt, obj)
        if not cont:
            raise BiaslabError(f"{it.id}: the object {it.object!r} has no tokens")
        spos = [p for p in spos if p < len(ctx)]
        if not spos:
            raise BiaslabError(f"{it.id}: the subject merges into the object's tokens")
        prepared.append((ctx + cont[:-1], spos, len(ctx), cont))
    # ROME: noise std = scale × std of the subject tokens' embeddings — as the embedding module outputs them, which
    # is where the noise is added (Gemma's embedding scales by √d inside the module: raw weights would make the
    # noise √d times too weak)
    sub_ids = torch.tensor(sorted({ids[p] for ids, spos, _, _ in prepared for p in spos}), device=dev)
    with torch.no_grad():
        std = float(emb(sub_ids[None]).float().std())
    sigma = noise_scale * std
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def object_lp(logits, n_ctx, cont):  # (B, T, V) -> (B,) mean log-prob of the object tokens
        lp = refuse_nan(torch.log_softmax(logits[:, n_ctx - 1:n_ctx - 1 + len(cont)].float(), -1), lm.spec, lm.dtype)
        tgt = torch.tensor(cont, device=lp.device)
        return lp[:, torch.arange(len(cont)), tgt].mean(-1)

    per = {k: np.zeros((len(items), L)) for k in kinds}
    p_clean = np.zeros(len(items))
    p_corr = np.zeros(len(items))
    from . import distributed as D

    W, me = D.world_size(), D.rank()
    d_emb = emb.weight.shape[1]
    with progress_bar(len(items), D.shared_label("causal tracing"), enabled=lm.progress) as advance:
        for n, (ids, spos, n_ctx, cont) in enumerate(prepared):
            if n % W != me:   # another rank's pair: draw its noise anyway, so every pair gets the noise it gets alone
                for _ in range(n_noise):
                    torch.randn((len(spos), d_emb), generator=gen)
                continue
            t = max(spos)
            x = torch.tensor([ids], device=dev)
            # clean run, capturing each layer's output and MLP output at t
            clean_h, clean_m = [None] * L, [None] * L
            capture = [Intervention(f"tracing:capture:{where}{li}", mod[li], "capture_output",
                                    lambda h, li=li, store=store: store.__setitem__(li, h[0, t].clone()))
                       for li in range(L) for where, mod, store in (("layer", layers, clean_h), ("mlp", mlps, clean_m))]
            with Hooks(capture):
                p_clean[n] = float(object_lp(model(input_ids=x, use_cache=False).logits, n_ctx, cont)[0])

            # batch rows: 0 = corrupted only; then one row per (kind, layer)
            plan = [(k, li) for k in kinds for li in range(L)]
            B = 1 + len(plan)
            rows_h = {li: [] for li in range(L)}
            rows_m = {li: [] for li in range(L)}
            for r, (k, li) in enumerate(plan, start=1):
                lo, hi = max(0, li - window // 2), min(L, li - window // 2 + window)
                for lj in range(lo, hi):
                    (rows_h if k == "hidden" else rows_m)[lj].append(r)
            xb = x.expand(B, -1)
            pc, acc = 0.0, np.zeros(len(plan))
            for _ in range(n_noise):
                noise = torch.randn((len(spos), emb.weight.shape[1]), generator=gen).to(dev) * sigma

                def add_noise(o, noise=noise):
                    o = o.clone()
                    o[:, spos] = o[:, spos] + noise.to(o.dtype)
                    return o

                ivs = [Intervention("tracing:noise", emb, "replace_output", add_noise)]
                for li in range(L):
                    for where, mod, rows, clean in (("layer", layers, rows_h, clean_h), ("mlp", mlps, rows_m, clean_m)):
                        if rows[li]:
                            ivs.append(Intervention(f"tracing:restore:{where}{li}", mod[li], "replace_output",
                                                    lambda h, li=li, rows=rows, clean=clean: _replace_rows(
                                                        h, rows[li], t, clean[li].expand(len(rows[li]), -1))))
                with Hooks(ivs):
                    lps = object_lp(model(input_ids=xb, use_cache=False).logits, n_ctx, cont).cpu().numpy()
                pc += lps[0]
                acc += lps[1:] - lps[0]
            p_corr[n] = pc / n_noise
            acc /= n_noise
            for r, (k, li) in enumerate(plan):
                per[k][n, li] = acc[r]
            advance(min(W, len(items) - n))   # this rank's pair n ends the round n … n + W − 1 (run in parallel)
    if W > 1:   # pair n was traced on rank n mod W; every rank ends with all of them
        for r, got in enumerate(D.all_gather({n: (p_clean[n], p_corr[n], {k: per[k][n] for k in kinds})
                                              for n in range(me, len(items), W)})):
            for n, (pc_n, pr_n, rows) in got.items():
                p_clean[n], p_corr[n] = pc_n, pr_n
                for k in kinds:
                    per[k][n] = rows[k]
    params = {"noise_scale": noise_scale, "noise_std": sigma, "embedding_std": std, "n_noise": n_noise,
              "window": window, "seed": seed, "position": "last subject token",
              "effect": "log P(object) restored - corrupted, mean over object tokens (nats)"}
    return TraceResult(L, kinds, per, p_clean, p_corr, [it.id for it in items], params)
