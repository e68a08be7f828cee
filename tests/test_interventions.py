"""The intervention layer: each hook kind does what it says, every hook is gone on exit (also on an error), and
parameter overwrites are validated before any weight is touched and restored bit for bit."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from biaslab.errors import BiaslabError
from biaslab.interventions import Hooks, Intervention, overwrite


class Pair(nn.Module):  # returns a tuple, as decoder layers do
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return (self.lin(x), "aux")


def _mod():
    torch.manual_seed(0)
    return Pair()


def test_each_kind_on_a_tuple_output_module():
    m, x = _mod(), torch.randn(2, 3)
    base = m(x)[0]
    seen = []
    with Hooks([Intervention("cap-in", m, "capture_input", lambda t: seen.append(t.clone())),
                Intervention("cap-out", m, "capture_output", lambda t: seen.append(t.clone()))]):
        out = m(x)
    assert torch.equal(seen[0], x) and torch.equal(seen[1], base) and out[1] == "aux" and torch.equal(out[0], base)
    with Hooks([Intervention("edit", m, "edit_input", lambda t: t * 0)]):
        assert torch.equal(m(x)[0], m.lin.bias.expand(2, 3))
    with Hooks([Intervention("add", m, "add_output", lambda inp, o: torch.ones_like(o))]):
        assert torch.allclose(m(x)[0], base + 1) and m(x)[1] == "aux"
    with Hooks([Intervention("rep", m, "replace_output", lambda o: -o)]):
        assert torch.equal(m(x)[0], -base)
    assert not m._forward_hooks and not m._forward_pre_hooks
    assert torch.equal(m(x)[0], base)


def test_hooks_are_removed_when_the_block_raises_and_unknown_kinds_are_refused():
    m, x = _mod(), torch.randn(1, 3)
    with pytest.raises(RuntimeError):
        with Hooks([Intervention("boom", m, "replace_output", lambda o: o)]):
            raise RuntimeError("stop")
    assert not m._forward_hooks
    with pytest.raises(BiaslabError, match="unknown kind 'gate'"):
        Intervention("g", m, "gate", lambda o: o)


def test_overwrite_validates_first_and_restores_bit_for_bit():
    m = _mod()
    w0, b0 = m.lin.weight.clone(), m.lin.bias.clone()
    undo = overwrite([(m.lin.weight, (slice(None), torch.tensor([0, 2])), 0.0), (m.lin.bias, ..., torch.ones(3))])
    assert not m.lin.weight[:, [0, 2]].any() and torch.equal(m.lin.bias, torch.ones(3))
    undo()
    assert torch.equal(m.lin.weight, w0) and torch.equal(m.lin.bias, b0)
    # a bad change (index out of range) is refused before the good one before it is written
    with pytest.raises(BiaslabError, match="cannot write"):
        overwrite([(m.lin.bias, ..., 5.0), (m.lin.weight, (slice(None), torch.tensor([7])), 0.0)])
    assert torch.equal(m.lin.weight, w0) and torch.equal(m.lin.bias, b0)
