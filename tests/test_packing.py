"""Prefix-sharing packing: the layout by hand, and packed scores = scores of each sequence run alone."""
import math

import numpy as np
import pytest
import torch

from biaslab.models import LanguageModel
from biaslab.models.packing import (TREE_ATTENTION, PackedRow, batch_rows, chains, flat_batches, pack, row_tensors,
                                    tree_attention_supported, tree_plan, use_tree_attention)

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


@pytest.mark.parametrize("tree", [True, False, "flex"])
@pytest.mark.parametrize("row_tokens", [512, 40])
def test_packed_scores_equal_unpacked(row_tokens, tree):
    kernel = {"tree_kernel": "flex"} if tree == "flex" else {}
    packed, alone = _lms(row_tokens=row_tokens, tree_attention=bool(tree), token_budget=96, **kernel)
    assert packed.scoring_mode() == ("tree" if tree else "dense")
    assert packed.describe().get("tree_kernel") == ("flex" if tree == "flex" else None)
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
    assert LanguageModel(model, tok, spec="tiny", tree_attention=False)._packing_ok()
    blind = MaskBlind(model, tok, spec="tiny", tree_attention=False)
    assert not blind._packing_ok() and blind.scoring_mode() == "padded"
    ref = LanguageModel(model, tok, spec="tiny", packing=False)
    prompts = [blind.render("one two"), blind.render("one three")]
    assert torch.allclose(torch.tensor(blind.next_token_logprobs(prompts, ["A"])),
                          torch.tensor(ref.next_token_logprobs(prompts, ["A"])), atol=1e-5)


# ------------------------------------------------------------------------------------------ tree attention
def _row(parent: list[int]) -> PackedRow:
    depth = []
    for p in parent:
        depth.append(0 if p < 0 else depth[p] + 1)
    return PackedRow(tokens=list(range(10, 10 + len(parent))), parent=parent, depth=depth)


def _ancestors(row: PackedRow, j: int) -> set[int]:
    out = {j}
    while row.parent[j] >= 0:
        j = row.parent[j]
        out.add(j)
    return out


def test_chains_by_hand():
    # 0-1-2 (a chain), 3 child of 1, 4-5 child of 0 (chain), 6 a second root
    row = _row([-1, 0, 1, 1, 0, 4, -1])
    assert chains(row) == [([], 0, 3), ([0, 1], 3, 4), ([0], 4, 6), ([], 6, 7)]
    assert flat_batches([5, 3, 4, 9, 1], token_budget=8, max_rows=8) == [[0, 1], [2], [3], [4]]
    assert flat_batches([1, 1, 1], token_budget=8, max_rows=2) == [[0, 1], [2]]


@pytest.mark.parametrize("max_query", [64, 2, 1])
def test_tree_plan_attends_exactly_to_ancestors(max_query):
    rows = [_row([-1, 0, 1, 1, 0, 4, 5, 5, -1, 8]), _row([-1, 0, 1, 2]), _row([-1])]
    ids, pos, offsets, plan = tree_plan(rows, torch.float32, "cpu", max_query=max_query)
    assert offsets == [0, 10, 14] and plan.n_nodes == 15 and ids.shape == pos.shape == (1, 15)
    assert pos[0].tolist() == [d for r in rows for d in r.depth]
    assert ids[0].tolist() == [t for r in rows for t in r.tokens]
    seen: dict[int, set[int]] = {}
    for bk in plan.buckets:
        n, Q = bk.q_index.shape
        ok = (bk.mask[:, 0] == 0)
        for slot in bk.src.tolist():
            b, q = divmod(slot, Q)
            node = int(bk.q_index[b, q])
            assert node not in seen  # every node is computed exactly once
            seen[node] = {int(bk.k_index[b, k]) for k in ok[b, q].nonzero().flatten().tolist()}
        assert (bk.dst == bk.q_index.reshape(-1)[bk.src]).all()
        assert ok.any(-1).all()  # no empty softmax row, padding slots included
    want = {off + j: {off + a for a in _ancestors(r, j)} for r, off in zip(rows, offsets) for j in range(len(r))}
    assert seen == want
    assert plan.pairs_needed == sum(len(v) for v in want.values()) <= plan.pairs_executed


def test_flex_subtree_ends_give_exactly_the_ancestor_mask(monkeypatch):
    """The flex kernel's mask k ≤ q < end[k] is the ancestor relation, on hand rows and on pack()'s layout of
    random sequences (sorted, so every row is in pre-order); the block mask is built from it."""
    from biaslab.errors import BiaslabError
    from biaslab.models.flex import ancestor_mask, default_tree_kernel, flex_plan, subtree_ends

    rng = np.random.default_rng(0)
    seqs = [[int(t) for t in rng.integers(1, 4, size=rng.integers(1, 7))] for _ in range(40)]
    for rows in ([_row([-1, 0, 1, 1, 0, 4, 5, 5, -1, 8]), _row([-1, 0, 1, 2]), _row([-1])], pack(seqs, 30).rows):
        ends = torch.from_numpy(subtree_ends([r.parent for r in rows]))
        offs = np.cumsum([0] + [len(r) for r in rows])
        want = torch.zeros(int(offs[-1]), int(offs[-1]), dtype=torch.bool)
        for r, off in zip(rows, offs):
            for j in range(len(r)):
                for a in _ancestors(r, j):
                    want[off + j, off + a] = True
        assert torch.equal(ancestor_mask(ends), want)
        ids, pos, offsets, plan = flex_plan(rows, "cpu")
        assert offsets == offs[:-1].tolist() and plan.n_nodes == ids.shape[1] == len(want)
        assert torch.equal(plan.ends, ends) and plan.block_mask.shape[-2:] == (len(want), len(want))
    monkeypatch.setenv("BIASLAB_TREE_KERNEL", "cuda-magic")
    with pytest.raises(BiaslabError, match="BIASLAB_TREE_KERNEL='cuda-magic': expected one of sdpa, flex"):
        default_tree_kernel()


def test_tree_attention_falls_back_to_dense_rows_when_the_model_drops_attention_kwargs():
    class KwargsBlind(LanguageModel):
        def logits_at(self, input_ids, attention_mask, position_ids, rows, cols, **model_kwargs):
            return super().logits_at(input_ids, attention_mask, position_ids, rows, cols)  # plan never arrives

    model, tok = make_tiny_llama(seed=3)
    blind = KwargsBlind(model, tok, spec="tiny")
    assert blind.scoring_mode() == "dense" and blind._mode_checked == {"tree": False, "dense": True}
    assert model.config._attn_implementation == "sdpa"  # restored after the failed check
    ref = LanguageModel(model, tok, spec="tiny", packing=False)
    prompts = [blind.render("one two"), blind.render("one three")]
    assert torch.allclose(torch.tensor(blind.next_token_logprobs(prompts, ["A"])),
                          torch.tensor(ref.next_token_logprobs(prompts, ["A"])), atol=1e-5)


def test_tree_attention_support_and_the_context_manager():
    from transformers import MistralConfig, MistralForCausalLM

    model, tok = make_tiny_llama(seed=3)
    assert tree_attention_supported(model)
    assert LanguageModel(model, tok, spec="tiny").describe()["scoring_mode"] == "tree"  # recorded in run manifests
    assert LanguageModel(model, tok, spec="tiny", packing=False).describe()["scoring_mode"] == "padded"
    with pytest.raises(ZeroDivisionError):
        with use_tree_attention(model):
            assert model.config._attn_implementation == TREE_ATTENTION
            1 / 0
    assert model.config._attn_implementation == "sdpa"
    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    windowed = MistralForCausalLM(cfg).eval()
    assert not tree_attention_supported(windowed)
    with pytest.raises(ValueError, match="tree_attention=True"):
        LanguageModel(windowed, tok, spec="tiny-mistral", tree_attention=True).scoring_mode()
