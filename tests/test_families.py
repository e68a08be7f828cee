"""The family contract suite (issue 17): the same assertions for every model family users bring."""
from __future__ import annotations

import pytest
import torch

from families import AFTER_HEAD, ALL_MOE, FAMILIES, MOE, WINDOW, make

LONG = " ".join(["the nurse told the doctor that the results were ready"] * 5)   # far longer than WINDOW tokens
REQS = [("The nurse said", " that she was tired."), ("A", " b c d"), (LONG, " and then they left."),
        ("The engineer", " fixed it.")]


def _reference(model, lm, reqs):
    """log P(continuation | context) from one plain forward pass per request (transformers' own masks)."""
    out = []
    for ctx, cont in reqs:
        a, b = lm.split_context(ctx, cont)
        ids = torch.tensor([a + b])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits.float()[0, :-1], -1)
        out.append(float(sum(lp[len(a) - 1 + k, t] for k, t in enumerate(b))))
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    from biaslab.models import LanguageModel

    model, tok = make(request.param)
    return request.param, model, LanguageModel(model, tok, spec=f"tiny-{request.param}", chat_template=False)


@pytest.mark.parametrize("mode", ["auto", "padded", "dense"])
def test_scoring_equals_one_plain_forward_per_request(family, mode):
    """Every scoring mode equals a plain forward pass, including a context longer than the sliding window; the
    mode the engine uses is recorded and falls back to padded where packing cannot be exact."""
    name, model, lm = family
    lm.packing = {"auto": None, "padded": False, "dense": True}[mode]
    lm.tree_attention = False if mode == "dense" else None
    lm._mode_checked = {}
    try:
        got = [r.logprob for r in lm.loglikelihood(REQS)]
    finally:
        lm.packing, lm.tree_attention, lm._mode_checked = None, None, {}
    assert len(lm.encode(LONG)) > WINDOW
    assert got == pytest.approx(_reference(model, lm, REQS), abs=2e-4), name


def test_an_input_longer_than_the_context_is_one_line(family):
    """GPT-2 / OPT (learned positions) failed with an IndexError inside torch; rotary models scored untrained
    positions silently. Scoring, generation and attribution now name the input; one that fits still scores."""
    from biaslab import attribution as A
    from biaslab.errors import BiaslabError

    name, model, lm = family
    limit = model.config.max_position_embeddings
    fits, long = "word " * (limit - 8), "word " * (limit + 8)
    assert len(lm.encode(fits)) < limit < len(lm.encode(long))
    assert lm.loglikelihood([(fits, " end")])[0].n_tokens >= 1
    msg = rf"does not fit the {limit}-token context of model 'tiny-{name}' .* it begins 'word word"
    with pytest.raises(BiaslabError, match="log-likelihood: an input of .*" + msg):
        lm.loglikelihood([(long, " end")])
    with pytest.raises(BiaslabError, match=r"tokens \+ 16 to generate " + msg):
        lm.generate([fits], max_new_tokens=16)
    with pytest.raises(BiaslabError, match="attribution: " + ".*" + msg):
        A.activation_x_gradient(lm, [lm.encode(long)], [1])


@pytest.mark.parametrize("name", AFTER_HEAD)
def test_a_model_that_scales_or_caps_after_its_head_keeps_the_split_with_its_step(name):
    """Cohere multiplies the head's output by logit_scale, Granite divides it by logits_scaling, Gemma 2 soft-caps
    it: the head on the wanted positions alone dropped that silently (0.46 / 0.49 max |Δ logit| on Cohere /
    Granite). The split applies the model's own step (models.head.after_head), checked at construction against
    the model's logits, so these models score on the split too, in float32 under bf16 weights."""
    from biaslab.models import LanguageModel

    model, tok = make(name)
    if name == "gemma2":   # a cap near the tiny model's logits, so that dropping it would show
        model.config.final_logit_softcapping = 0.5
    lm = LanguageModel(model, tok, spec=f"tiny-{name}", chat_template=False)
    assert lm.after_head is not None and lm._use_head_split() is True
    assert [r.logprob for r in lm.loglikelihood(REQS)] == pytest.approx(_reference(model, lm, REQS), abs=2e-4)
    ids = torch.tensor([lm.encode("The nurse said that")])
    rows, cols = torch.zeros(2, dtype=torch.long), torch.tensor([2, ids.shape[1] - 1])
    full = model.to(torch.bfloat16)
    half = LanguageModel(full, tok, spec=f"tiny-{name}", chat_template=False)
    with torch.no_grad():
        got = half.logits_at(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None], rows, cols)
        own = full(input_ids=ids).logits[0, cols].float()
    assert got.dtype == torch.float32 and half._use_head_split() is True
    assert (got.to(torch.bfloat16).float() != got).any()   # not bf16 logits upcast: formed in float32
    assert torch.allclose(got, own, atol=0.1 * own.abs().max().item())


def test_a_model_that_does_something_else_after_its_head_scores_through_its_own_forward():
    """An unknown step after the head fails the construction check: the model's own forward gives the logits."""
    from families import make_doubling_llama

    from biaslab.models import LanguageModel

    model, tok = make_doubling_llama()
    llama, _ = make("llama")
    lm = LanguageModel(model, tok, spec="tiny-doubled", chat_template=False)
    assert lm.after_head is None and lm._use_head_split() is False
    widths = []   # the head runs on the wanted columns only (logits_to_keep), not on every position
    hook = model.get_output_embeddings().register_forward_hook(lambda m, a, out: widths.append(out.shape[1]))
    got = [r.logprob for r in lm.loglikelihood(REQS)]
    hook.remove()
    assert got == pytest.approx(_reference(model, lm, REQS), abs=2e-4)
    longest = max(len(sum(lm.split_context(c, x), [])) for c, x in REQS)
    assert widths and max(widths) < longest
    half = LanguageModel(model.to(torch.bfloat16), tok, spec="tiny-doubled", chat_template=False)
    ids = torch.tensor([half.encode("The nurse said that")])
    with torch.no_grad():
        got = half.logits_at(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None], torch.zeros(1).long(),
                             torch.tensor([ids.shape[1] - 1]))
    assert (got.to(torch.bfloat16).float() != got).any()   # the head's output formed in float32 there too
    assert LanguageModel(llama, tok, spec="tiny-llama", chat_template=False)._use_head_split() is True


def test_next_token_scores_equal_the_plain_forward(family):
    name, model, lm = family
    prompts = ["The nurse said", LONG]
    got = lm.next_token_logprobs(prompts, [" yes", " no"])
    for p, g in zip(prompts, got):
        ids = torch.tensor([lm.encode(p)])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits.float()[0, -1], -1)
        want = [float(lp[lm.candidate_token_id(c)]) for c in (" yes", " no")]
        assert g == pytest.approx(want, abs=2e-4), name


# ------------------------------------------------------------------------------------------------ attribution
@pytest.fixture(scope="module", params=FAMILIES)
def family64(request):
    """A float64 copy with larger weights: non-trivial gradients for exact derivative checks."""
    from biaslab.models import LanguageModel

    model, tok = make(request.param, seed=1)
    if request.param in ALL_MOE:
        model.set_experts_implementation("eager")   # transformers' grouped_mm kernel has no float64
    model = model.double()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2 and "emb" not in n and "wte" not in n and "wpe" not in n:
                p.mul_(3)
    return request.param, LanguageModel(model, tok, spec=f"tiny64-{request.param}", chat_template=False)


@pytest.mark.parametrize("kind", ["ffn", "linear"])
def test_attribution_equals_finite_differences(family64, kind):
    """activation × gradient at the last layer's strongest unit equals a central finite difference."""
    from biaslab import attribution as A
    from biaslab.errors import BiaslabError
    from biaslab.interventions import Hooks, Intervention

    name, lm = family64
    seqs = [lm.encode("the nurse told the doctor that"), lm.encode("a b c d e f")]
    tg = [lm.candidate_token_id(c) for c in (" yes", " no")]
    if name in ALL_MOE and kind == "linear":
        with pytest.raises(BiaslabError, match="linear sites .* not defined for .*use --sites ffn"):
            A.resolve_sites(lm, kind)
        return
    site = A.resolve_sites(lm, kind)[-1]
    with A.AttributionPass(lm, [site], seqs, reduce="sum") as ap:
        g = torch.autograd.grad(ap.objective(tg).sum(), [ap.hooks.s[site.name]])[0]
        per, h = ap.hooks.h[site.name] * g, ap.hooks.h[site.name].detach().clone()
    r, t = 0, len(seqs[0]) - 1
    i = int(per[r, t].abs().argmax())

    def value(delta):
        def bump(x):
            x = x.clone()
            if x.dim() == 2:                    # OPT's FFN sees (B·T, U)
                x[r * h.shape[1] + t, i] += delta
            else:
                x[r, t, i] += delta
            return x
        if site.expert_width:                   # a MoE layer: its experts' routed activations, recomputed
            hk = Hooks([Intervention("fd", site.module, "edit_experts", bump)]).attach()
        elif kind == "ffn":
            hk = site.module.register_forward_pre_hook(lambda m, a: (bump(a[0]),) + tuple(a[1:]))
        else:
            hk = site.module.register_forward_hook(lambda m, a, out: bump(out))
        try:
            return float(A.objective_values(lm, seqs, tg)[r])
        finally:
            hk.remove()

    eps = 1e-3
    fd = (value(eps) - value(-eps)) / (2 * eps) * float(h[r, t, i])
    assert abs(float(per[r, t, i])) > 1e-8, name
    assert fd == pytest.approx(float(per[r, t, i]), rel=1e-3, abs=1e-9), name


# ------------------------------------------------------------------------------------------------ patches
def _patches(name, lm):
    from biaslab.methods.srllm.lora import LoraPatch
    from biaslab.models.sites import find_sites, lora_targets
    from biaslab.patches import NeuronMaskPatch

    g = torch.Generator().manual_seed(1)
    s = find_sites(lm.model, "ffn")
    out = {"neuron-mask": NeuronMaskPatch.from_units(lm, {s[0].name: [1, 5], s[-1].name: [2]}, sites="ffn")}
    targets = lora_targets(lm.model)
    w = {}
    for n, mod in lm.model.named_modules():
        if n.split(".")[-1] in targets and hasattr(mod, "weight") and mod.weight.dim() == 2:
            i, o = (mod.weight.shape[0], mod.weight.shape[1]) if type(mod).__name__ == "Conv1D" else \
                (mod.weight.shape[1], mod.weight.shape[0])
            w[n] = (torch.randn(4, i, generator=g) * 0.2, torch.randn(o, 4, generator=g) * 0.2)
    out["lora"] = LoraPatch.from_weights(lm, w, params={"r": 4, "alpha": 8.0, "scale": 2.0})
    return out


def test_every_patch_kind_applies_restores_and_exports(family, tmp_path):
    """neuron-mask and LoRA (targets from the family's sites table) on every family: the patch changes the
    logits, is removed bit for bit, and exports to a directory plain transformers reloads with the same logits."""
    from transformers import AutoModelForCausalLM

    from biaslab.patches import load_patch

    name, model, lm = family
    ids = torch.tensor([lm.encode("The nurse said that the doctor would be late.")])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(ids).logits.float()
    for kind, p in _patches(name, lm).items():
        with p.applied(lm), torch.no_grad():
            patched = model(ids).logits.float()
        assert not torch.allclose(patched, base), (name, kind)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), (name, kind)
        q = load_patch(p.save(tmp_path / f"{kind}.safetensors"))
        out = q.export(lm, tmp_path / f"{name}-{kind}")
        plain = AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            assert torch.allclose(plain(ids).logits.float(), patched, atol=1e-4), (name, kind)


def test_tracing_noise_is_scaled_to_what_the_embedding_outputs():
    """Gemma multiplies its embeddings by √d inside the embedding module, where the noise is added: the noise std
    follows the module's output (√d × the raw weights' std), and the corruption lowers P(object)."""
    from biaslab.models import LanguageModel
    from biaslab.tracing import TraceItem, subject_token_positions, trace

    model, tok = make("gemma3")
    lm = LanguageModel(model, tok, spec="tiny-gemma3", chat_template=False)
    item = TraceItem("t0", "The nurse said that she", (4, 9), " was")
    res = trace(lm, [item], n_noise=2, kinds=("hidden",))
    ids, spos = subject_token_positions(lm, item.prompt, item.subject_span)
    sub = torch.tensor(sorted({ids[p] for p in spos}))
    raw = float(model.get_input_embeddings().weight[sub].detach().float().std())
    assert res.params["embedding_std"] == pytest.approx(raw * model.config.hidden_size ** 0.5, rel=1e-3)


def test_a_family_without_an_mlp_module_refuses_tracing_in_one_line():
    from biaslab.errors import BiaslabError
    from biaslab.tracing import layer_modules

    model, _ = make("opt")
    with pytest.raises(BiaslabError, match="need an MLP sub-module"):
        layer_modules(model)


def test_a_model_a_method_cannot_fit_is_refused_before_its_run_directory(tmp_path):
    """FAST on OPT (no MLP sub-module) and CRISPR's linear sites on a MoE model stopped only inside the fit, after
    the run directory was made; now before it."""
    from biaslab.errors import BiaslabError
    from biaslab.evaluation import run_mitigation
    from biaslab.models import LanguageModel

    for fam, method, task, cfg, msg in [("opt", "fast", "stereoset:religion", {}, "need an MLP sub-module"),
                                        ("mixtral", "crispr", "sst2", {"sites": "linear", "neurons": 2}, "linear sites .* not defined")]:
        model, tok = make(fam)
        lm = LanguageModel(model, tok, spec=f"tiny-{fam}", chat_template=False, progress=False)
        with pytest.raises(BiaslabError, match=msg):
            run_mitigation(method, lm, task, cfg, out=tmp_path / fam, limit=2)
        assert not (tmp_path / fam).exists(), fam


def test_base_model_prompts_end_with_a_cue_and_rewrites_keep_a_boundary(family):
    """A model without a chat template sees where its answer starts: letter and option prompts end with
    "Answer:" (the letter follows as " A"), the SR_LLM format puts "Rewritten text:" between prompt and completion,
    and the completion's labels start right after it."""
    from biaslab.methods.srllm.lora import encode_example
    from biaslab.tasks import MCItem, answer_targets, prompt_text

    name, model, lm = family
    it = MCItem("x", ("yes", "no"), 0, context="It rained.", question="Was it wet?")
    assert prompt_text(lm, it, 0, protocol="letter").endswith("\nAnswer:")
    assert answer_targets(lm, it, "letter") == [" A", " B"]
    ids, labels = encode_example(lm, "He is bossy.", "They are assertive.")
    k = labels.index(next(t for t in labels if t != -100))
    assert lm.tokenizer.decode(ids[:k]).endswith("Rewritten text:")
    assert lm.tokenizer.decode(ids[k:]).strip().startswith("They are assertive.")


# ------------------------------------------------------------------------------------------------ training
TRAINABLE_STAMP = [f for f in FAMILIES if f != "opt"]   # OPT has no MLP sub-module (refused, tested above)


@pytest.fixture(scope="module", params=TRAINABLE_STAMP)
def stamp_family(request):
    from biaslab.models import LanguageModel

    model, tok = make(request.param)
    return request.param, model, LanguageModel(model, tok, spec=f"tiny-{request.param}", chat_template=False)


def test_fast_stamp_trains_and_leaves_the_model_as_it_was(stamp_family):
    import sys

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from test_fast import PAIRS

    from biaslab.methods import fast as F

    name, model, lm = stamp_family
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = F.FastConfig(steps=2, lr=2e-2, width=8, batch_pairs=2, alpha=0.0, beta=0.0, seed=0)
    res = F.train(lm, PAIRS, 1, cfg)
    assert res.stamp is not None and any(p.abs().sum() > 0 for p in res.stamp.w2.parameters()), name
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), name


def test_lora_trains_on_the_family_targets_and_the_soft_prompt_steps(family):
    """SR_LLM's LoRA (targets from the sites table) and the soft-prompt probe each train a step; neither changes
    the model's own weights."""
    from biaslab.methods.srllm.config import SRLLMConfig
    from biaslab.methods.srllm.data import RewritePair
    from biaslab.methods.srllm.training import train_lora
    from biaslab.models.sites import lora_targets
    from biaslab.probes.prompt_training import frozen, make_prompt_encoder, train_step
    from biaslab.probes.softprompt import SoftPromptConfig, encode

    name, model, lm = family
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pairs = [RewritePair(f"wnc:t:{i}", "wnc", "He is bossy.", "They are assertive.", "subjective") for i in range(3)]
    cfg = SRLLMConfig(r=2, alpha=4, dropout=0.0, lr=1e-2, batch_size=2, eval_every=1, patience=2, epochs=1)
    res = train_lora(lm, pairs, pairs[:2], cfg, progress=False, max_steps=1)
    assert set(n.split(".")[-1] for n in res.patch.modules()) <= set(lora_targets(model)), name
    enc, _ = make_prompt_encoder(lm, SoftPromptConfig(virtual_tokens=2, lr=0.05))
    e = encode(lm, SoftPromptConfig(virtual_tokens=2), ["a fine film", "a dull film"])
    opt = torch.optim.AdamW(enc.parameters(), lr=0.05)
    with frozen(model):
        assert train_step(lm, enc, e.rows, [2, 0], e.label_ids, opt) > 0
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), name


def test_an_encoder_decoder_other_than_t5_is_refused_in_one_line(tmp_path):
    """T5-style encoder-decoders load (tests/test_seq2seq.py); any other encoder-decoder is one clear line."""
    from transformers import BartConfig, BartForConditionalGeneration

    from biaslab.errors import BiaslabError
    from biaslab.models import load_model

    BartForConditionalGeneration(BartConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1,
                                            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
                                            decoder_ffn_dim=16, max_position_embeddings=32)).save_pretrained(tmp_path / "bart")
    with pytest.raises(BiaslabError, match="encoder-decoder model \\(bart\\).*only T5-style"):
        load_model(str(tmp_path / "bart"))

# ------------------------------------------------------------------------------------------------ tracing
ATTENTION_OUT = {"llama": "self_attn.o_proj", "gpt2": "attn.c_proj", "gpt_neox": "attention.dense",
                 "phi3": "self_attn.o_proj", "opt": "self_attn.out_proj", "moe": "self_attn.o_proj"}


@pytest.mark.parametrize("name", TRAINABLE_STAMP)
def test_causal_tracing_finds_a_planted_layer(name):
    """Every attention output and every MLP zeroed except the last layer's MLP (scaled up), so only that MLP
    carries the subject to the prediction: causal tracing's decisive MLP layer must be it, and restoring any other
    layer's MLP must change nothing. (The noise is scaled to what the model adds to the residual stream.)"""
    from biaslab.models import LanguageModel
    from biaslab.models.sites import find_sites, model_family
    from biaslab.tracing import TraceItem, layer_modules, trace

    model, tok = make(name, seed=2)
    layers, _ = layer_modules(model)
    k = len(layers) - 1
    downs = [s.module for s in find_sites(model, "ffn")]
    attn = ATTENTION_OUT[model_family(model)]
    with torch.no_grad():
        for i, layer in enumerate(layers):
            layer.get_submodule(attn).weight.zero_()
            down = downs[i].down_proj if name in MOE else downs[i].weight   # MoE: every expert's down projection
            if i == k:
                down.mul_(30.0)
            else:
                down.zero_()
    lm = LanguageModel(model, tok, spec=f"planted-{name}", chat_template=False, progress=False)
    items = []
    for i, word in enumerate(["Paris", "mother", "window"]):
        prompt = f"The {word}"
        with torch.no_grad():
            top = int(model(input_ids=torch.tensor([lm.encode(prompt)])).logits[0, -1].argmax())
        items.append(TraceItem(f"t{i}", prompt, (0, len(prompt)), tok.decode([top])))
    res = trace(lm, items, n_noise=2, seed=0)
    mean = res.mean("mlp")
    assert res.decisive_layer("mlp") == k and mean[k] > 0, (name, mean)
    assert all(abs(mean[j]) < 1e-6 for j in range(len(layers)) if j != k), (name, mean)


@pytest.mark.parametrize("name", TRAINABLE_STAMP)
def test_stamp_export_with_the_models_own_activation(name, tmp_path):
    """A stamp with the family's own MLP activation ships as extra MLP neurons where the MLP has biases (Llama with
    mlp_bias, GPT-2, GPT-NeoX), its logits verified on reload; elsewhere the export says why in one line."""
    from families import STAMP_EXPORTS, stamp_export_outcome

    got = stamp_export_outcome(name, tmp_path / "out")
    if name in STAMP_EXPORTS:
        assert got == "yes", got
        assert (tmp_path / "out" / "config.json").is_file()
    else:
        assert got.startswith("no: ") and "\n" not in got and not (tmp_path / "out").exists(), got


def test_checkpointed_and_layer_chunked_attribution_equal_plain(family):
    """Activation checkpointing (the backward pass recomputes each layer) gives the same scores at every site, and
    really recomputes: the last layer runs twice. Layer chunking (one layer's sites per pass) gives the very same
    scores, alone and with checkpointing."""
    from biaslab import attribution as A

    name, model, lm = family
    seqs = [lm.encode("the nurse told the doctor that"), lm.encode("a b c d e f g h")]
    tg = [lm.candidate_token_id(c) for c in (" yes", " no")]
    for kind in ("ffn",) if name in ALL_MOE else ("ffn", "linear"):
        plain = A.activation_x_gradient(lm, seqs, tg, sites=kind)
        ckpt = A.activation_x_gradient(lm, seqs, tg, sites=kind, checkpoint_layers=True)
        assert all(torch.allclose(plain[k], ckpt[k], atol=1e-6) for k in plain), (name, kind)
        chunked = A.activation_x_gradient(lm, seqs, tg, sites=kind, layers_per_pass=1)
        assert list(chunked) == list(plain) and all(torch.equal(plain[k], chunked[k]) for k in plain), (name, kind)
        both = A.activation_x_gradient(lm, seqs, tg, sites=kind, layers_per_pass=2, checkpoint_layers=True)
        assert all(torch.equal(ckpt[k], both[k]) for k in plain), (name, kind)
    kind = "ffn" if name in ALL_MOE else "linear"
    groups = A.site_groups(A.resolve_sites(lm, kind), 2)
    assert [sorted({s.layer for s in g}) for g in groups][0] == [0, 1] and sum(map(len, groups)) == len(
        A.resolve_sites(lm, kind))
    from biaslab.tracing import layer_modules

    calls: dict = {}
    last = layer_modules(model)[0][-1] if name != "opt" else model.model.decoder.layers[-1]
    hks = [m.register_forward_hook(lambda mod, a, o, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
           for n, m in last.named_modules() if n and not n.endswith("experts.act_fn")]   # MoE: once per expert
    try:
        A.activation_x_gradient(lm, seqs[:1], tg[:1], sites=[A.resolve_sites(lm, "ffn")[0]], checkpoint_layers=True)
    finally:
        for hk in hks:
            hk.remove()
    assert max(calls.values()) == 2, (name, calls)    # the backward pass re-ran the last layer
    assert all("forward" not in m.__dict__ for m in model.modules()), name   # the wrappers are gone
