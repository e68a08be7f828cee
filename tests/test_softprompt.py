"""Soft-prompt bias probe (docs/methods/softprompt.md): fairness metrics by hand, prompt tuning on a tiny model, prompt files,
data validation, the pipeline / benchmark / CLI on tiny models."""
from __future__ import annotations

import json
import math

import pytest
import torch

from biaslab.errors import BiaslabError, DataError, PatchMismatchError
from biaslab.metrics import fairness as F
from biaslab.probes.data import Sentence, detokenize, load_sst3, load_templates
from biaslab.probes.prompt_training import (frozen, make_prompt_encoder, train_soft_prompt, train_step,
                                           train_step_in_parts)
from biaslab.probes.softprompt import HAND_PROMPTS, SoftPrompt, SoftPromptConfig, encode, hand_prompt, label_logits, predict
from biaslab.probes.sweep import sweep


# ---------------------------------------------------------------- metrics, by hand
def _recs(run, group, golds, preds, cat="c"):
    return [{"run": run, "category": cat, "group": group, "label": g, "pred": p} for g, p in zip(golds, preds)]


def test_rates_by_hand():
    cm = F.confusion_matrix([0, 1, 2, 0], [0, 1, 2, 2])
    assert cm.tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 1]]
    r = F.rates(cm)
    assert r["accuracy"] == 0.75
    assert r["fpr_negative"] == 0.0            # gold 1, 2 → predicted 1, 2: FP 0, TN 2
    assert r["fpr_positive"] == pytest.approx(1 / 3)  # gold 0, 1, 0 → 0, 1, 2: FP 1, TN 2
    assert r["tpr_negative"] == 0.5 and r["tpr_positive"] == 1.0 and r["tpr_neutral"] == 1.0
    assert r["fpr_neutral"] == 0.0
    # a class absent from the gold labels: TPR undefined (NaN), never 0
    r2 = F.rates(F.confusion_matrix([0, 0], [0, 2]))
    assert math.isnan(r2["tpr_positive"]) and r2["fpr_positive"] == 0.5


def _fixture():
    golds = [0, 1, 2, 0]
    return (_recs("r1", "A", golds, [0, 1, 2, 2]) + _recs("r1", "B", golds, [0, 0, 2, 0]) +
            _recs("r2", "A", golds, [0, 1, 2, 2]) + _recs("r2", "B", golds, [0, 0, 0, 0]))


def test_gaps_intervals_flags_by_hand():
    t = F.gap_table(_fixture())["c"]
    a, b = t["groups"]["A"], t["groups"]["B"]
    # FPR_negative: r1 A 0, B 1/2 → gaps ∓0.25; r2 A 0, B 1 → gaps ∓0.5
    assert a["fpr_negative"]["gaps"] == pytest.approx([-0.25, -0.5])
    assert b["fpr_negative"]["gaps"] == pytest.approx([0.25, 0.5])
    half = 1.96 * math.sqrt(((0.125) ** 2 * 2) / 1) / math.sqrt(2)   # sd of [-.25, -.5] = .1768
    assert a["fpr_negative"]["mean"] == pytest.approx(-0.375)
    assert a["fpr_negative"]["lo"] == pytest.approx(-0.375 - half)
    assert a["fpr_negative"]["hi"] == pytest.approx(-0.375 + half)
    assert a["fpr_negative"]["flagged"] and b["fpr_negative"]["flagged"]
    assert a["fpr_negative"]["value"] == 0.0 and b["fpr_negative"]["value"] == 0.75
    # accuracy: r1 .75/.75 → 0, 0; r2 .75/.5 → +.125/−.125: interval [−.06, .185] includes 0 → not flagged
    assert a["accuracy"]["gaps"] == pytest.approx([0.0, 0.125])
    assert not a["accuracy"]["flagged"]
    assert t["spread"]["fpr_negative"] == pytest.approx(0.75)
    # FPR_positive: A 1/3, B 0 in both runs → gaps ±1/6 with sd 0: a zero-width interval that excludes 0
    assert a["fpr_positive"]["gaps"] == pytest.approx([1 / 6, 1 / 6]) and a["fpr_positive"]["flagged"]
    assert F.flags(F.gap_table(_fixture())) == {("c", g, m) for g in "AB" for m in ("fpr_negative", "fpr_positive")}
    assert F.n_flagged(_fixture()) == 4.0
    assert F.max_abs_gap(_fixture(), "fpr_negative") == pytest.approx(0.375)
    assert F.mean_metric(_fixture(), "accuracy") == pytest.approx((0.75 + 0.625) / 2)


def test_no_flag_from_identical_runs_or_one_run():
    golds = [0, 1, 2]
    same = _recs("r1", "A", golds, [0, 1, 2]) + _recs("r1", "B", golds, [0, 1, 2])
    recs = same + [{**r, "run": "r2"} for r in same]
    assert F.flags(F.gap_table(recs), F.METRICS) == set()          # zero gaps, sd 0: float noise is no flag
    one = F.gap_table(_recs("r1", "A", golds, [0, 0, 0]) + _recs("r1", "B", golds, [0, 1, 2]))
    assert not F.flags(one, F.METRICS) and math.isnan(one["c"]["groups"]["A"]["accuracy"]["lo"])
    assert math.isnan(F.n_flagged(_recs("r1", "A", golds, [0, 0, 0])))   # a single group: no gap defined
    assert F.compare_flags({1, 2, 3}, {2, 3, 4, 5}) == {"kept": 2, "lost": 1, "gained": 2, "changed": 3}


# ---------------------------------------------------------------- data
def test_templates_and_sst_load():
    t = load_templates()
    assert len(t) == 31972
    assert len({s.category for s in t}) == 8 and len({(s.category, s.group) for s in t}) == 53
    sst = load_sst3("dev")
    assert len(sst) == 1101 and {s.label for s in sst} == {0, 1, 2}
    assert detokenize("it 's a -lrb- funny -rrb- film , is n't it ?") == "it's a (funny) film, isn't it?"


@pytest.mark.parametrize("row, field", [("3\tgrouped_age\tyoung\tYoung people are nice.", "label"),
                                        ("x\tgrouped_age\tyoung\tYoung people are nice.", "label"),
                                        ("1\tgrouped_age\t\tYoung people are nice.", "group"),
                                        ("1\tgrouped_age\tYoung people are nice.", None)])
def test_bad_template_row_names_file_and_line(tmp_path, row, field):
    p = tmp_path / "t.tsv"
    p.write_text("2\tgrouped_age\tadult\tMature people are inspiring.\n" + row + "\n")
    with pytest.raises(DataError) as e:
        load_templates(p)
    assert e.value.line == 2 and e.value.field == field and str(p) in str(e.value)


def test_bad_sst_row(tmp_path):
    p = tmp_path / "s.tsv"
    p.write_text("sentence\tlabel\ngood film\t4\nbad film\t7\n")
    with pytest.raises(DataError, match="line 3"):
        load_sst3("dev", path=p)


# ---------------------------------------------------------------- the scorer and training on a tiny model
SENTS = ["a good movie.", "this was really quite bad, sadly", "meh", "an utterly wonderful, moving film"]


def test_cached_prefix_equals_prepending(tiny_lm):
    cfg = SoftPromptConfig(virtual_tokens=4)
    enc, _ = make_prompt_encoder(tiny_lm, cfg)
    e = encode(tiny_lm, cfg, SENTS)
    m = tiny_lm.model
    with torch.no_grad():
        got = label_logits(tiny_lm, enc.embedding.weight, e.rows, e.label_ids)
        ref = torch.stack([m(inputs_embeds=torch.cat([enc.embedding.weight, m.get_input_embeddings()(torch.tensor(r))])[None])
                           .logits[0, -1, e.label_ids] for r in e.rows])
        h = hand_prompt("question")
        e2 = encode(tiny_lm, h, SENTS)
        got2 = label_logits(tiny_lm, torch.tensor(e2.prefix_ids), e2.rows, e2.label_ids)
        ref2 = torch.stack([m(input_ids=torch.tensor(e2.prefix_ids + r)[None]).logits[0, -1, e2.label_ids] for r in e2.rows])
    assert torch.allclose(got, ref, atol=1e-5) and torch.allclose(got2, ref2, atol=1e-5)


@pytest.mark.parametrize("name", ["cohere", "gemma2"])
def test_label_logits_carry_the_models_step_after_its_head(name):
    """The label logits come from three rows of the head, then the model's own scale or soft-cap (as its forward)."""
    from families import make

    from biaslab.models import LanguageModel

    model, tok = make(name)
    lm = LanguageModel(model, tok, spec=f"tiny-{name}", chat_template=False)
    h = hand_prompt("question")
    e = encode(lm, h, SENTS)
    with torch.no_grad():
        got = label_logits(lm, torch.tensor(e.prefix_ids), e.rows, e.label_ids)
        ref = torch.stack([model(input_ids=torch.tensor(e.prefix_ids + r)[None]).logits[0, -1, e.label_ids]
                           for r in e.rows])
    assert lm._use_head_split() and torch.allclose(got, ref, atol=1e-5)


def test_label_logits_of_a_model_with_an_unknown_step_after_its_head():
    """A step biaslab does not know (logits doubled inside the forward) leaves the head split off: the label logits
    come from the model's own forward, as its logits, with the soft prompt's cache; only the rows' last columns go
    through the head (logits_to_keep), and in bf16 the head's output is formed in float32."""
    from families import make_doubling_llama

    from biaslab.models import LanguageModel

    model, tok = make_doubling_llama()
    lm = LanguageModel(model, tok, spec="tiny-doubled", chat_template=False)
    cfg = SoftPromptConfig(virtual_tokens=3, lr=0.05)
    enc, _ = make_prompt_encoder(lm, cfg)
    e = encode(lm, cfg, SENTS)
    widths = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, a, out: widths.append(out.shape[1]))
    with torch.no_grad():
        got = label_logits(lm, enc.embedding.weight, e.rows, e.label_ids)
    hook.remove()
    with torch.no_grad():
        ref = torch.stack([model(inputs_embeds=torch.cat([enc.embedding.weight, model.get_input_embeddings()(
            torch.tensor(r))])[None]).logits[0, -1, e.label_ids] for r in e.rows])
    assert lm._use_head_split() is False and torch.allclose(got, ref, atol=1e-5)
    assert widths[-1] == len({len(r) for r in e.rows}) < max(len(r) for r in e.rows)
    half = LanguageModel(model.to(torch.bfloat16), tok, spec="tiny-doubled", chat_template=False)
    with torch.no_grad():
        got16 = label_logits(half, enc.embedding.weight.detach(), e.rows, e.label_ids)
    assert (got16.to(torch.bfloat16).float() != got16).any()   # not bf16 logits upcast
    assert torch.allclose(got16, ref, atol=0.1 * ref.abs().max().item())


def test_train_step_changes_only_the_prompt(tiny_lm):
    cfg = SoftPromptConfig(virtual_tokens=4, lr=0.05)
    enc, pdict = make_prompt_encoder(tiny_lm, cfg)
    assert pdict["task_type"] == "CAUSAL_LM" and pdict["peft_type"] == "PROMPT_TUNING"
    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    p0 = enc.embedding.weight.detach().clone()
    e = encode(tiny_lm, cfg, SENTS)
    opt = torch.optim.AdamW(enc.parameters(), lr=cfg.lr, weight_decay=0.0)
    with frozen(tiny_lm.model):
        loss = train_step(tiny_lm, enc, e.rows, [2, 0, 1, 2], e.label_ids, opt)
    assert loss > 0
    assert not torch.equal(p0, enc.embedding.weight.detach())
    after = tiny_lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in tiny_lm.model.parameters())
    assert all(p.requires_grad for p in tiny_lm.model.parameters())   # flags restored


def test_a_step_in_parts_adds_up_to_the_whole_batch(tiny_lm):
    """Parts of 1, 2 and 3 sentences (the last part short) give the whole batch's loss and gradient."""
    cfg = SoftPromptConfig(virtual_tokens=3, lr=0.05)
    e = encode(tiny_lm, cfg, SENTS)
    golds = [2, 0, 1, 2]

    def step(micro):
        enc, _ = make_prompt_encoder(tiny_lm, cfg)
        seen = {}

        class Opt:   # records the gradient the step hands to the optimiser
            def step(self):
                seen["grad"] = enc.embedding.weight.grad.clone()
        with frozen(tiny_lm.model):
            if micro is None:
                opt = Opt()
                opt.zero_grad = lambda set_to_none=True: None
                loss = train_step(tiny_lm, enc, e.rows, golds, e.label_ids, opt, clip=0)
            else:
                loss = train_step_in_parts(tiny_lm, enc, e.rows, golds, e.label_ids, Opt(), micro, clip=0)
        return loss, seen["grad"]

    whole_loss, whole = step(None)
    assert whole.abs().sum() > 0
    for micro in (1, 2, 3):
        loss, grad = step(micro)
        assert loss == pytest.approx(whole_loss, rel=1e-5) and torch.allclose(grad, whole, rtol=1e-4, atol=1e-6)


def _data():
    train = [Sentence(f"t{i}", s, lab) for i, (s, lab) in enumerate(zip(SENTS * 2, [2, 0, 1, 2] * 2))]
    val = [Sentence(f"v{i}", s, lab) for i, (s, lab) in enumerate(zip(SENTS, [2, 0, 1, 2]))]
    return train, val


def test_saved_prompt_reloads_to_identical_predictions(tiny_lm, tmp_path):
    train, val = _data()
    sp = train_soft_prompt(tiny_lm, SoftPromptConfig(virtual_tokens=4, lr=0.05, batch_size=4, epochs=2), train, val,
                           progress=False)
    assert len(sp.info["losses"]) == 4 and 0 <= sp.val_accuracy <= 1
    path = sp.save(tmp_path / "p.safetensors")
    sp2 = SoftPrompt.load(path)
    assert sp2.config == sp.config and sp2.val_accuracy == sp.val_accuracy and torch.equal(sp2.embeddings, sp.embeddings)
    assert predict(tiny_lm, sp, SENTS, progress=False) == predict(tiny_lm, sp2, SENTS, progress=False)
    # deterministic: same config → same prompt
    sp3 = train_soft_prompt(tiny_lm, sp.config, train, val, progress=False)
    assert torch.equal(sp3.embeddings, sp.embeddings)
    # a different base model is refused
    from conftest import make_tiny_llama

    from biaslab.models import LanguageModel

    other = LanguageModel(*make_tiny_llama(seed=1), spec="other")
    with pytest.raises(PatchMismatchError):
        predict(other, sp2, SENTS)
    with pytest.raises(BiaslabError, match="not a readable"):
        (tmp_path / "bad.safetensors").write_text("nope")
        SoftPrompt.load(tmp_path / "bad.safetensors")


def test_hand_prompts_score(tiny_lm):
    for h in HAND_PROMPTS:
        out = predict(tiny_lm, h, SENTS, progress=False)
        assert len(out) == 4 and all(r["pred"] in (0, 1, 2) and len(r["logprobs"]) == 3 for r in out)


def test_nan_label_scores_are_an_error_not_a_prediction(tiny_lm):
    """max() over NaN log-probabilities would pick label 0 and count it in the FPR/TPR gaps."""
    hook = tiny_lm.model.model.layers[0].mlp.register_forward_hook(lambda mod, args, out: out * float("nan"))
    try:
        with pytest.raises(BiaslabError, match="NaN log-probabilities"):
            predict(tiny_lm, HAND_PROMPTS[0], SENTS, progress=False)
    finally:
        hook.remove()


@pytest.mark.parametrize("micro", [None, 2])
def test_a_nan_training_loss_stops_before_the_step(tiny_lm, micro):
    train, val = _data()
    hook = tiny_lm.model.model.layers[0].mlp.register_forward_hook(lambda mod, args, out: out * float("nan"))
    try:
        with pytest.raises(BiaslabError, match=r"soft-prompt training: the training loss is nan at step 1 .*--lrs"):
            train_soft_prompt(tiny_lm, SoftPromptConfig(virtual_tokens=2, batch_size=4, epochs=1), train, val,
                              progress=False, micro_batch_size=micro)
    finally:
        hook.remove()


def test_sweep_keeps_top_runs_and_reuses_cache(tiny_lm, tmp_path):
    base = SoftPromptConfig(virtual_tokens=2, train_limit=16, val_limit=8, batch_size=8)
    s1 = sweep(tiny_lm, base, seeds=(0, 1), lrs=(0.01,), keep=1, cache_dir=tmp_path, progress=False)
    assert len(s1.runs) == 2 and len(s1.kept) == 1 and len(s1.trained) == 2
    assert s1.kept[0].val_accuracy == max(r.val_accuracy for r in s1.runs)
    s2 = sweep(tiny_lm, base, seeds=(0, 1), lrs=(0.01,), keep=1, cache_dir=tmp_path, progress=False)
    assert s2.trained == [] and s2.kept[0].id == s1.kept[0].id
    assert torch.equal(s2.kept[0].embeddings, s1.kept[0].embeddings)
    with pytest.raises(BiaslabError, match="keep 3"):
        sweep(tiny_lm, base, seeds=(0, 1), lrs=(0.01,), keep=3, cache_dir=tmp_path)
    s3 = sweep(tiny_lm, base, seeds=(0,), lrs=(0.01,), keep=1, cache_dir=tmp_path, progress=False, micro_batch_size=3)
    assert s3.trained == ["soft-lr0.01-s0"] and s3.files["soft-lr0.01-s0"] != s1.files["soft-lr0.01-s0"]
    assert s3.kept[0].info["micro_batch_size"] == 3        # trained in parts: its own cache entry, said in its info
    with pytest.raises(BiaslabError, match="--micro-batch-size must be between 1 and the batch size"):
        sweep(tiny_lm, base, seeds=(0,), lrs=(0.01,), keep=1, cache_dir=tmp_path, micro_batch_size=9)
    with pytest.raises(BiaslabError):
        SoftPromptConfig(virtual_tokens=0)


def test_a_sweep_with_fewer_prompts_than_ranks_says_how_to_share_them(tiny_lm, tmp_path, monkeypatch):
    from biaslab import distributed as D

    monkeypatch.setattr(D, "world_size", lambda: 4)          # rank 0 of 4; the other ranks' parts come back empty
    monkeypatch.setattr(D, "all_gather", lambda obj: [obj, {}, {}, {}])
    said = []
    base = SoftPromptConfig(virtual_tokens=2, train_limit=8, val_limit=4, batch_size=8)
    sweep(tiny_lm, base, seeds=(0,), lrs=(0.01,), keep=1, cache_dir=tmp_path, progress=False, log=said.append)
    assert said == ["4 processes but 1 prompt(s) to train: 3 rank(s) idle while prompts train "
                    "(--micro-batch-size 2 shares each prompt's batches instead)"]


# ---------------------------------------------------------------- pipeline, benchmark, CLI (tiny model)
def test_pipeline_end_to_end(tiny_lm, tmp_path):
    from biaslab.probes.pipeline import run_probe

    kw = dict(runs=2, virtual_tokens=2, train_limit=16, val_limit=8, test_limit=12, template_limit=159, seeds=(0, 1),
              lrs=(0.01,), batch_size=8, hand_prompts=HAND_PROMPTS[:2], prompt_cache=tmp_path / "cache")
    res = run_probe(tiny_lm, tmp_path / "run", **kw)
    assert set(res["accuracy"]) == {"soft-lr0.01-s0", "soft-lr0.01-s1", "hand:bare", "hand:question"}
    assert res["sizes"] == {"train": 16, "val": 8, "test": 12, "templates": 159, "templates_total": 31972}
    assert set(res["fairness"]["soft"]) == {s.category for s in load_templates()}
    assert "hand_ensemble_vs_soft" in res["comparison"]
    for name in ("manifest.json", "results.json", "records.jsonl", "report.html"):
        assert (tmp_path / "run" / name).is_file()
    assert len(list((tmp_path / "run" / "prompts").glob("*.safetensors"))) == 2
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert man["status"] == "finished" and "cpu_s" in man
    # rerun: prompts from the cache, predictions from the journal → identical results
    res2 = run_probe(tiny_lm, tmp_path / "run", report=False, **kw)
    assert all(not s["trained_now"] for s in res2["sweep"])
    assert res2["fairness"] == res["fairness"] and res2["accuracy"] == res["accuracy"]


def test_sentiment_benchmark_via_audit(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("BIASLAB_CACHE", str(tmp_path / "cache"))
    from biaslab.auditing import audit
    from biaslab.benchmarks import ALL, BENCHMARKS

    assert "sentiment" in BENCHMARKS.names() and "sentiment" not in ALL
    res = audit(tiny_lm, "sentiment", limit=40, n_boot=20, out=tmp_path / "a",
                options={"sentiment": {"runs": 2, "virtual_tokens": 2, "train_limit": 16, "val_limit": 8,
                                       "seeds": (0, 1), "lrs": (0.01,), "batch_size": 8}})
    sec = res.results["benchmarks"]["sentiment"]
    assert sec["protocol"] == "sentiment.softprompt.v1" and sec["n_records"] == 80
    assert 0 <= sec["metrics"]["accuracy"]["value"] <= 1
    assert "n_flagged" in sec["metrics"] and "gap_table" in sec["extra"]
    assert any("/" in g for g in sec["groups"])
    assert list((tmp_path / "cache" / "softprompts").glob("softprompt-*.safetensors"))


def test_cli_errors(tmp_path):
    from typer.testing import CliRunner

    from biaslab.cli import app

    r = CliRunner().invoke(app, ["probe", "softprompt", "--out", str(tmp_path / "x"), "--lrs", "fast"])
    assert r.exit_code != 0 and "--lrs expects comma-separated numbers" in str(r.exception or r.output)
    r = CliRunner().invoke(app, ["probe", "softprompt", "--help"])
    assert r.exit_code == 0 and "--virtual-tokens" in r.output and "--template-limit" in r.output


@pytest.mark.integration
def test_real_model_scorer(real_lm):
    """On the default model: the cached-prefix scorer equals prepending the prompt, and the bare format gets two
    plainly polar sentences right."""
    cfg = SoftPromptConfig(virtual_tokens=8)
    enc, _ = make_prompt_encoder(real_lm, cfg)
    sents = ["I loved this wonderful, moving film.", "a terrible, boring mess from start to finish."]
    e = encode(real_lm, cfg, sents)
    m = real_lm.model
    with torch.no_grad():
        got = label_logits(real_lm, enc.embedding.weight, e.rows, e.label_ids)
        ref = torch.stack([m(inputs_embeds=torch.cat([enc.embedding.weight, m.get_input_embeddings()(torch.tensor(r))])[None])
                           .logits[0, -1, e.label_ids] for r in e.rows])
    assert torch.allclose(got, ref, atol=1e-3)
    assert [p["pred"] for p in predict(real_lm, hand_prompt("bare"), sents, progress=False)] == [2, 0]


def test_probe_refuses_a_foreign_out_before_loading_the_model(tmp_path):
    from biaslab.probes.pipeline import run_probe

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(BiaslabError, match="not a biaslab run directory"):   # not "unknown model": nothing loaded
        run_probe("no-such-model", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
