"""SR_LLM: data schema and splits, completion-only loss, LoRA training/patch/merge, rewrite metrics, CLI errors."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from biaslab.errors import BiaslabError, DataError, PatchMismatchError
from biaslab.metrics import rewrite as rm
from biaslab.methods.srllm import data as sd
from biaslab.methods.srllm.lora import (LoraPatch, SRLLMConfig, collate, completion_loss, encode_example, inject_lora,
                                       lora_weights, remove_lora)
from biaslab.methods.srllm.training import train_lora
from biaslab.methods.srllm.rewriting import rewrite

from conftest import make_tiny_llama


def _pairs(n=6):
    return [sd.RewritePair(f"t:{i}", "wnc", f"the brilliant singer number {i} performed .",
                           f"the singer number {i} performed .", "subjective") for i in range(n)]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------- data
def test_splits_schema_and_no_leak():
    splits = sd.load_splits(seed=0)
    assert set(splits) == {"train", "validation", "test"}
    train_keys = {sd.norm_key(t) for p in splits["train"] for t in (p.biased, p.neutral)}
    for s in ("validation", "test"):
        assert splits[s]
        for p in splits[s]:
            assert sd.norm_key(p.biased) not in train_keys and sd.norm_key(p.neutral) not in train_keys
    for p in splits["train"][:50] + splits["test"][:50]:
        assert p.source in sd.SOURCES and p.dimension in ("subjective", "gender") and p.biased and p.neutral
    assert {p.source for p in splits["test"]} == set(sd.SOURCES)
    again = sd.load_splits(seed=0)
    assert [p.id for p in again["test"]] == [p.id for p in splits["test"]]
    other = sd.load_splits(seed=1)
    assert [p.id for p in other["test"]] != [p.id for p in splits["test"]]


def test_shared_neutral_sentences_stay_in_one_split():
    # "he"/"she" variants with one neutral reference must not straddle splits, even across case/whitespace
    pairs = [sd.RewritePair("a", "winobias_plus", "He ran .", "They ran .", "gender"),
             sd.RewritePair("b", "winobias_plus", "she  ran .", "they ran .", "gender")]
    pairs += [sd.RewritePair(f"x{i}", "winobias_plus", f"he sat {i} .", f"they sat {i} .", "gender") for i in range(20)]
    for seed in range(10):
        sp = sd.split_pairs(pairs, seed=seed, validation=0.2, test=0.3)
        where = {p.id: s for s, ps in sp.items() for p in ps}
        assert where["a"] == where["b"]
        sd.check_no_leak(sp)


def test_corrupt_rows_name_file_and_line(tmp_path):
    root = tmp_path
    (root / "wnc_pryzant_sample").mkdir()
    for part in ("train", "test"):
        (root / "wnc_pryzant_sample" / f"pre.{part}.txt").write_text("a biased one .\nanother biased .\n")
        (root / "wnc_pryzant_sample" / f"post.{part}.txt").write_text("a one .\n\n")
    with pytest.raises(DataError) as e:
        sd.load_pairs(root, sources=["wnc"])
    assert "post.train.txt" in str(e.value) and "line 2" in str(e.value)
    (root / "wnc_chat_lou").mkdir()
    (root / "wnc_chat_lou" / "fine_tuning_train_data.jsonl").write_text('{"messages": []}\n{not json\n')
    (root / "wnc_chat_lou" / "fine_tuning_test_data.jsonl").write_text("")
    with pytest.raises(DataError) as e:
        sd.load_pairs(root, sources=["wnc_chat"])
    assert "fine_tuning_train_data.jsonl" in str(e.value) and "line 1" in str(e.value)


# ---------------------------------------------------------------------------------------------- your own pairs
def _user_pairs(n: int) -> list[dict]:
    return [{"biased": f"the brilliant singer {k} performed .", "neutral": f"the singer {k} performed ."}
            for k in range(n)]


@pytest.mark.parametrize("rows, match", [
    ([{"neutral": "x"}], r"line 1.*field 'biased'.*non-empty string"),
    ([{"biased": "a b", "neutral": "  "}], r"line 1.*field 'neutral'.*non-empty string"),
    ([{"biased": "a", "neutral": "b", "source": 3}], r"line 1.*field 'source'.*non-empty string, got 3"),
    ([{"biased": "a", "neutral": "b", "id": "x"}, {"biased": "c", "neutral": "d", "id": "x"}],
     r"line 2.*field 'id'.*'x' repeats the id of line 1"),
    ([{"biased": "a", "neutral": "A."}] + _user_pairs(1) * 2 + _user_pairs(4), r"4 distinct pairs \(2 duplicate_pair, 1 no_change "
                                                                r"dropped\).*needs at least 10"),
])
def test_user_pair_files_name_file_line_and_field(tmp_path, rows, match):
    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=match) as e:
        sd.load_user_pairs(f)
    assert "mine.jsonl" in str(e.value)
    with pytest.raises(DataError, match="pair file not found"):
        sd.load_user_pairs(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="is a directory; --task pairs:PATH takes one JSON Lines file"):
        sd.load_user_pairs(tmp_path)
    from biaslab.methods.srllm.method import SRLLM

    with pytest.raises(BiaslabError, match="pairs:PATH needs the path of your pair file"):
        SRLLM().load_task("pairs: ", SRLLMConfig())


def test_user_pairs_split_like_the_vendored_ones(tmp_path):
    f = tmp_path / "mine.jsonl"
    rows = _user_pairs(40) + [{"biased": "he is a nurse .", "neutral": "they are a nurse .", "id": "n1",
                               "source": "gender", "dimension": "gender"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    name, pairs = sd.load_user_pairs(f)
    assert name.startswith("pairs:mine.jsonl@") and len(name) == len("pairs:mine.jsonl@") + 12
    assert pairs[0].id == "mine-1" and pairs[0].source == "user" and pairs[-1].dimension == "gender"
    sp = sd.split_user_pairs(pairs, seed=0)
    assert sum(len(v) for v in sp.values()) == 41 and all(sp[s] for s in sd.SPLITS)
    assert [p.id for p in sd.split_user_pairs(pairs, seed=0)["test"]] == [p.id for p in sp["test"]]
    f.write_text(f.read_text() + json.dumps({"biased": "one more .", "neutral": "more ."}) + "\n")
    assert sd.load_user_pairs(f)[0] != name   # the name follows the content


def test_mitigate_srllm_on_a_users_pair_file(tiny_lm, tmp_path):
    """--task pairs:PATH goes through the one runner: the summary's task is the file's content-named id, the
    manifest hashes the file, the held-out pairs come from it."""
    from biaslab.evaluation import run_mitigation

    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in _user_pairs(20)))
    cfg = {"train_limit": 4, "val_limit": 2, "batch_size": 2, "max_length": 96, "eval_every": 1, "retention": False}
    s = run_mitigation("srllm", tiny_lm, f"pairs:{f}", cfg, out=tmp_path / "run", limit=3, n_boot=10)
    assert s["task"].startswith("pairs:mine.jsonl@")
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert any(v.startswith("sha256:") for v in man["data_sha256"].values())
    held = json.loads((tmp_path / "run" / "items.json").read_text())
    assert held and all(i.startswith("mine-") for ids in held.values() for i in ids)
    # compare reloads the pairs from the manifest's task_spec; a file edited since the run is refused
    from biaslab.signoff.compare import compare_runs

    assert compare_runs([tmp_path / "run", tmp_path / "run"], n_boot=10)["rows"]
    f.write_text(f.read_text() + json.dumps({"biased": "one more brilliant line .", "neutral": "one more line ."}) + "\n")
    with pytest.raises(BiaslabError, match=r"the run's task was pairs:mine\.jsonl@.*now holds pairs:mine\.jsonl@.*"
                                           "changed since the run"):
        compare_runs([tmp_path / "run", tmp_path / "run"], n_boot=10)
    f.unlink()
    with pytest.raises(BiaslabError, match="cannot load the run's task pairs:mine.jsonl@.* again.*pair file not found"):
        compare_runs([tmp_path / "run", tmp_path / "run"], n_boot=10)


# ---------------------------------------------------------------------------------------------- training
def test_completion_only_masking(tiny_lm):
    ids, labels = encode_example(tiny_lm, "the brilliant singer performed .", "the singer performed .")
    n_prompt = sum(1 for y in labels if y == -100)
    prompt_text = tiny_lm.tokenizer.decode(ids[:n_prompt])
    assert prompt_text.endswith("<|im_start|>assistant\n") and "brilliant singer" in prompt_text
    assert all(y == -100 for y in labels[:n_prompt]) and all(y != -100 for y in labels[n_prompt:])
    assert labels[-1] == tiny_lm.tokenizer.eos_token_id == ids[-1]
    assert tiny_lm.tokenizer.decode(labels[n_prompt:-1]) == "the singer performed ."
    # changing only prompt-token targets must not change the loss: no loss sits on prompt tokens
    batch = collate([(ids, labels)], tiny_lm.pad_id)
    loss1, n1 = completion_loss(tiny_lm, batch)
    assert n1 == len(ids) - n_prompt
    # gradient w.r.t. logits: perturbing the model output at prompt positions leaves the loss unchanged
    with torch.no_grad():
        logits = tiny_lm.model(input_ids=batch["input_ids"]).logits[0]
    lp = torch.log_softmax(logits.float(), -1)
    manual = -torch.stack([lp[t - 1, ids[t]] for t in range(n_prompt, len(ids))]).mean()
    assert torch.allclose(loss1, manual, atol=1e-5)


def test_training_step_changes_only_lora_and_restores_model(tiny_lm):
    model = tiny_lm.model
    before = _state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    cfg = SRLLMConfig(r=4, alpha=8, dropout=0.0, lr=1e-2, batch_size=3, max_length=128, eval_every=1, patience=5)
    layers = inject_lora(model, cfg)
    init = lora_weights(layers)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # two steps: B leaves 0 on step 1, so A's gradient is non-zero on step 2
        batch = collate([encode_example(tiny_lm, p.biased, p.neutral) for p in _pairs(3)], tiny_lm.pad_id)
        loss, _ = completion_loss(tiny_lm, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = lora_weights(layers)
    assert all(not torch.equal(init[n][1], after[n][1]) for n in init)
    assert all(not torch.equal(init[n][0], after[n][0]) for n in init)
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n
    remove_lora(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and set(model.state_dict()) == set(before)
    for n, p in model.named_parameters():
        p.requires_grad_(flags[n])


def _trained_patch(lm, steps=3, seed=0):
    cfg = SRLLMConfig(r=4, alpha=8, dropout=0.0, lr=2e-2, batch_size=3, eval_every=2, patience=3, seed=seed, epochs=2)
    return train_lora(lm, _pairs(6), _pairs(3), cfg, progress=False, max_steps=steps)


@pytest.fixture(scope="module")
def trained():
    """(tiny LanguageModel, TrainResult, state before training); trained once per module."""
    from biaslab.models import LanguageModel

    model, tok = make_tiny_llama()
    lm = LanguageModel(model, tok, spec="tiny-llama")
    before = _state(model)
    return lm, _trained_patch(lm), before


def test_train_lora_deterministic_and_patch_roundtrip(trained, tmp_path):
    tiny_lm, res, before = trained
    assert all(torch.equal(v, before[k]) for k, v in tiny_lm.model.state_dict().items())
    assert not hasattr(tiny_lm.model, "peft_config")
    assert res.history["steps"] == 3 and len(res.history["train_loss"]) == 3 and res.history["val_loss"]
    again = _trained_patch(tiny_lm)
    assert all(torch.equal(res.patch.tensors[k], again.patch.tensors[k]) for k in res.patch.tensors)
    from biaslab.patches import load_patch

    path = res.patch.save(tmp_path / "p.safetensors")
    loaded = load_patch(path)
    assert isinstance(loaded, LoraPatch) and loaded.params["r"] == 4
    assert all(torch.equal(loaded.tensors[k], res.patch.tensors[k]) for k in res.patch.tensors)


def test_patch_matches_peft_reversible_and_merge_equals_applied(trained, tmp_path):
    tiny_lm, res, _ = trained
    patch = res.patch
    ids = torch.tensor([encode_example(tiny_lm, "the brilliant singer performed .", "the singer performed .")[0]])
    with torch.no_grad():
        base = tiny_lm.model(input_ids=ids).logits
        with patch.applied(tiny_lm):
            applied = tiny_lm.model(input_ids=ids).logits
        restored = tiny_lm.model(input_ids=ids).logits
    assert torch.equal(base, restored)               # removal is bit-for-bit
    assert not torch.allclose(base, applied, atol=1e-4)
    # the hook patch reproduces peft's own LoRA forward pass
    cfg = SRLLMConfig(r=4, alpha=8, dropout=0.0)
    layers = inject_lora(tiny_lm.model, cfg)
    from biaslab.methods.srllm.lora import _load_lora_weights

    _load_lora_weights(layers, patch.modules())
    tiny_lm.model.eval()
    with torch.no_grad():
        peft_logits = tiny_lm.model(input_ids=ids).logits
    remove_lora(tiny_lm.model)
    assert torch.allclose(peft_logits, applied, atol=1e-5)
    # merge (export) equals the applied adapter, and export writes a loadable plain model
    merged = patch.merged_model(tiny_lm)
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
    assert torch.allclose(merged_logits, applied, atol=1e-4)
    out = patch.export(tiny_lm, tmp_path / "exported")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, applied, atol=1e-4)
    assert torch.equal(tiny_lm.model(input_ids=ids).logits.detach(), base)


def test_lora_patch_refused_on_wrong_base(trained):
    from biaslab.models import LanguageModel

    patch = trained[1].patch
    other_model, tok = make_tiny_llama(seed=1)
    other = LanguageModel(other_model, tok, spec="other-tiny")
    with pytest.raises(PatchMismatchError):
        with patch.applied(other):
            pass
    with pytest.raises(PatchMismatchError):
        rewrite(other, ["some text"], patch=patch)


def test_config_validation():
    with pytest.raises(BiaslabError, match="rank"):
        SRLLMConfig(r=0)
    with pytest.raises(BiaslabError, match="dropout"):
        SRLLMConfig(dropout=1.5)


def test_unknown_target_module(tiny_lm):
    with pytest.raises(BiaslabError, match="not found"):
        inject_lora(tiny_lm.model, SRLLMConfig(target_modules=("nope_proj",)))


# ---------------------------------------------------------------------------------------------- rewriting
def test_rewrite_errors_and_truncation(tiny_lm):
    with pytest.raises(BiaslabError, match="empty"):
        rewrite(tiny_lm, ["ok text", "   "])
    with pytest.raises(BiaslabError, match="limit of 8"):
        rewrite(tiny_lm, ["word " * 30], max_input_tokens=8, on_long="error")
    out = rewrite(tiny_lm, ["word " * 30, "short one"], max_input_tokens=8, max_new_cap=4)
    assert len(out.rewrites) == 2 and len(out.notices) == 1 and "limit of 8" in out.notices[0]
    assert out.max_new_tokens == [4, 4]


def test_rewrite_in_a_run_dir_resumes_after_an_interruption(tiny_lm, tmp_path, monkeypatch):
    """``rewrite --out``: each chunk is journaled as it finishes; a run interrupted in its second chunk, rerun,
    reads the first back and generates only the rest, ending with the rewrites of an uninterrupted run."""
    from biaslab.methods.srllm import rewriting as R
    from biaslab.runs import RunDir

    texts = [f"the nurse number {i} said she was tired" for i in range(5)]
    whole = R.rewrite_shared(tiny_lm, texts, max_new_cap=3, chunk=2)
    real, calls = R._generate, []

    def generate(lm, prepared, limits, desc):
        calls.append(len(prepared))
        if len(calls) == 2 and interrupt:
            raise KeyboardInterrupt
        return real(lm, prepared, limits, desc)

    monkeypatch.setattr(R, "_generate", generate)
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        R.rewrite_shared(tiny_lm, texts, max_new_cap=3, chunk=2, run=RunDir(tmp_path / "r", {"t": 1}))
    calls.clear()
    interrupt = False
    again = R.rewrite_shared(tiny_lm, texts, max_new_cap=3, chunk=2, run=RunDir(tmp_path / "r", {"t": 1}))
    assert again.rewrites == whole.rewrites and calls == [2, 1]   # chunk 0 read back; chunks 1 and 2 generated
    journal = [json.loads(x) for x in (tmp_path / "r" / "records.jsonl").read_text().splitlines()]
    assert [j["chunk_done"] for j in journal if "chunk_done" in j] == [0, 1, 2]
    assert [j["input"] for j in journal if "input" in j] == texts


def test_cli_rewrite_into_a_run_dir(tmp_path):
    """The run directory holds the manifest (model, texts' sha256), results.json (notices) and rewrites.jsonl;
    the same command again resumes (nothing regenerated), other texts into it are refused in one line."""
    from typer.testing import CliRunner

    from biaslab.cli import app

    model, tok = make_tiny_llama()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    args = ["rewrite", "--model", str(tmp_path / "m"), "--max-new-tokens", "3", "--max-input-tokens", "6",
            "--out", str(tmp_path / "r"), "he said she was a brilliant nurse and a good one too", "short one"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    lines = [json.loads(x) for x in (tmp_path / "r" / "rewrites.jsonl").read_text().splitlines()]
    assert [x["input"] for x in lines] == args[-2:]
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert res["complete"] and res["texts"] == 2 and res["cut"] == 1 and "text 1 has" in res["notices"][0]
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["args"]["protocol"] == "srllm.rewrite.v1"
    journal = (tmp_path / "r" / "records.jsonl").read_text()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and (tmp_path / "r" / "records.jsonl").read_text() == journal
    other = CliRunner().invoke(app, args[:-1] + ["another text"])
    assert other.exit_code != 0 and "differs in: texts_sha256" in str(other.exception)


def test_several_ranks_without_a_rewrite_chunk_say_how_to_share_the_rewrites(tiny_lm, monkeypatch):
    """Under torchrun the held-out rewrites are one chunk by default (the recorded numbers), so one rank rewrites
    them all: the fit says so in one line, with the option that shares them; with --rewrite-chunk it says nothing."""
    from biaslab import distributed as D
    from biaslab.methods.srllm import method as M, training

    class Stop(Exception):
        pass

    def stop(*a, **kw):
        raise Stop

    monkeypatch.setattr(D, "world_size", lambda: 4)
    monkeypatch.setattr(training, "train_lora", stop)
    m = M.SRLLM()
    for cfg, expected in ((SRLLMConfig(), 1), (SRLLMConfig(rewrite_chunk=25), 0)):
        said = []
        with pytest.raises(Stop):
            m.fit(tiny_lm, m.load_task(None, cfg), cfg, seed=0, cache=None, log=lambda msg, **kw: said.append(msg))
        notes = [x for x in said if "no --rewrite-chunk" in x]
        assert len(notes) == expected and all("about the held-out pairs / 4" in x for x in notes)


# ---------------------------------------------------------------------------------------------- metrics
def _rec(biased, reference, rewrite, cosine=None):
    return {"id": biased, "biased": biased, "reference": reference, "rewrite": rewrite, "cosine": cosine}


def test_removal_copy_exact_by_hand():
    recs = [
        # reference removed {brilliant, famous}; rewrite drops "brilliant" only → 1 of 2
        _rec("the brilliant famous singer sang .", "the singer sang .", "the famous singer sang ."),
        # reference removed {she}; rewrite drops it → 1 of 1; equals the reference (case/space-insensitive)
        _rec("She sang .", "They sang .", "they  sang."),
        # reference removed nothing (a word added): contributes 0 of 0; rewrite copies the input
        _rec("he sang .", "he sang well .", "He sang."),
    ]
    assert rm.removed_words(recs[0]["biased"], recs[0]["reference"]) == {"brilliant", "famous"}
    assert rm.removal_counts(recs[0]) == (1, 2)
    assert rm.removal_rate(recs) == pytest.approx(2 / 3)
    assert rm.copy_rate(recs) == pytest.approx(1 / 3)
    assert rm.exact_match(recs) == pytest.approx(1 / 3)
    assert math.isnan(rm.removal_rate([recs[2]]))
    assert rm.content_preservation([_rec("a", "b", "c", 0.5), _rec("a", "b", "c", 1.0)]) == pytest.approx(0.75)


def test_chrf_bleu_sanity():
    same = [_rec("x y", "the cat sat on the mat .", "the cat sat on the mat .")]
    assert rm.chrf(same) == pytest.approx(100.0) and rm.bleu(same) == pytest.approx(100.0)
    none = [_rec("x y", "the cat sat on the mat .", "zzzz qqqq")]
    assert rm.chrf(none) < 5 and rm.bleu(none) == pytest.approx(0.0)
    partial = [_rec("x", "the cat sat on the mat .", "the cat sat on a rug .")]
    assert 0 < rm.chrf(partial) < 100
    # BLEU by hand: 4-gram precisions 6/8,4/7,2/6,1/5 ... not needed; check monotonicity instead
    better = [_rec("x", "the cat sat on the mat .", "the cat sat on the rug .")]
    assert rm.chrf(better) > rm.chrf(partial) and rm.bleu(better) > rm.bleu(partial)


def test_embedder_offline_cosines():
    from biaslab.methods.srllm.embedding import SentenceEmbedder

    emb = SentenceEmbedder()
    c = emb.cosines(["the cat sat on the mat .", "stock prices fell sharply"],
                    ["the cat sat on the mat .", "a kitten is playing piano"])
    assert c[0] == pytest.approx(1.0, abs=1e-4) and c[1] < 0.5


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_rewrite_empty_input(tmp_path):
    from typer.testing import CliRunner

    from biaslab.cli import app

    empty = tmp_path / "in.txt"
    empty.write_text("\n\n")
    r = CliRunner().invoke(app, ["rewrite", "--model", "smollm2-135m-instruct", "--input", str(empty)])
    assert r.exit_code != 0 and "no text" in str(r.exception or r.output).lower()


def test_micro_batches_add_up_to_the_batch_gradient(trained):
    """--micro-batch-size cuts a batch into parts whose token-weighted losses add up to the batch's mean loss: with
    no dropout the summed part gradients are the whole batch's (to float rounding), whatever the part size."""
    from biaslab.methods.srllm.training import batch_gradients

    lm = trained[0]
    train = [encode_example(lm, p.biased, p.neutral) for p in _pairs(5)]
    cfg = SRLLMConfig(r=4, alpha=8, dropout=0.0)
    flags = {n: p.requires_grad for n, p in lm.model.named_parameters()}
    layers = inject_lora(lm.model, cfg)
    try:
        with torch.no_grad():   # B = 0 at init would leave A's gradient 0: give B values
            for m in layers.values():
                m.lora_B["default"].weight.normal_(0, 0.1)
        params = [p for p in lm.model.parameters() if p.requires_grad]
        grads = {}
        for m in (None, 1, 2, 5):
            loss = batch_gradients(lm, train, list(range(5)), params, replace(cfg, micro_batch_size=m), step=0)
            grads[m] = (loss, [p.grad.clone() for p in params])
        for m in (1, 2, 5):
            assert grads[m][0] == pytest.approx(grads[None][0], rel=1e-6)
            assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(grads[m][1], grads[None][1]))
        assert any(g.abs().sum() > 0 for g in grads[1][1])
    finally:
        remove_lora(lm.model)
        for n, p in lm.model.named_parameters():
            p.requires_grad_(flags[n])


def test_micro_batch_size_is_checked():
    with pytest.raises(BiaslabError, match="--micro-batch-size must be between 1 and the batch size"):
        SRLLMConfig(batch_size=4, micro_batch_size=5)


def test_on_a_bf16_model_the_adapters_train_in_float32():
    """The GPU default dtype is bf16: the LoRA weights are float32 (peft's get_peft_model default), the step runs
    through the bf16 base layers, the outputs stay bf16, and Adam's step changes the adapter."""
    from biaslab.models import LanguageModel
    from conftest import make_tiny_llama

    model, tok = make_tiny_llama()
    lm = LanguageModel(model.to(torch.bfloat16), tok, spec="tiny-bf16")
    layers = inject_lora(lm.model, SRLLMConfig(r=4, alpha=8, dropout=0.0))
    lora = [p for n, p in lm.model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert all(p.dtype == torch.bfloat16 for n, p in lm.model.named_parameters() if "lora_" not in n)
    opt = torch.optim.AdamW(lora, lr=1e-2)
    for _ in range(2):
        batch = collate([encode_example(lm, p.biased, p.neutral) for p in _pairs(2)], lm.pad_id)
        loss, _ = completion_loss(lm, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert math.isfinite(loss.item()) and any(float(b.abs().max()) > 0 for _, b in lora_weights(layers).values())
    x = torch.zeros(1, 3, model.config.hidden_size, dtype=torch.bfloat16)
    name, layer = next(iter(layers.items()))
    assert layer(x).dtype == torch.bfloat16


def test_a_nan_training_loss_stops_before_the_step():
    """A diverging (or half-precision overflowing) training stops with one line instead of writing NaN adapters."""
    from biaslab.models import LanguageModel

    model, tok = make_tiny_llama()
    lm = LanguageModel(model, tok, spec="tiny-llama")
    hook = model.model.layers[0].mlp.register_forward_hook(lambda mod, args, out: out * float("nan"))
    try:
        with pytest.raises(BiaslabError, match=r"SR_LLM LoRA training: the training loss is nan at step 1 "
                                               r"\(model in float32\).*lower --lr$"):
            _trained_patch(lm)
    finally:
        hook.remove()
