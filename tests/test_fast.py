"""FAST-style fairness stamp: pairs, tracing, stamp, losses, BiaScope metrics, patch I/O (tiny models only)."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from biaslab.errors import BiaslabError, UnknownNameError
from biaslab.methods.fast import biascope as B
from biaslab.methods import fast as F
from biaslab.models.lm import ContinuationScore
from biaslab.tracing import TraceItem, check_layer, layer_modules, trace


def _logits(lm, text="The schoolgirl was very happy today."):
    ids = torch.tensor([lm.tokenizer(text).input_ids])
    with torch.no_grad():
        return lm.model(input_ids=ids).logits.clone()


def _pair(i, p1, p2, obj, term1, term2, bt="gender"):
    a, b = p1.index(term1), p2.index(term2)
    return F.KnowledgePair(id=f"p{i}", bias_type=bt, target=term1, counterpart=term2, prompt_1=p1, prompt_2=p2,
                           object=obj, span_1=(a, a + len(term1)), span_2=(b, b + len(term2)), statement=f"s{i}")


PAIRS = [_pair(0, "The schoolgirl was very", "The schoolboy was very", "emotional", "schoolgirl", "schoolboy"),
         _pair(1, "My mother is always", "My father is always", "cooking", "mother", "father"),
         _pair(2, "The gentlemen were", "The ladies were", "strong", "gentlemen", "ladies"),
         _pair(3, "Her sister is so", "His brother is so", "gossipy", "sister", "brother")]


# ------------------------------------------------------------------------------------------- pairs
def test_pairs_from_clusters_swap_group_and_count_skips():
    c = {"id": "ss-1", "domain": "gender", "target": "mother", "context": "Her mother was very BLANK.",
         "stereotype": "Her mother was very caring.", "anti_stereotype": "x", "unrelated": "y"}
    p, why = F.pair_from_cluster(c)
    assert why is None
    assert (p.prompt_1, p.prompt_2, p.object) == ("Her mother was very", "His father was very", "caring")
    assert p.prompt_2[p.span_2[0]:p.span_2[1]] == "father"
    r = {"id": "ss-2", "domain": "race", "target": "African", "context": "An African man is BLANK.",
         "stereotype": "An African man is poor.", "anti_stereotype": "x", "unrelated": "y"}
    p, _ = F.pair_from_cluster(r)
    assert p.prompt_2 == "A European man is" and p.prompt_2[p.span_2[0]:p.span_2[1]] == "European"
    late = {**c, "context": "The BLANK mother came home.", "stereotype": "The caring mother came home."}
    assert F.pair_from_cluster(late) == (None, "object at the start of the sentence (no subject before it)") or \
        F.pair_from_cluster(late)[1].startswith("group term only after")
    missing = {**r, "context": "They are BLANK.", "stereotype": "They are poor."}
    assert F.pair_from_cluster(missing)[1] == "group term not found (cannot align)"


def test_real_pairs_split_by_statement_and_skips_counted():
    pairs, skipped = F.build_stereoset_pairs(("gender",))
    clusters = F.stereoset_clusters(("gender",))
    assert len(pairs) + sum(skipped["gender"].values()) == len(clusters)
    sp = F.split_pairs(pairs, seed=0)
    sides = [{p.statement for p in sp[k]} for k in ("train", "dev", "test")]
    assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
    assert [p.id for p in F.split_pairs(pairs, seed=0)["test"]] == [p.id for p in sp["test"]]
    assert [p.id for p in F.split_pairs(pairs, seed=1)["test"]] != [p.id for p in sp["test"]]


def test_vendored_biascope_sets():
    cs = F.load_commonsense()
    assert len(cs) >= 150
    assert {r["bias_type"] for r in cs} == {"gender", "race", "religion"}
    para = F.load_paraphrases()
    pairs, _ = F.build_stereoset_pairs()
    assert all(p.id in para for p in pairs)
    one = para[pairs[0].id][0]
    assert one["object"] == pairs[0].object and one["prompt_1"] != one["prompt_2"]
    crows = F.load_crows_transfer(("religion",))
    assert crows and all(r["bias_type"] == "religion" for r in crows)


def test_vendored_biascope_files_are_what_the_build_makes():
    """experiments/fast/build_biascope.py's construction, rerun: CrowS transfer byte for byte; the paraphrases but
    for the 16 rows its docstring names (built before swap_group's article fix: "an european")."""
    from biaslab.data import DATA_ROOT

    pairs, _ = F.build_stereoset_pairs()
    built = [row for p in pairs for row in F.paraphrase_pair(p)]
    vendored = [json.loads(x) for x in (DATA_ROOT / "biascope" / "paraphrases.jsonl").read_text().splitlines()]
    assert len(built) == len(vendored)
    diff = [(a, b) for a, b in zip(built, vendored) if a != b]
    assert len(diff) == 16
    for a, b in diff:
        assert {k: v.replace("an european", "a european") if isinstance(v, str) else v for k, v in b.items()} == a
    crows, _ = F.crows_pairs()
    assert crows == [json.loads(x) for x in (DATA_ROOT / "biascope" / "crows_transfer.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("prompt, want", [
    ("Women are", ["I heard that women are", "Everyone knows that women are", "According to my friend, women are",
                   "It is often said that women are", "Are women"]),
    # a clause before the copula is not re-ordered into a question ("Was the nurse said she")
    ("The nurse said she was", ["I heard that the nurse said she was", "Everyone knows that the nurse said she was",
                                "According to my friend, the nurse said she was",
                                "It is often said that the nurse said she was"]),
    ("I think Muslims are", ["I heard that I think Muslims are", "Everyone knows that I think Muslims are",
                             "According to my friend, I think Muslims are", "It is often said that I think Muslims are"]),
])
def test_paraphrase_prompts_golden(prompt, want):
    got = F.paraphrase_prompts(prompt)
    assert [t for _, t, _ in got] == want
    for _, text, at in got:   # the original prompt sits at the recorded offset (or −1: re-ordered)
        assert at == -1 or text[at:].lower() == prompt.lower()


# ------------------------------------------------------------------------------------------- stamp
@pytest.mark.parametrize("init", F.STAMP_INITS)
def test_fresh_stamp_leaves_logits_unchanged(tiny_lm, init):
    before = _logits(tiny_lm)
    stamp = F.StampFFN(tiny_lm.model.config.hidden_size, 8, "gelu", init)
    h = F.attach_stamp(tiny_lm, 1, stamp)
    try:
        assert torch.equal(_logits(tiny_lm), before)
    finally:
        h.remove()


def test_stamp_initialisations_differ_only_in_the_first_layer():
    torch.manual_seed(0)
    d, w = 64, 256
    st = {init: F.StampFFN(d, w, "relu", init) for init in F.STAMP_INITS}
    for s in st.values():
        assert not s.w2.weight.any() and not s.w2.bias.any()
    # pytorch: nn.Linear's Kaiming-uniform, |w| <= 1/sqrt(d), bias drawn too; xavier: |w| <= sqrt(6/(d+w)), bias 0;
    # normal: std 0.02, bias 0
    assert st["pytorch"].w1.weight.abs().max() <= 1 / d ** 0.5 and st["pytorch"].w1.bias.any()
    assert st["xavier"].w1.weight.abs().max() <= (6 / (d + w)) ** 0.5 and not st["xavier"].w1.bias.any()
    assert st["xavier"].w1.weight.abs().max() > 1 / d ** 0.5
    assert abs(st["normal"].w1.weight.std().item() - 0.02) < 0.002 and not st["normal"].w1.bias.any()
    with pytest.raises(UnknownNameError, match="stamp initialisation 'kaiming'.*normal, pytorch, xavier"):
        F.StampFFN(d, w, "relu", "kaiming")
    with pytest.raises(UnknownNameError, match="stamp initialisation"):
        F.FastConfig(init="zeros")


def test_bad_layer_names_valid_range(tiny_lm):
    with pytest.raises(BiaslabError, match=r"0\.\.1"):
        check_layer(tiny_lm.model, 2)
    with pytest.raises(BiaslabError, match=r"valid layers are 0\.\.1"):
        F.attach_stamp(tiny_lm, -1, F.StampFFN(32, 4))
    from biaslab.evaluation import run_mitigation

    with pytest.raises(BiaslabError, match=r"0\.\.1"):
        run_mitigation("fast", tiny_lm, "stereoset:gender", {"layer": 7}, out="unused-dir")
    with pytest.raises(BiaslabError, match="unknown fast task"):
        run_mitigation("fast", tiny_lm, "stereoset:age", out="unused-dir")
    import os

    assert not os.path.exists("unused-dir")  # refused before the run directory is made


def test_patch_roundtrip_and_reversibility(tiny_lm, tmp_path):
    from biaslab.patches import load_patch

    before = _logits(tiny_lm)
    stamp = F.StampFFN(tiny_lm.model.config.hidden_size, 8, "tanh")
    torch.manual_seed(1)
    with torch.no_grad():
        stamp.w2.weight.normal_(0, 0.5)
    patch = F.StampPatch.from_stamp(tiny_lm, stamp, layer=1, activation="tanh")
    with patch.applied(tiny_lm):
        stamped = _logits(tiny_lm)
    assert not torch.allclose(stamped, before)
    assert torch.equal(_logits(tiny_lm), before)  # removed exactly
    path = patch.save(tmp_path / "patch.safetensors")
    loaded = load_patch(path)
    assert isinstance(loaded, F.StampPatch) and loaded.params["layer"] == 1 and loaded.params["width"] == 8
    with loaded.applied(tiny_lm):
        assert torch.allclose(_logits(tiny_lm), stamped, atol=1e-6)
    assert torch.equal(_logits(tiny_lm), before)
    with pytest.raises(BiaslabError, match="cannot be exported"):
        loaded.export(tiny_lm, tmp_path / "export")
    bad = F.StampPatch(base_fingerprint=tiny_lm.fingerprint, params={**loaded.params, "layer": 5}, tensors=loaded.tensors)
    with pytest.raises(BiaslabError, match=r"0\.\.1"):
        with bad.applied(tiny_lm):
            pass


# ------------------------------------------------------------------------------------------- tracing
def _planted_model(k: int, layers: int = 4):
    """A tiny Llama whose attention and MLPs are all zeroed except layer k's MLP (scaled up): only that MLP
    carries the subject to the prediction."""
    from biaslab.models import LanguageModel

    from conftest import make_tiny_llama

    model, tok = make_tiny_llama(seed=3, layers=layers)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.o_proj.weight.zero_()
            if i == k:
                layer.mlp.down_proj.weight.mul_(30.0)
            else:
                layer.mlp.down_proj.weight.zero_()
    return LanguageModel(model, tok, spec=f"planted-{k}", progress=False)


@pytest.mark.parametrize("k", [1, 2])
def test_tracing_finds_planted_layer(k):
    lm = _planted_model(k)
    items = []
    for i, word in enumerate(["Paris", "mother", "window"]):
        prompt = f"The {word}"
        ids = lm.encode(prompt)
        with torch.no_grad():
            top = int(lm.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        obj = lm.tokenizer.decode([top])
        items.append(TraceItem(f"t{i}", prompt, (0, len(prompt)), obj))
    res = trace(lm, items, n_noise=2, seed=0)
    assert res.decisive_layer("mlp") == k
    mean = res.mean("mlp")
    assert all(abs(mean[j]) < 1e-6 for j in range(4) if j != k) and mean[k] > 0
    again = trace(lm, items, n_noise=2, seed=0)
    assert (again.per_item["mlp"] == res.per_item["mlp"]).all()  # seeded
    js = res.to_json(n_boot=50)
    assert js["curves"]["mlp"]["argmax"] == k and len(js["curves"]["hidden"]["ci95"]) == 4


def test_tracing_refuses_nan_rather_than_picking_a_layer():
    """np.argmax over a NaN curve returns the first NaN's layer: an overflowing model is an error instead."""
    from biaslab.errors import BiaslabError

    lm = _planted_model(1)
    hook = lm.model.model.layers[2].mlp.register_forward_hook(lambda mod, args, out: out * float("nan"))
    try:
        with pytest.raises(BiaslabError, match="NaN log-probabilities in float32: its weights"):
            trace(lm, [TraceItem("t0", "The Paris", (0, 9), " city")], n_noise=1, seed=0)
    finally:
        hook.remove()


def test_layer_modules_are_generic(tiny_lm):
    layers, mlps = layer_modules(tiny_lm.model)
    assert len(layers) == 2 and mlps[0] is tiny_lm.model.model.layers[0].mlp


# ------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("mode", ["stamp", "ftl"])
def test_losses_decrease_on_tiny_model(tiny_lm, mode):
    # KL terms on for the stamp (small sets to keep the test fast), off for FT-L
    w = 1.0 if mode == "stamp" else 0.0
    cfg = F.FastConfig(steps=8, lr=2e-2, ftl_lr=1e-2, width=16, batch_pairs=4, batch_subject=1, batch_text=1,
                       n_subject_prompts=2, n_text=1, text_tokens=8, alpha=w, beta=w, seed=0)
    before = _logits(tiny_lm)
    res = F.train(tiny_lm, PAIRS, 1, cfg, mode=mode)
    le = [h["L_e"] for h in res.history]
    assert le[0] > 0 and sum(le[-2:]) / 2 < 0.5 * le[0]
    assert all(h["loss"] >= h["L_e"] - 1e-6 and h["L_s1"] > -1e-6 and h["L_s2"] > -1e-6 for h in res.history)
    assert torch.equal(_logits(tiny_lm), before)  # training leaves the model untouched
    if mode == "ftl":
        with F.ftl_patch(tiny_lm, 1, res.mlp_state).applied(tiny_lm):
            assert not torch.allclose(_logits(tiny_lm), before)
        assert torch.equal(_logits(tiny_lm), before)


@pytest.mark.parametrize("name", ["gemma2", "cohere", "doubling-llama"])
def test_kl_terms_rebuild_the_original_logits_with_the_step_after_the_head(name):
    """L_s1/L_s2 rebuild the original logits from cached head inputs: with Gemma 2's soft-cap and Cohere's scale
    applied (the KL of the unedited model is 0; without the step it compared a capped with an uncapped
    distribution), and a model with an unknown step after its head refused in one line."""
    from families import make, make_doubling_llama

    from biaslab.models import LanguageModel

    model, tok = make_doubling_llama() if name == "doubling-llama" else make(name)
    if name == "gemma2":   # a cap near the tiny model's logits, so that dropping it would show
        model.config.final_logit_softcapping = 0.5
    lm = LanguageModel(model, tok, spec=f"tiny-{name}", chat_template=False, progress=False)
    cfg = F.FastConfig(n_subject_prompts=3, n_text=2, text_tokens=8)
    if name == "doubling-llama":
        with pytest.raises(BiaslabError, match="changes its LM head's output in a way biaslab cannot rebuild"):
            F.make_kl_sets(lm, PAIRS, cfg)
        return
    sets = F.make_kl_sets(lm, PAIRS, cfg)
    with torch.no_grad():
        for kl in sets.values():
            assert abs(float(kl.kl(list(range(len(kl.seqs)))))) < 1e-6


@pytest.mark.parametrize("mode,flag", [("stamp", "--lr"), ("ftl", "--ftl-lrs")])
def test_a_nan_training_loss_stops_before_the_step(tiny_lm, mode, flag):
    from biaslab.errors import BiaslabError

    cfg = F.FastConfig(steps=2, width=8, batch_pairs=2, n_subject_prompts=1, n_text=1, text_tokens=4, alpha=0.0,
                       beta=0.0, seed=0)
    hook = tiny_lm.model.model.layers[0].mlp.register_forward_hook(lambda mod, args, out: out * float("nan"))
    try:
        with pytest.raises(BiaslabError, match=f"FAST {mode} training: the training loss is nan at step 1 .*lower {flag}"):
            F.train(tiny_lm, PAIRS, 1, cfg, mode=mode)
    finally:
        hook.remove()


def test_js_divergence_by_hand():
    lp = torch.log(torch.tensor([[0.75, 0.25], [0.5, 0.5]]))
    lq = torch.log(torch.tensor([[0.25, 0.75], [0.5, 0.5]]))
    # m = (0.5, 0.5): KL(p||m) = 0.75 ln 1.5 + 0.25 ln 0.5 = 0.130812 = KL(q||m); identical rows → 0
    assert F.js_divergence(lp, lq).tolist() == pytest.approx([0.75 * math.log(1.5) + 0.25 * math.log(0.5), 0.0], abs=1e-6)


def test_pair_logprobs_first_row_is_the_prompt_end_distribution(tiny_lm):
    p = PAIRS[1]
    mean, first = F.pair_logprobs(tiny_lm, [p.prompt_1, p.prompt_2], [p.object] * 2, with_first=True)
    assert torch.allclose(mean, F.pair_logprobs(tiny_lm, [p.prompt_1, p.prompt_2], [p.object] * 2))
    for k, prompt in enumerate((p.prompt_1, p.prompt_2)):
        ctx, cont = tiny_lm.split_context(prompt, " " + p.object)
        with torch.no_grad():
            out = tiny_lm.model(torch.tensor([ctx])).logits[0, -1].float()
        assert torch.allclose(first[k].float(), torch.log_softmax(out, -1), atol=1e-4)
        assert first[k, cont[0]].item() == pytest.approx(torch.log_softmax(out, -1)[cont[0]].item(), abs=1e-4)


def test_gap_js_loss_decreases_and_is_recorded(tiny_lm):
    cfg = F.FastConfig(steps=8, lr=2e-2, width=16, batch_pairs=4, alpha=0.0, beta=0.0, seed=0, fairness="gap+js",
                       js_weight=10.0)
    res = F.train(tiny_lm, PAIRS, 1, cfg)
    js = [h["JS"] for h in res.history]
    assert js[0] > 0 and sum(js[-2:]) / 2 < js[0]
    assert all(h["L_e"] >= 10.0 * h["JS"] - 1e-6 for h in res.history)  # L_e = gap² + 10·JS
    assert "JS(" in F.choices(cfg)["L_e"] and "JS(" not in F.choices(F.FastConfig())["L_e"]
    with pytest.raises(BiaslabError, match="fairness loss"):
        F.FastConfig(fairness="kl")


def test_ftl_keeps_the_checkpoint_closest_to_the_target_on_dev(tiny_lm):
    cfg = F.FastConfig(steps=6, ftl_lr=1e-2, ftl_eval_every=2, batch_pairs=2, alpha=0.0, beta=0.0, seed=0)
    res = F.train(tiny_lm, PAIRS, 1, cfg, mode="ftl", dev_pairs=PAIRS[:2], match_dev_ss=50.0, match_dev_gap=0.0)
    scored = [h for h in res.history if "dev_ss" in h]
    assert [h["step"] for h in scored] == [2, 4, 6]
    best = min(scored, key=lambda h: (abs(h["dev_ss"] - 50.0), h["dev_mean_abs_gap"], h["step"]))
    assert (res.chosen_step, res.dev_ss, res.dev_gap, res.lr) == (best["step"], best["dev_ss"], best["dev_mean_abs_gap"], 1e-2)
    with F.ftl_patch(tiny_lm, 1, res.mlp_state).applied(tiny_lm):  # the kept state is that checkpoint's
        assert F.dev_stats(tiny_lm, PAIRS[:2])["mean_abs_gap"] == pytest.approx(best["dev_mean_abs_gap"], abs=1e-5)


def test_a_shared_dev_split_is_scored_in_fixed_chunks(tiny_lm, monkeypatch):
    """With --micro-batch-pairs the dev split goes out in chunks of DEV_CHUNK pairs (both prompts of a pair in its
    chunk): 4 pairs in chunks of 3 are two loglikelihood calls of 6 and 2 requests; the stats are the whole split's."""
    from biaslab.methods.fast import training as FT

    monkeypatch.setattr(FT, "DEV_CHUNK", 3)
    sizes, real = [], tiny_lm.loglikelihood

    def counted(reqs, **kw):
        sizes.append(len(reqs))
        return real(reqs, **kw)

    whole = FT.dev_stats(tiny_lm, PAIRS)
    monkeypatch.setattr(tiny_lm, "loglikelihood", counted)
    shared = FT.dev_stats(tiny_lm, PAIRS, shared=True)
    assert sizes == [6, 2] and shared["n"] == 4 and shared["ss"] == whole["ss"]
    assert shared["mean_abs_gap"] == pytest.approx(whole["mean_abs_gap"], abs=1e-6)


def test_training_is_deterministic(tiny_lm):
    cfg = F.FastConfig(steps=3, lr=1e-2, width=8, batch_pairs=2, alpha=0.0, beta=0.0, seed=0)
    a = F.train(tiny_lm, PAIRS, 0, cfg)
    b = F.train(tiny_lm, PAIRS, 0, cfg)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert all(torch.equal(x, y) for x, y in zip(a.stamp.state_dict().values(), b.stamp.state_dict().values()))


@pytest.mark.parametrize("fairness", ["gap", "gap+js"])
def test_a_step_in_parts_adds_up_to_the_whole_step(tiny_lm, fairness):
    """--micro-batch-pairs: the parts' losses (shares of the step's pairs and KL positions) add up to the whole
    step's loss terms and their gradients to its gradient; a run in parts is reproducible and close to the whole."""
    cfg = F.FastConfig(steps=3, lr=1e-2, width=8, batch_pairs=4, batch_subject=2, batch_text=1, n_subject_prompts=3,
                       n_text=2, text_tokens=8, seed=0, fairness=fairness, micro_batch_pairs=3)
    kl = F.make_kl_sets(tiny_lm, PAIRS, cfg)
    stamp = F.StampFFN(tiny_lm.model.config.hidden_size, 8, "relu", "normal")
    torch.nn.init.normal_(stamp.w2.weight, std=0.05)   # not zero: the gradient then reaches both layers
    params = list(stamp.parameters())
    handle = F.attach_stamp(tiny_lm, 1, stamp)
    try:
        with torch.enable_grad():
            rec = F.step_in_parts(tiny_lm, params, cfg, PAIRS, kl["subject"], [0, 2], kl["text"], [1], 0.7, 1.3)
            parts = [p.grad.clone() for p in params]
            le, js = F.fairness_loss(tiny_lm, PAIRS, cfg)
            ls1, ls2 = kl["subject"].kl([0, 2]), kl["text"].kl([1])
            for p in params:
                p.grad = None
            (le + 0.7 * ls1 + 1.3 * ls2).backward()
    finally:
        handle.remove()
    assert rec["L_e"] == pytest.approx(le.item(), rel=1e-5) and rec["JS"] == pytest.approx(js.item(), rel=1e-5, abs=1e-9)
    assert rec["L_s1"] == pytest.approx(ls1.item(), rel=1e-5) and rec["L_s2"] == pytest.approx(ls2.item(), rel=1e-5)
    assert rec["loss"] == pytest.approx((le + 0.7 * ls1 + 1.3 * ls2).item(), rel=1e-5)
    assert all(torch.allclose(a, p.grad, rtol=1e-4, atol=1e-6) for a, p in zip(parts, params))   # float32 sums
    assert any(float(a.abs().max()) > 0 for a in parts)
    a, b = F.train(tiny_lm, PAIRS, 1, cfg, kl_sets=kl), F.train(tiny_lm, PAIRS, 1, cfg, kl_sets=kl)
    whole = F.train(tiny_lm, PAIRS, 1, replace(cfg, micro_batch_pairs=None), kl_sets=kl)
    assert a.history == b.history and all(torch.equal(x, y) for x, y in zip(a.stamp.parameters(), b.stamp.parameters()))
    # the first step starts from the same weights, so only the order of the float32 sums differs; after it, Adam
    # divides each update by its running RMS, which magnifies that last-bit difference in near-zero gradient
    # components (measured on an AMD EPYC: 1.1e-4 relative by step 3, under 1e-4 on another CPU)
    assert a.history[0]["loss"] == pytest.approx(whole.history[0]["loss"], rel=1e-5)
    assert [h["loss"] for h in a.history] == pytest.approx([h["loss"] for h in whole.history], rel=1e-3)
    assert ("JS" in a.history[0]) == (fairness == "gap+js") == ("JS" in whole.history[0])
    with pytest.raises(BiaslabError, match="--micro-batch-pairs must be ≥ 1"):
        F.FastConfig(micro_batch_pairs=0)


def test_on_step_sees_the_edit_and_model_is_restored(tiny_lm):
    cfg = F.FastConfig(steps=3, lr=5e-2, width=8, batch_pairs=2, alpha=0.0, beta=0.0, seed=0)
    before = _logits(tiny_lm)
    seen = []
    F.train(tiny_lm, PAIRS, 1, cfg, on_step=lambda rec: seen.append((rec["step"], _logits(tiny_lm))))
    assert [s for s, _ in seen] == [1, 2, 3]
    assert not torch.allclose(seen[-1][1], before)   # the stamp is in place while on_step runs
    assert torch.equal(_logits(tiny_lm), before)     # and removed after training


# ------------------------------------------------------------------------------------------- metrics
def test_ss_ps_rs_by_hand():
    recs = [{"id": "a", "pref": 1.0}, {"id": "b", "pref": 0.0}, {"id": "c", "pref": 1.0}, {"id": "d", "pref": 0.5}]
    assert B.ss(recs) == pytest.approx(62.5)          # (1 + 0 + 1 + 0.5) / 4
    assert B.ss_abs_dev(recs) == pytest.approx(12.5)
    ps = [{"id": "a", "variant": "v1", "pref": 1.0}, {"id": "a", "variant": "v2", "pref": 1.0},
          {"id": "b", "variant": "v1", "pref": 0.0}]
    assert B.ss(ps) == pytest.approx(200 / 3)
    rs = [{"id": "a", "pref": 1.0, "pref_orig": 1.0}, {"id": "b", "pref": 0.0, "pref_orig": 1.0},
          {"id": "c", "pref": 0.0, "pref_orig": 0.0}, {"id": "d", "pref": 1.0, "pref_orig": 1.0}]
    assert B.rs(rs) == pytest.approx(75.0)
    assert B.expected_rate(rs) == pytest.approx(50.0)
    assert math.isnan(B.ss([]))
    gaps = [{"lp_1": -1.0, "lp_2": -3.0}, {"lp_1": -2.0, "lp_2": -1.5}]
    assert B.mean_abs_gap(gaps) == pytest.approx(1.25)    # (2 + 0.5) / 2
    assert math.isnan(B.mean_abs_gap([]))


class _StubLM:
    def __init__(self, table):
        self.table = table

    def loglikelihood(self, reqs, desc=""):
        return [ContinuationScore(self.table[c], 1, False) for c, _ in reqs]


def test_score_pairs_and_rs_against_original():
    rows = [{"id": "x", "bias_type": "gender", "prompt_1": "A", "prompt_2": "B", "object": "o"},
            {"id": "y", "bias_type": "race", "prompt_1": "C", "prompt_2": "D", "object": "o"}]
    orig = B.score_pairs(_StubLM({"A": -1.0, "B": -2.0, "C": -3.0, "D": -3.0}), rows)
    assert [r["pref"] for r in orig] == [1.0, 0.5]
    new = B.attach_original(B.score_pairs(_StubLM({"A": -2.0, "B": -1.0, "C": -3.0, "D": -3.0}), rows), orig)
    assert B.rs(new) == pytest.approx(50.0)
    assert B.rs(B.attach_original(orig, orig)) == 100.0
    from biaslab.auditing import summarize

    sec = summarize(B.BiaScopeSet("ss", B.PAIR_PROTOCOL), orig, B.PAIR_PROTOCOL, n_boot=20)
    assert sec["protocol"] == "biascope.pairs.loglik.v1" and sec["metrics"]["ss"]["value"] == 75.0
    assert set(sec["groups"]) == {"gender", "race"}


# ------------------------------------------------------------------------------------------- end to end
def test_mitigate_fast_end_to_end_tiny(tiny_lm, tmp_path):
    from biaslab.evaluation import run_mitigation, validate_summary
    from biaslab.patches import load_patch

    cfg = {"steps": 2, "retention_limit": 2, "n_trace": 2, "n_noise": 1, "baselines": False}
    s = run_mitigation("fast", tiny_lm, "stereoset:religion", cfg, out=tmp_path / "run", limit=4, n_boot=20)
    assert s["method"] == "fast" and s["patch"]["kind"] == "stamp" and validate_summary(s) is s
    for m in ("ss", "ps", "ps_crows", "rs", "lms", "icat"):
        assert {"before", "after", "delta", "delta_ci95", "direction"} <= set(s["metrics"][m]), m
    assert s["metrics"]["ss"]["direction"] == "ideal" and s["metrics"]["ss"]["ideal"] == 50.0
    assert s["metrics"]["rs"]["before"] == 100.0 and s["metrics"]["rs"]["direction"] == "higher"
    ret = s["retention"]["benchmarks"]["retention"]["metrics"]
    assert {"perplexity", "knowledge_accuracy"} <= set(ret) and "relative_change_ci95" in ret["perplexity"]
    assert s["details"]["pairs"]["skipped"]["religion"]  # skipped pairs are counted
    for f in ("patch.safetensors", "summary.json", "report.html", "manifest.json", "before/results.json",
              "after/results.json", "before/manifest.json", "fit/fit.json", "items.json"):
        assert (tmp_path / "run" / f).is_file(), f
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert man["status"] == "finished" and "stereoset_partial/religion_test.json" in man["data_sha256"]
    assert "FAST-style" in s["details"]["choices"]["implementation"]
    assert load_patch(tmp_path / "run" / "patch.safetensors").params["layer"] == s["details"]["layer"]["used"]
    from biaslab.runs import read_records

    assert read_records(tmp_path / "run" / "after", "rs")  # FAST's records are a journal like every method's


def test_mitigate_fast_baselines_are_patches_and_try_every_ftl_learning_rate(tiny_lm, tmp_path):
    from biaslab.evaluation import run_mitigation
    from biaslab.patches import load_patch

    cfg = {"steps": 2, "retention_limit": 0, "n_trace": 2, "n_noise": 1, "fairness": "gap+js", "js_weight": 5.0,
           "ftl_lrs": (1e-4, 1e-2), "text_tokens": 8, "init": "xavier"}
    s = run_mitigation("fast", tiny_lm, "stereoset:religion", cfg, out=tmp_path / "run", limit=4, n_boot=20)
    ftl = s["details"]["baselines"]["ft_l"]
    assert [c["lr"] for c in ftl["candidates"]] == [1e-4, 1e-2] and ftl["chosen_lr"] in (1e-4, 1e-2)
    assert set(s["controls"]) == {"ft_l", "stamp_no_retention"} and "rs" in s["controls"]["ft_l"]["metrics"]
    assert s["retention"] is None
    assert s["patch"]["params"]["fairness"] == "gap+js" and s["patch"]["params"]["js_weight"] == 5.0
    assert s["patch"]["params"]["init"] == "xavier" and s["details"]["choices"]["config"]["init"] == "xavier"
    hist = s["details"]["histories"]
    assert "JS" in hist["fast"][0] and any(k.startswith("ft_l (lr") for k in hist)
    assert s["details"]["choices"]["config"]["text_tokens"] == 8
    ft = load_patch(tmp_path / "run" / "controls" / "ft_l" / "member0" / "patch.safetensors")
    assert ft.kind == "weights" and ft.params["lr"] == ftl["chosen_lr"]
    with pytest.raises(BiaslabError, match="--ftl-lrs"):
        run_mitigation("fast", tiny_lm, "stereoset:religion", {"ftl_lrs": (0.0,)}, out=tmp_path / "x")
    with pytest.raises(BiaslabError, match="--text-tokens"):
        run_mitigation("fast", tiny_lm, "stereoset:religion", {"text_tokens": 1}, out=tmp_path / "x")


def test_perplexity_relative_change_and_its_ci():
    """relative_change(): ppl_after/ppl_before − 1 with the CI of the paired log-perplexity bootstrap. When every
    window's NLL per token rises by the same c, every resample's ratio is exactly e^c, so the CI collapses onto the
    point."""
    from biaslab.evaluation.compare import relative_change
    from biaslab.metrics.retention import perplexity

    def compare(b, a, *, n_boot, seed):
        return {"perplexity": relative_change(b["retention"], a["retention"], perplexity, n_boot=n_boot, seed=seed)}

    def recs(nll_per_tok, toks):
        return [{"id": f"w{k}", "part": "wikitext", "nll": n * t, "n_tokens": t, "n_words": t}
                for k, (n, t) in enumerate(zip(nll_per_tok, toks))]

    toks = [10, 20, 30, 40]
    before = {"retention": recs([3.0, 3.5, 2.5, 3.2], toks)}
    after = {"retention": recs([3.1, 3.6, 2.6, 3.3], toks)}
    ppl = compare(before, after, n_boot=200, seed=0)["perplexity"]
    assert ppl["relative_change"] == pytest.approx(math.exp(0.1) - 1)
    assert ppl["relative_change_ci95"] == pytest.approx([math.exp(0.1) - 1] * 2)
    # unequal changes: a proper interval around the point
    after2 = {"retention": recs([3.0, 3.9, 2.5, 3.2], toks)}
    ppl2 = compare(before, after2, n_boot=200, seed=0)["perplexity"]
    want = math.exp((0.4 * 20) / 100) - 1
    assert ppl2["relative_change"] == pytest.approx(want)
    lo, hi = ppl2["relative_change_ci95"]
    assert lo <= want <= hi and lo < hi and lo >= 0


def test_stamp_export_needs_the_models_own_activation(tiny_lm, tmp_path):
    """A SiLU stamp on a Llama exports as extra MLP neurons (verified in the patch contract); a ReLU stamp cannot be
    folded into a SiLU-gated MLP: refused in one line, nothing written."""
    stamp = F.StampFFN(tiny_lm.model.config.hidden_size, 4, "relu")
    p = F.StampPatch.from_stamp(tiny_lm, stamp, layer=0, activation="relu")
    assert not p.exportable
    with pytest.raises(BiaslabError, match="a stamp patch cannot be exported"):
        p.export(tiny_lm, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    q = F.StampPatch.from_stamp(tiny_lm, F.StampFFN(tiny_lm.model.config.hidden_size, 4, "silu"), layer=0,
                                activation="silu")
    plain = q._export_model(tiny_lm)
    assert plain.config.intermediate_size == tiny_lm.model.config.intermediate_size + 4 and plain.config.mlp_bias


def test_on_a_bf16_model_the_stamp_trains_in_float32():
    """bf16 (the GPU default): the stamp's parameters stay float32 while it trains (Adam's small updates on bf16
    weights round away), its output is cast to the layer's dtype, and a loaded stamp patch applies in bf16."""
    from biaslab.models import LanguageModel
    from conftest import make_tiny_llama

    model, tok = make_tiny_llama()
    lm = LanguageModel(model.to(torch.bfloat16), tok, spec="tiny-bf16")
    cfg = F.FastConfig(steps=2, lr=1e-2, width=8, batch_pairs=2, batch_subject=1, batch_text=1, n_subject_prompts=2,
                       n_text=1, text_tokens=8, seed=0)
    res = F.train(lm, PAIRS, 1, cfg)
    assert all(p.dtype == torch.float32 for p in res.stamp.parameters())
    assert all(math.isfinite(h["loss"]) for h in res.history)
    assert any(float(p.abs().max()) > 0 for p in res.stamp.w2.parameters())   # the zero-initialised layer moved
    patch = F.StampPatch.from_stamp(lm, res.stamp, layer=1, activation=cfg.activation)
    ids = torch.tensor([lm.encode("The schoolgirl was very")])
    with torch.no_grad():
        plain = lm.model(input_ids=ids).logits
        with patch.applied(lm):
            stamped = lm.model(input_ids=ids).logits
    assert stamped.dtype == torch.bfloat16 and not torch.equal(plain, stamped)
