"""Mixture-of-experts FFN neurons (models/experts.py): the recomputed experts output, the unit layout against the
model's own forward, composed edits, refusals. The family contract suite (tests/test_families.py) runs the rest
— scoring, attribution = finite differences, patches and export, FAST, LoRA — on the same tiny MoE models."""
from __future__ import annotations

import pytest
import torch

from biaslab import attribution as A
from biaslab.errors import BiaslabError
from biaslab.interventions import Hooks, Intervention
from biaslab.models import LanguageModel
from biaslab.models.experts import recompute
from biaslab.models.sites import find_sites
from biaslab.patches import NeuronMaskPatch

from conftest import make_tiny_llama
from families import MOE, MOE_ONLY, make, upcycle

TEXTS = ["the nurse told the doctor that", "a b c d e f g h"]


@pytest.fixture(scope="module", params=MOE + MOE_ONLY)
def moe(request):
    model, tok = make(request.param, seed=3)
    return request.param, model, LanguageModel(model, tok, spec=f"tiny-{request.param}", chat_template=False,
                                               progress=False)


def _experts_io(model, layer: int, ids):
    """The (args, output) of one layer's experts module in a plain forward pass."""
    seen = {}
    mod = model.model.layers[layer].mlp.experts
    hk = mod.register_forward_hook(lambda m, a, o: seen.update(args=a, out=o))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        hk.remove()
    return mod, seen["args"], seen["out"]


SITES = {  # the FFN sites of the two layers, where they differ from one fused experts module per layer
    "qwen2_moe": ["model.layers.0.mlp.experts", "model.layers.0.mlp.shared_expert.down_proj",
                  "model.layers.1.mlp.experts", "model.layers.1.mlp.shared_expert.down_proj"],
    "qwen3_moe_dense0": ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.experts"],
    "deepseek_v2": ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.experts",
                    "model.layers.1.mlp.shared_experts.down_proj"],
    "deepseek_v3": ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.experts",
                    "model.layers.1.mlp.shared_experts.down_proj"],
}


def _experts_sites(model):
    return [s for s in find_sites(model, "ffn") if s.expert_width]


def test_sites_are_the_fused_experts_with_every_experts_neurons_and_any_dense_ffn(moe):
    """One site per fused experts module (E·I units), plus the plain down projection of a shared expert or of a
    dense layer among the sparse ones; one MLP per layer for causal tracing and the stamp."""
    from biaslab.tracing import layer_modules

    name, model, lm = moe
    sites = find_sites(model, "ffn")
    n_exp, width = model.model.layers[1].mlp.experts.down_proj.shape[::2]
    assert [s.name for s in sites] == SITES.get(name, [f"model.layers.{i}.mlp.experts" for i in range(2)]), name
    for s in sites:
        if s.name.endswith("experts"):
            assert s.n_units == n_exp * width and s.expert_width == width and s.edit_kind == "edit_experts", name
        else:
            assert s.n_units == s.module.in_features and not s.expert_width and s.edit_kind == "edit_input", name
    assert layer_modules(model)[1] == [layer.mlp for layer in model.model.layers], name
    with pytest.raises(BiaslabError, match="linear sites .* not defined for .*fused tensors.*--sites ffn"):
        find_sites(model, "linear")


def test_the_recomputed_output_is_the_models_own(moe):
    """Against transformers' eager loop (the order biaslab follows) and its default grouped_mm kernel."""
    name, model, lm = moe
    ids = torch.tensor([lm.encode(TEXTS[0])])
    for impl in ("eager", "grouped_mm"):
        model.set_experts_implementation(impl)
        mod, (hidden, idx, w), out = _experts_io(model, 1, ids)
        with torch.no_grad():
            got = recompute(mod, hidden, idx, w)
        assert torch.allclose(got, out, atol=1e-6, rtol=1e-5), (name, impl, float((got - out).abs().max()))
    model.set_experts_implementation("grouped_mm")


def test_pruning_a_unit_is_zeroing_that_experts_neuron(moe):
    """Unit e·I + i is expert e's neuron i: a neuron-mask patch (the model's own forward with down_proj[e][:, i]
    zeroed) gives the objective of zeroing those activations in the recomputation — what attribution scores."""
    name, model, lm = moe
    seqs = [lm.encode(t) for t in TEXTS]
    tg = [lm.candidate_token_id(c) for c in (" yes", " no")]
    site = _experts_sites(model)[-1]
    with A.AttributionPass(lm, [site], seqs, reduce="sum") as ap:
        g = torch.autograd.grad(ap.objective(tg).sum(), [ap.hooks.s[site.name]])[0]
        score = (ap.hooks.h[site.name] * g).abs().sum(dim=(0, 1))
    units = score.topk(3).indices.sort().values           # three neurons routed tokens use
    width = site.expert_width

    def zeroed(a):
        a = a.clone()
        a[:, units] = 0
        return a
    with Hooks([Intervention("zero", site.module, "edit_experts", zeroed)]):
        via_edit = A.objective_values(lm, seqs, tg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    patch = NeuronMaskPatch.from_units(lm, {site.name: units.tolist()}, sites="ffn")
    with patch.applied(lm):
        down = site.module.down_proj
        for u in units.tolist():
            assert torch.all(down[u // width, :, u % width] == 0), (name, u)
        assert int((down == 0).sum()) == len(units) * down.shape[1], name   # nothing else zeroed
        via_patch = A.objective_values(lm, seqs, tg)
    assert torch.allclose(via_edit, via_patch, atol=1e-6), (name, via_edit, via_patch)
    assert not torch.allclose(via_patch, A.objective_values(lm, seqs, tg), atol=1e-6), name
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), name


def test_a_checkpointed_first_pass_on_a_fresh_model_equals_a_plain_one():
    """The once-per-module check runs the model's own experts inside the first pass; under checkpointing that pass
    is recomputed in backward, when the check is already done — it must save no tensor for backward (it did:
    torch's CheckpointError, "a different number of tensors was saved")."""
    seqs, scores = [], []
    for ckpt in (True, False):
        model, tok = make("mixtral", seed=6)
        lm = LanguageModel(model, tok, spec="tiny", chat_template=False, progress=False)
        seqs = [lm.encode(t) for t in TEXTS]
        scores.append(A.activation_x_gradient(lm, seqs, [lm.candidate_token_id(" yes")] * 2, checkpoint_layers=ckpt))
    assert all(torch.allclose(scores[0][k], scores[1][k], atol=1e-6) for k in scores[0])


def test_edits_on_one_experts_module_compose_and_leave_no_hook(moe):
    """Two edits on one module apply in turn (as pre-hooks on a dense FFN do); removing them removes the hook."""
    name, model, lm = moe
    seqs = [lm.encode(t) for t in TEXTS]
    tg = [lm.candidate_token_id(c) for c in (" yes", " no")]
    mod = _experts_sites(model)[0].module
    with Hooks([Intervention("x2", mod, "edit_experts", lambda a: a * 2)]):
        doubled = A.objective_values(lm, seqs, tg)
    with Hooks([Intervention("x4", mod, "edit_experts", lambda a: a * 4)]):
        quadrupled = A.objective_values(lm, seqs, tg)
    with Hooks([Intervention("x2", mod, "edit_experts", lambda a: a * 2),
                Intervention("x2 again", mod, "edit_experts", lambda a: a * 2)]):
        twice = A.objective_values(lm, seqs, tg)
    assert torch.allclose(twice, quadrupled, atol=1e-6) and not torch.allclose(twice, doubled, atol=1e-4), name
    assert not mod._forward_hooks and not mod._forward_hooks_with_kwargs and "forward" not in mod.__dict__, name


def test_an_experts_module_that_computes_something_else_is_one_line(moe):
    """Scores are never taken from a recomputation that is not the model's own: a forward that scales the experts'
    output (a wrapper on the instance, as a library might install) fails the check at the first pass of a fresh
    model; the wrapper is the module's forward again afterwards."""
    name, _, _ = moe
    model, tok = make(name, seed=4)
    lm = LanguageModel(model, tok, spec="tiny", chat_template=False, progress=False)
    site = _experts_sites(model)[0]
    mod = site.module

    def scaled(*a, **k):
        return type(mod).forward(mod, *a, **k) * 1.5
    mod.forward = scaled
    with pytest.raises(BiaslabError, match=site.name + r": recomputing the experts' output .* "
                                           r"differs from the model's own"):
        A.activation_x_gradient(lm, [lm.encode(TEXTS[0])], [lm.candidate_token_id(" yes")])
    assert mod.__dict__["forward"] is scaled


def test_torch_hooks_on_an_experts_module_still_run_around_biaslabs_forward(moe):
    """A forward hook someone else put on the experts module sees, and may change, the recomputed output, as it
    does the model's own; the experts' own forward runs once per module, for the check, not at every pass."""
    name, model, lm = moe
    seqs = [lm.encode(t) for t in TEXTS]
    tg = [lm.candidate_token_id(c) for c in (" yes", " no")]
    site = _experts_sites(model)[0]
    A.activation_x_gradient(lm, seqs[:1], tg[:1])          # every experts module checked once
    with Hooks([Intervention("zero", site.module, "edit_experts", lambda a: a * 0)]):
        zero_acts = A.objective_values(lm, seqs, tg)          # no routed activation: the experts add nothing
    calls = []
    hk = site.module.register_forward_hook(lambda m, a, o: calls.append(1) or o * 0)
    try:
        zero_out = A.objective_values(lm, seqs, tg)           # the hook zeroes the (recomputed) output instead
    finally:
        hk.remove()
    assert calls and torch.allclose(zero_out, zero_acts, atol=1e-6), name
    assert not torch.allclose(zero_out, A.objective_values(lm, seqs, tg), atol=1e-4), name
    own, orig = [], type(site.module).forward
    type(site.module).forward = lambda self, *a, **k: own.append(1) or orig(self, *a, **k)
    try:
        for _ in range(3):
            A.activation_x_gradient(lm, seqs[:1], tg[:1])
    finally:
        type(site.module).forward = orig
    assert own == [] and "forward" not in site.module.__dict__, name   # the model's own experts never ran again


def test_a_moe_type_without_a_site_table_is_refused_in_one_line_and_still_scores():
    """GPT-OSS's experts have biases and a clamped gate: neuron methods refuse it with the reason; audits run."""
    import transformers as T

    from conftest import default_tokenizer
    from families import _common

    tok = default_tokenizer()
    cfg = T.GptOssConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                         max_position_embeddings=256, layer_types=["full_attention"] * 2, **_common(tok))
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(BiaslabError, match=r"model type 'gpt_oss' \(mixture of experts\) has no neuron-site table: "
                                           r"its experts have biases .* \(audits run on any model\)"):
        find_sites(model, "ffn")
    lm = LanguageModel(model, tok, spec="tiny-gpt-oss", chat_template=False, progress=False)
    assert all(r.logprob < 0 for r in lm.loglikelihood([("The nurse said", " that she was tired.")]))


def test_an_experts_layout_biaslab_does_not_recompute_is_refused_in_one_line():
    model, _ = make("mixtral")
    model.model.layers[1].mlp.experts.has_bias = True          # as GPT-OSS's experts
    with pytest.raises(BiaslabError, match=r"model.layers.1.mlp.experts \(MixtralExperts\) is not a fused experts "
                                           r"module .* no biases"):
        find_sites(model, "ffn")
    model, _ = make("mixtral")
    model.model.layers[0].block_sparse_moe = model.model.layers[0].mlp   # transformers 4's name for it
    del model.model.layers[0].mlp
    with pytest.raises(BiaslabError, match=r"model.layers.0 \(MixtralDecoderLayer\) has neither mlp.experts nor "
                                           r"mlp.down_proj"):
        find_sites(model, "ffn")


def test_a_crispr_run_on_a_moe_model_names_the_experts_it_prunes(tmp_path):
    """The whole runner (fit, before / after, control, retention) on a tiny Mixtral; the summary counts the pruned
    neurons per layer and per expert, as the patch holds them."""
    from biaslab.evaluation import run_mitigation, validate_summary
    from biaslab.patches import load_patch

    model, tok = make("mixtral", seed=5)
    lm = LanguageModel(model, tok, spec="tiny-mixtral", chat_template=False, progress=False)
    cfg = {"neurons": 4, "instructions": 1, "dev_size": 4, "control_seeds": 1, "retention_limit": 4,
           "retention_benchmarks": ("crows",)}
    summary = validate_summary(run_mitigation("crispr", lm, "sst2", cfg, out=tmp_path / "r", limit=8, n_boot=20))
    patch = load_patch(tmp_path / "r" / "patch.safetensors")
    width = model.model.layers[0].mlp.experts.down_proj.shape[2]
    want: dict = {}
    for site, units in patch.units.items():
        layer = int(site.split(".")[2])
        for u in units.tolist():
            want[f"{layer}.{u // width}"] = want.get(f"{layer}.{u // width}", 0) + 1
    assert summary["details"]["neurons_per_expert"] == want and sum(want.values()) == 4, summary["details"]
    assert summary["patch"]["kind"] == "neuron-mask" and (tmp_path / "r" / "after" / "records.jsonl").is_file()


@pytest.mark.parametrize("name", MOE_ONLY)
def test_the_family_contract_holds_on_the_other_moe_layouts(name, tmp_path, monkeypatch):
    """The family suite's checks on the layouts it does not run (a shared expert, a dense layer among sparse ones,
    OLMoE, PhiMoE, DeepSeek-V2/V3): scoring in every mode, exact layer chunking and checkpointing, attribution =
    finite differences at every site kind
    of the model, patches applied / restored / exported, the FAST stamp, LoRA and the soft prompt."""
    import test_families as TF

    model, tok = make(name)
    lm = LanguageModel(model, tok, spec=f"tiny-{name}", chat_template=False, progress=False)
    for mode in ("auto", "padded", "dense"):     # packed / tree-attention scoring = a plain forward (DeepSeek: MLA)
        TF.test_scoring_equals_one_plain_forward_per_request((name, model, lm), mode)
    TF.test_next_token_scores_equal_the_plain_forward((name, model, lm))
    TF.test_checkpointed_and_layer_chunked_attribution_equal_plain((name, model, lm))
    TF.test_every_patch_kind_applies_restores_and_exports((name, model, lm), tmp_path)
    TF.test_fast_stamp_trains_and_leaves_the_model_as_it_was((name, model, lm))
    TF.test_lora_trains_on_the_family_targets_and_the_soft_prompt_steps((name, model, lm))
    m64, tok = make(name, seed=1)
    m64.set_experts_implementation("eager")
    m64 = m64.double()
    with torch.no_grad():
        for n, p in m64.named_parameters():
            if p.dim() == 2 and "emb" not in n:
                p.mul_(3)
    lm64 = LanguageModel(m64, tok, spec=f"tiny64-{name}", chat_template=False, progress=False)
    TF.test_attribution_equals_finite_differences((name, lm64), "ffn")
    if name in SITES:   # the last site is a plain down projection there: take the last experts site too
        monkeypatch.setattr(A, "resolve_sites", lambda lm_, kind: _experts_sites(lm_.model))
        TF.test_attribution_equals_finite_differences((name, lm64), "ffn")


def test_an_upcycled_llama_computes_the_dense_model_and_its_attribution_splits_over_the_copies():
    """Every expert a copy of the dense FFN, top-k weights summing to 1: the MoE model scores as the dense one, and
    at every position a dense neuron's activation × gradient is the sum over experts of its copies' (each copy's
    activation is the dense one, its gradient the dense one times the routing weight)."""
    dense, tok = make_tiny_llama(seed=2)
    moe = upcycle(dense, n_experts=4, top_k=2, seed=1)
    lm_d = LanguageModel(dense, tok, spec="dense", chat_template=False, progress=False)
    lm_m = LanguageModel(moe, tok, spec="upcycled", chat_template=False, progress=False)
    reqs = [("The nurse said", " that she was tired."), ("A b", " c d e")]
    assert [r.logprob for r in lm_m.loglikelihood(reqs)] == pytest.approx(
        [r.logprob for r in lm_d.loglikelihood(reqs)], abs=1e-5)
    seqs = [lm_d.encode(t) for t in TEXTS]
    tg = [lm_d.candidate_token_id(c) for c in (" yes", " no")]
    a_d = A.activation_x_gradient(lm_d, seqs, tg, reduce="sum")
    a_m = A.activation_x_gradient(lm_m, seqs, tg, reduce="sum")
    width = dense.config.intermediate_size
    for i in range(dense.config.num_hidden_layers):
        d = a_d[f"model.layers.{i}.mlp.down_proj"]
        m = a_m[f"model.layers.{i}.mlp.experts"].view(len(seqs), -1, width)
        assert torch.allclose(m.sum(dim=1), d, atol=1e-6, rtol=1e-4), i
        assert not torch.allclose(m[:, 0], d, atol=1e-6), i     # a copy holds a share, not the whole
