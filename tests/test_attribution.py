"""Attribution engine: activation × gradient vs finite differences, IG completeness, padding independence."""
from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from biaslab import attribution as A
from biaslab.errors import BiaslabError, UnknownNameError
from biaslab.models import LanguageModel

from conftest import make_tiny_llama


@pytest.fixture(scope="module")
def lm64():
    """A tiny float64 Llama with larger weights (non-trivial gradients) for exact derivative checks."""
    model, tok = make_tiny_llama(seed=1)
    model = model.double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj" in name:
                p.mul_(5)
    return LanguageModel(model, tok, spec="tiny64")


def _seqs(lm):
    texts = ["Is this review positive? a gorgeous, witty film", "the cat sat on the mat and then it slept all day long",
             "no"]
    return [lm.encode(lm.render(t)) for t in texts]


def _targets(lm):
    return [lm.candidate_token_id(c) for c in ("A", "B", "C")]


@contextmanager
def _bumped(site, r, t, i, delta):
    """Within the block, the site's activation at (row r, position t, unit i) is raised by ``delta``."""
    def pre(module, args):
        x = args[0].clone()
        x[r, t, i] += delta
        return (x,) + tuple(args[1:])
    h = site.module.register_forward_pre_hook(pre)
    try:
        yield
    finally:
        h.remove()


def _perturbed_objective(lm, site, seqs, targets, r, t, i, delta):
    with _bumped(site, r, t, i, delta):
        return float(A.objective_values(lm, seqs, targets)[r])


def test_activation_x_gradient_matches_finite_difference(lm64):
    seqs, tg = _seqs(lm64), _targets(lm64)
    sites = A.resolve_sites(lm64, "ffn")
    with A.AttributionPass(lm64, sites, seqs, reduce="sum") as ap:
        names = [s.name for s in sites]
        grads = torch.autograd.grad(ap.objective(tg).sum(), [ap.hooks.s[n] for n in names])
        per = {n: ap.hooks.h[n] * g for n, g in zip(names, grads)}
        hs = {n: ap.hooks.h[n] for n in names}
    checked = 0
    for j, site in enumerate(sites):
        # an early position only reaches the answer through later layers' attention: checked on the first layer
        positions = [(0, len(seqs[0]) - 1), (1, len(seqs[1]) - 1)] + ([(0, 4)] if j == 0 else [])
        for r, t in positions:
            i = int(per[site.name][r, t].abs().argmax())
            a = float(per[site.name][r, t, i])
            eps = 1e-2
            fd = (_perturbed_objective(lm64, site, seqs, tg, r, t, i, eps)
                  - _perturbed_objective(lm64, site, seqs, tg, r, t, i, -eps)) / (2 * eps) * float(hs[site.name][r, t, i])
            assert abs(a) > 1e-6
            assert fd == pytest.approx(a, rel=1e-2, abs=1e-7)
            checked += 1
    assert checked == 2 * len(sites) + 1


def test_reduced_scores_are_max_and_mean_of_positions(lm64):
    seqs, tg = _seqs(lm64), _targets(lm64)
    out = {}
    for red in ("max", "mean", "sum"):
        out[red] = A.activation_x_gradient(lm64, seqs, tg, sites="ffn", reduce=red)
    name = next(iter(out["max"]))
    # mean × n_positions == sum, and max ≥ mean
    for r, s in enumerate(seqs):
        assert torch.allclose(out["mean"][name][r] * len(s), out["sum"][name][r], atol=1e-9)
        assert (out["max"][name][r] >= out["mean"][name][r] - 1e-12).all()
    # the answer span is a single position: its max, mean and sum agree
    ans = {red: A.activation_x_gradient(lm64, seqs, tg, sites="ffn", reduce=red, span="answer") for red in ("max", "sum")}
    assert torch.allclose(ans["max"][name], ans["sum"][name])


def test_padding_never_contributes_batched_equals_single(lm64):
    seqs, tg = _seqs(lm64), _targets(lm64)
    assert len({len(s) for s in seqs}) == 3  # padding happens in the batch
    for red in ("max", "mean"):
        batched = A.activation_x_gradient(lm64, seqs, tg, sites="ffn", reduce=red, token_budget=10_000)
        for r in range(len(seqs)):
            single = A.activation_x_gradient(lm64, [seqs[r]], [tg[r]], sites="ffn", reduce=red)
            for n in batched:
                assert torch.allclose(batched[n][r], single[n][0], rtol=1e-6, atol=1e-9), (red, r, n)


def test_linear_sites_and_grad_state_restored(lm64):
    seqs, tg = _seqs(lm64)[:2], _targets(lm64)[:2]
    flags = [p.requires_grad for p in lm64.model.parameters()]
    out = A.activation_x_gradient(lm64, seqs, tg, sites="linear")
    assert [p.requires_grad for p in lm64.model.parameters()] == flags
    sites = A.resolve_sites(lm64, "linear")
    assert set(out) == {s.name for s in sites} and len(sites) == 7 * 2
    assert all(out[s.name].shape == (2, s.n_units) for s in sites)
    assert all(torch.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize("mode", ["joint", "layer"])
def test_integrated_gradients_completeness(lm64, mode):
    seqs, tg = _seqs(lm64)[:2], _targets(lm64)[:2]
    sites = A.resolve_sites(lm64, "ffn")
    ig = A.integrated_gradients(lm64, seqs, tg, sites=sites, steps=16, mode=mode, reduce="sum")
    f1 = A.objective_values(lm64, seqs, tg)
    if mode == "joint":
        f0 = A.objective_values(lm64, seqs, tg, gates={s.name: 0.0 for s in sites})
        total = sum(v.double().sum(1) for v in ig.values())
        assert torch.allclose(total, f1 - f0, rtol=0.02, atol=2e-4), (total, f1 - f0)
        assert (f1 - f0).abs().max() > 1e-2
    else:
        for s in sites:
            f0 = A.objective_values(lm64, seqs, tg, gates={s.name: 0.0})
            assert torch.allclose(ig[s.name].double().sum(1), f1 - f0, rtol=0.02, atol=2e-4), (s.name, ig[s.name].sum(1), f1 - f0)


def test_rank_neurons_deterministic_and_global():
    scores = {"a": torch.tensor([0.1, 0.9, 0.5]), "b": torch.tensor([0.7, 0.9])}
    r = A.rank_neurons(scores)
    assert [(n, u) for n, u, _ in r] == [("a", 1), ("b", 1), ("b", 0), ("a", 2), ("a", 0)]
    assert len(A.rank_neurons(scores, 2)) == 2
    assert A.spearman(torch.tensor([1., 2, 3]), torch.tensor([10., 20, 30])) == pytest.approx(1.0)
    with pytest.raises(BiaslabError, match=r"NaN at 1 of 2 sites \(first: b\).*--dtype float32"):
        A.rank_neurons({"a": torch.tensor([0.1, 0.9]), "b": torch.tensor([float("nan"), 0.2])})


def test_bad_options_are_clear_errors(tiny_lm):
    seqs = [tiny_lm.encode("hello")]
    with pytest.raises(UnknownNameError, match="site kind"):
        A.activation_x_gradient(tiny_lm, seqs, [1], sites="attention-heads")
    with pytest.raises(UnknownNameError, match="reduction"):
        A.activation_x_gradient(tiny_lm, seqs, [1], reduce="median")
    with pytest.raises(UnknownNameError, match="span"):
        A.activation_x_gradient(tiny_lm, seqs, [1], span="everything")
    with pytest.raises(BiaslabError, match="targets"):
        A.activation_x_gradient(tiny_lm, seqs, [1, 2])
    with pytest.raises(BiaslabError, match="step"):
        A.integrated_gradients(tiny_lm, seqs, [1], steps=0)


def test_continuation_mode_objective_is_the_continuation_loglik_and_matches_finite_differences(lm64):
    """Continuation mode (multi-token options): the objective equals the engine's log-likelihood of the
    continuation, and its activation × gradient equals a finite-difference estimate."""
    pairs = [("Who was it? The answer:", " The old man"), ("Pick one:", " Cannot be determined here")]
    parts = [lm64.split_context(c, x) for c, x in pairs]
    seqs, cont = [a + b for a, b in parts], [len(b) for _, b in parts]
    ll = lm64.loglikelihood(pairs)
    sites = A.resolve_sites(lm64, "ffn")
    with A.AttributionPass(lm64, sites, seqs, reduce="sum", continuation=cont) as ap:
        F = ap.objective()
        assert torch.allclose(F.detach(), torch.tensor([s.logprob for s in ll], dtype=F.dtype), atol=1e-8)
        with pytest.raises(BiaslabError, match="continuation mode"):
            ap.objective([1, 2])
        site = sites[0]
        g = torch.autograd.grad(F.sum(), [ap.hooks.s[site.name]])[0]
        per = ap.hooks.h[site.name] * g
        h = ap.hooks.h[site.name]
    r, t = 1, len(seqs[1]) - 3  # a position inside the continuation
    i = int(per[r, t].abs().argmax())

    def perturbed(delta):
        with _bumped(site, r, t, i, delta), A.AttributionPass(lm64, sites, seqs, continuation=cont) as p2:
            return float(p2.objective()[r].detach())

    eps = 1e-2
    fd = (perturbed(eps) - perturbed(-eps)) / (2 * eps) * float(h[r, t, i])
    assert abs(float(per[r, t, i])) > 1e-6 and fd == pytest.approx(float(per[r, t, i]), rel=1e-2, abs=1e-7)
    with pytest.raises(BiaslabError, match="continuation length"):
        A.AttributionPass(lm64, sites, seqs, continuation=[len(seqs[0]), 1])
