"""Prefix-sharing packing: the layout by hand, and packed scores = scores of each sequence run alone."""
import math

import numpy as np
import pytest
import torch

from biaslab.models import LanguageModel
from biaslab.models.packing import batch_rows, pack, row_tensors

from conftest import make_tiny_llama


def test_pack_shares_prefixes_and_duplicates():
    seqs = [[1, 2, 3], [1, 2, 4], [1, 2, 3], [5], [1, 9]]
    p = pack(seqs, row_tokens=100)
    assert len(p.rows) == 1
    row = p.rows[0]
    # sorted: [1,2,3]#0, [1,2,3]#2, [1,2,4]#1, [1,9]#4, [5]#3 → nodes 1,2,3,4,9,5
    assert row.tokens == [1, 2, 3, 4, 9, 5]
    assert row.parent == [-1, 0, 1, 1, 0, -1]
    assert row.depth == [0, 1, 2, 2, 1, 0]
    assert p.nodes_of[0] == p.nodes_of[2] == [0, 1, 2]
    assert p.nodes_of[1] == [0, 1, 3] and p.nodes_of[4] == [0, 4] and p.nodes_of[3] == [5]
    for i, s in enumerate(seqs):
        assert [row.tokens[n] for n in p.nodes_of[i]] == s
        assert [row.depth[n] for n in p.nodes_of[i]] == list(range(len(s)))


def test_pack_respects_row_budget_and_lone_long_sequences():
    seqs = [[1, 2, 3, 4], [1, 2, 3, 5], [7] * 10, [8, 1], [8, 2]]
    p = pack(seqs, row_tokens=5)
    for r in p.rows:
        assert len(r) <= 5 or len(r.members) == 1
    assert p.rows[p.row_of[2]].members == [2] and len(p.rows[p.row_of[2]]) == 10
    assert p.row_of[0] == p.row_of[1] and len(p.rows[p.row_of[0]]) == 5  # 1,2,3,4 + 5 shared
    assert sorted(i for r in p.rows for i in r.members) == list(range(5))
    with pytest.raises(ValueError):
        pack([[1], []])


def test_row_tensors_mask_is_ancestors_and_self():
    p = pack([[1, 2, 3], [1, 2, 4], [6]], row_tokens=100)
    ids, mask, pos = row_tensors(p.rows + [pack([[9, 9]]).rows[0]], pad_id=0, dtype=torch.float32, device="cpu")
    allowed = (mask[:, 0] == 0).numpy()
    want = np.array([[1, 0, 0, 0, 0],   # node 0: token 1
                     [1, 1, 0, 0, 0],   # node 1: token 2
                     [1, 1, 1, 0, 0],   # node 2: token 3
                     [1, 1, 0, 1, 0],   # node 3: token 4 (sibling of 3)
                     [0, 0, 0, 0, 1]],  # node 4: token 6 (its own root)
                    dtype=bool)
    assert (allowed[0] == want).all()
    assert pos[0].tolist() == [0, 1, 2, 2, 0]
    # the second row is shorter: its padding attends to itself only, positions 0
    assert ids[1].tolist() == [9, 9, 0, 0, 0] and pos[1].tolist() == [0, 1, 0, 0, 0]
    assert (allowed[1] == np.array([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0],
                                    [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]], dtype=bool)).all()
    assert batch_rows([5, 2, 9], token_budget=10, max_batch=8) == [[2], [0, 1]]  # 9 alone; 2 rows × width 5 = 10
    assert batch_rows([5, 2, 9], token_budget=9, max_batch=8) == [[2], [0], [1]]


def _lms(**kw):
    model, tok = make_tiny_llama(seed=3)
    return (LanguageModel(model, tok, spec="tiny", packing=True, **kw),
            LanguageModel(model, tok, spec="tiny", packing=False, max_batch=1))


@pytest.mark.parametrize("row_tokens", [512, 40])
def test_packed_scores_equal_unpacked(row_tokens):
    packed, alone = _lms(row_tokens=row_tokens)
    items = ["Context: the doctor and the nurse met.", "Context: the doctor and the nurse met.",
             "Context: the doctor left early.", "Something else entirely, and rather longer than the others."]
    prompts = [packed.render(f"{c}\nInstruction {k}: pick A or B.") for c in items for k in range(3)]
    a = torch.tensor(packed.next_token_logprobs(prompts, ["A", "B", " the"]))
    b = torch.tensor(alone.next_token_logprobs(prompts, ["A", "B", " the"]))
    assert torch.allclose(a, b, atol=1e-4)
    reqs = [(p, x) for p in prompts[:4] for x in ["A", "B. The nurse", "C"]] + [("", "A sentence."), ("", "A sentence!")]
    la, lb = packed.loglikelihood(reqs), alone.loglikelihood(reqs)
    for x, y in zip(la, lb):
        assert x.token_ids == y.token_ids and x.greedy == y.greedy
        assert math.isclose(x.logprob, y.logprob, abs_tol=1e-4)
        assert np.allclose(x.token_logprobs, y.token_logprobs, atol=1e-4)


def test_packing_falls_back_when_the_model_ignores_custom_masks():
    class MaskBlind(LanguageModel):
        def logits_at(self, input_ids, attention_mask, position_ids, rows, cols):
            if attention_mask is not None and attention_mask.dim() == 4:
                attention_mask = None  # a model that silently drops a custom mask
            return super().logits_at(input_ids, attention_mask, position_ids, rows, cols)

    model, tok = make_tiny_llama(seed=3)
    assert LanguageModel(model, tok, spec="tiny")._packing_ok()
    blind = MaskBlind(model, tok, spec="tiny")
    assert not blind._packing_ok()
    ref = LanguageModel(model, tok, spec="tiny", packing=False)
    prompts = [blind.render("one two"), blind.render("one three")]
    assert torch.allclose(torch.tensor(blind.next_token_logprobs(prompts, ["A"])),
                          torch.tensor(ref.next_token_logprobs(prompts, ["A"])), atol=1e-5)
