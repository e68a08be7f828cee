"""Task protocols (biaslab.tasks): the cloze protocol's prompt, its plain-text scoring, and its errors."""
from __future__ import annotations

import pytest
import torch

from biaslab.errors import BiaslabError, UnknownNameError
from biaslab.methods import crispr as C
from biaslab.tasks import (DEFAULT_CLOZE, INSTRUCTIONS, MCItem, answer_token_ids, load_sst2, prompt_text, protocol_id,
                           render_mc, score_mc)


def _sst(text="a warm, funny film", gold=1):
    return MCItem(id="s", options=("negative", "positive"), gold=gold, context=text, question="Sentiment?",
                  cloze="Review: {context}\n{instruction}\nSentiment:")


def test_protocol_ids_are_versioned():
    assert protocol_id("letter") == "tasks.letter.v2"
    assert protocol_id("option-loglik") == "tasks.option-loglik.v2"
    assert protocol_id("cloze") == "tasks.cloze.v1"
    with pytest.raises(UnknownNameError, match="Did you mean 'cloze'"):
        protocol_id("clozee")


def test_cloze_prompt_is_plain_text_item_then_instruction(tiny_lm):
    it = _sst()
    want = f"Review: a warm, funny film\n{INSTRUCTIONS[3]}\nSentiment:"
    assert render_mc(it, INSTRUCTIONS[3], protocol="cloze") == want
    assert tiny_lm.use_chat_template
    assert prompt_text(tiny_lm, it, 3, protocol="cloze") == want          # never wrapped in the chat template
    assert "<|im_start|>" in prompt_text(tiny_lm, it, 3, protocol="letter")
    plain = MCItem(id="p", options=("yes", "no"), gold=0, context="C.", question="Q?")
    assert render_mc(plain, "Do it.", protocol="cloze") == DEFAULT_CLOZE.format(context="C.", question="Q?",
                                                                               instruction="Do it.")
    # the vendored SST-2 items carry their cloze form
    assert render_mc(load_sst2("dev")[0], "I.", protocol="cloze").endswith("\nI.\nSentiment:")


def test_cloze_scores_equal_a_hand_forward_without_chat_template(tiny_lm):
    items = [_sst("a warm, funny film", 1), _sst("a dull, long mess", 0)]
    recs = score_mc(tiny_lm, items, [0, 2], protocol="cloze")
    assert tiny_lm.use_chat_template  # restored after scoring
    tok = tiny_lm.tokenizer
    cand = [tok(" negative", add_special_tokens=False).input_ids[0], tok(" positive", add_special_tokens=False).input_ids[0]]
    assert answer_token_ids(tiny_lm, items[0], "cloze") == cand
    for r, (it, i) in zip(recs, [(it, i) for it in items for i in (0, 2)]):
        text = f"Review: {it.context}\n{INSTRUCTIONS[i]}\nSentiment:"
        ids = torch.tensor([tok(text, add_special_tokens=True).input_ids])
        with torch.no_grad():
            lp = torch.log_softmax(tiny_lm.model(input_ids=ids).logits[0, -1].float(), -1)
        assert r["logprobs"] == pytest.approx([float(lp[c]) for c in cand], abs=1e-4)
        assert r["pred"] == int(lp[cand[1]] > lp[cand[0]]) and r["gold"] == it.gold and r["instruction"] == i


def test_cloze_refuses_options_with_the_same_first_token(tiny_lm):
    it = MCItem(id="bbq-7", options=("The grandfather", "The grandson", "Unknown"), gold=2, context="c", question="q")
    with pytest.raises(BiaslabError, match=r"bbq-7.*coincide.*'letter'"):
        score_mc(tiny_lm, [it], [0], protocol="cloze")
    with pytest.raises(UnknownNameError, match="multiple-choice protocol"):
        score_mc(tiny_lm, [it], [0], protocol="greedy")


def test_plain_text_restores_the_chat_template_setting_on_error(tiny_lm):
    with pytest.raises(RuntimeError):
        with tiny_lm.plain_text():
            assert not tiny_lm.use_chat_template
            raise RuntimeError("boom")
    assert tiny_lm.use_chat_template


def test_crispr_attribution_under_cloze(tiny_lm):
    items = [_sst(f"review {k}", k % 2) for k in range(4)]
    cfg = C.CrisprConfig(protocol="cloze", neurons=3, instructions=2).validate()
    sc, st = C.bias_scores(tiny_lm, items, [0, 1], cfg)
    assert st.n_instances == 8 and all(torch.isfinite(v).all() for v in sc.values())
    # the records CRISPR's search and evaluation score agree with the attribution pass's own option log-probs
    recs = score_mc(tiny_lm, items, [0, 1], protocol="cloze")
    assert st.dev_accuracy == pytest.approx(sum(r["correct"] for r in recs) / len(recs))
    with pytest.raises(BiaslabError, match="'letter', 'cloze', 'option-loglik'"):
        C.CrisprConfig(protocol="greedy", neurons=3).validate()


def test_crispr_attribution_under_option_loglik(tiny_lm):
    """Options whose first words coincide (as in BBQ) are attributed as whole continuations: the biased option
    is the most probable wrong one by the engine's option log-likelihoods, and the scores are finite."""
    items = [MCItem(id=f"b{k}", options=("The old man", "The young man", "Can't be determined"), gold=k % 3,
                    context=f"An old man and a young man met {k}.", question="Who forgot?") for k in range(5)]
    cfg = C.CrisprConfig(protocol="option-loglik", neurons=3, instructions=2).validate()
    sc, st = C.bias_scores(tiny_lm, items, [0, 1], cfg)
    assert st.n_instances == 10 and all(torch.isfinite(v).all() and v.abs().sum() > 0 for v in sc.values())
    recs = score_mc(tiny_lm, items, [0, 1], protocol="option-loglik")
    assert st.dev_accuracy == pytest.approx(sum(r["correct"] for r in recs) / len(recs))
    wrong = [max((c for c in range(3) if c != r["gold"]), key=lambda c: (r["logprobs"][c], -c)) for r in recs]
    assert dict(st.biased_option_counts) == {c: wrong.count(c) for c in set(wrong)}
    # batching does not change the scores
    sc2, _ = C.bias_scores(tiny_lm, items, [0, 1], C.CrisprConfig(protocol="option-loglik", neurons=3, instructions=2,
                                                                  token_budget=60).validate())
    assert all(torch.allclose(sc[n], sc2[n], atol=1e-5) for n in sc)


@pytest.mark.integration
def test_real_model_has_sst2_skill_under_cloze_but_not_letter(real_lm):
    """The reason the cloze protocol exists (experiments/crispr/sst2_prompt_forms.py): on SST-2 dev-file items the
    default model is near chance under the chat-formatted letter prompt and well above it in cloze form."""
    import random

    items = load_sst2("dev")
    random.Random(0).shuffle(items)
    items = items[:40]
    acc = {p: sum(r["correct"] for r in score_mc(real_lm, items, [0], protocol=p)) / len(items)
           for p in ("letter", "cloze")}
    assert acc["cloze"] >= 0.6 and acc["cloze"] - acc["letter"] >= 0.1, acc
    assert real_lm.use_chat_template


def test_a_bad_cloze_template_is_a_clear_error():
    it = MCItem(id="x1", options=("no", "yes"), gold=0, context="c", cloze="Text: {contxt}\n{instruction}\nAnswer:")
    with pytest.raises(BiaslabError, match=r"x1.*cloze template.*\{context\}, \{question\} and \{instruction\}"):
        render_mc(it, "I.", protocol="cloze")


# ---------------------------------------------------------------- user task files (mc:PATH)
def _write_jsonl(path, rows):
    import json

    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_mc_task_file_loads_header_items_gold_by_text_and_hash_name(tiny_lm, tmp_path):
    from biaslab.task_specs import load_task

    p = _write_jsonl(tmp_path / "jobs.jsonl", [
        {"name": "jobs", "instructions": ["Pick the right answer.", "Choose the correct option."]},
        {"context": "The nurse said he was late.", "question": "Who was late?", "options": ["the nurse", "nobody"],
         "gold": "the nurse", "group": "male"},
        "",
        {"id": "q2", "question": "Who fixed the car?", "options": ["a", "b", "c"], "gold": 2, "meta": {"src": "x"}},
    ])
    name, items = load_task(f"mc:{p}")
    assert name.startswith("mc:jobs@") and len(name.split("@")[1]) == 12   # the header's name
    assert [it.id for it in items] == ["jobs-2", "q2"]            # default id = file stem + line number
    assert items[0].gold == 0 and items[0].meta == {"group": "male"} and items[1].gold == 2
    assert items[1].meta == {"src": "x"}
    assert items[0].instructions == ("Pick the right answer.", "Choose the correct option.")
    text = prompt_text(tiny_lm, items[0], 1)
    assert "Choose the correct option." in text and not any(g in text for g in INSTRUCTIONS)
    # the name follows the content, so an edited file never reuses a cached attribution
    p.write_text(p.read_text().replace("late", "early"), encoding="utf-8")
    assert load_task(f"mc:{p}")[0] != name


def test_mc_task_file_without_header_uses_the_generic_instructions(tiny_lm, tmp_path):
    from biaslab.tasks import load_mc_file, task_instruction_count

    p = _write_jsonl(tmp_path / "t.jsonl", [{"context": "c", "options": ["x", "y"], "gold": 1}])
    _, items = load_mc_file(p)
    assert items[0].instructions == () and task_instruction_count(items) == len(INSTRUCTIONS)
    assert INSTRUCTIONS[4] in prompt_text(tiny_lm, items[0], 4)
    p2 = _write_jsonl(tmp_path / "h.jsonl", [{"instructions": ["Only one."]}, {"context": "c", "options": ["x", "y"], "gold": 0}])
    _, items2 = load_mc_file(p2)
    with pytest.raises(BiaslabError, match="instruction 1 requested, but its task has 1"):
        prompt_text(tiny_lm, items2[0], 1)
    # more than the ten generic instructions: all of them usable
    many = [f"Instruction number {k}." for k in range(12)]
    _, items3 = load_mc_file(_write_jsonl(tmp_path / "m.jsonl", [{"instructions": many},
                                                                 {"context": "c", "options": ["x", "y"], "gold": 0}]))
    assert task_instruction_count(items3) == 12 and "Instruction number 11." in prompt_text(tiny_lm, items3[0], 11)
    C.check_task_items(items3, "m", 12)


@pytest.mark.parametrize("rows,line,field,msg", [
    ([{"context": "c", "options": ["x"], "gold": 0}], 1, "options", "at least 2 options"),
    ([{"context": "c", "options": ["x", "x"], "gold": 0}], 1, "options", "distinct"),
    ([{"context": "c", "options": ["x", "y"], "gold": 2}], 1, "gold", "index 0-1"),
    ([{"context": "c", "options": ["x", "y"], "gold": "z"}], 1, "gold", "not one of the options"),
    ([{"context": "c", "options": ["x", "y"], "gold": True}], 1, "gold", "index 0-1"),
    ([{"context": "c", "options": ["x", "y"]}], 1, "gold", "missing"),
    ([{"context": "c", "option": ["x", "y"], "gold": 0}], 1, "option", "did you mean 'options'"),
    ([{"options": ["x", "y"], "gold": 0}], 1, "context", "non-empty context or question"),
    ([{"context": 3, "options": ["x", "y"], "gold": 0}], 1, "context", "expected a string"),
    ([{"context": "c", "options": ["x", "y"], "gold": 0, "cloze": "{review}"}], 1, "cloze", "not a valid template"),
    ([{"context": "c", "options": ["x", "y"], "gold": 0, "meta": {"pred": 1}}], 1, "meta", "reserved"),
    ([{"context": "c", "options": ["x", "y"], "gold": 0, "meta": {"control_seed": 1}}], 1, "meta", "reserved"),
    ([{"id": "a", "context": "c", "options": ["x", "y"], "gold": 0},
      {"id": "a", "context": "d", "options": ["x", "y"], "gold": 1}], 2, "id", "repeats the id of line 1"),
    ([{"instructions": []}, {"context": "c", "options": ["x", "y"], "gold": 0}], 1, "instructions", "non-empty list"),
    ([{"instructions": ["a", "a"]}, {"context": "c", "options": ["x", "y"], "gold": 0}], 1, "instructions", "distinct"),
    ([{"instructions": ["a"], "title": "t"}, {"context": "c", "options": ["x", "y"], "gold": 0}], 1, "title", "header"),
    ([{"context": "c", "options": ["x", "y"], "gold": 0}, {"instructions": ["a"], "context": "c", "options": ["x", "y"],
                                                          "gold": 0}], 2, "instructions", "only the first line"),
    (["{not json"], 1, None, "not valid JSON"),
    (["[1, 2]"], 1, None, "expected a JSON object"),
])
def test_mc_task_file_errors_name_file_line_and_field(tmp_path, rows, line, field, msg):
    from biaslab.errors import DataError
    from biaslab.tasks import load_mc_file

    p = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=msg) as e:
        load_mc_file(p)
    assert e.value.path == str(p) and e.value.line == line and e.value.field == field


def test_mc_task_file_whole_file_errors(tmp_path):
    from biaslab.errors import DataError
    from biaslab.task_specs import load_task
    from biaslab.tasks import load_mc_file

    with pytest.raises(DataError, match="task file not found"):
        load_mc_file(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="no items"):
        load_mc_file(_write_jsonl(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(DataError, match="header but no items"):
        load_mc_file(_write_jsonl(tmp_path / "h.jsonl", [{"instructions": ["a"]}]))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"context": "caf\xe9", "options": ["x", "y"], "gold": 0}\n')
    with pytest.raises(DataError, match="not UTF-8") as e:
        load_mc_file(tmp_path / "latin1.jsonl")
    assert e.value.line == 1
    with pytest.raises(BiaslabError, match="needs the path"):
        load_task("mc:")
    with pytest.raises(UnknownNameError, match="mc:PATH"):
        load_task("csv:x")
