"""T5-style encoder-decoders (the CRISPR paper's Flan-T5 / T0 setting) on a tiny random T5 built in the test: the
scoring primitives, activation × gradient against finite differences at encoder, decoder and cross-attention sites,
and `biaslab mitigate crispr --model <T5 dir>` end to end with its export reloaded by plain transformers."""
import json

import pytest
import torch

from biaslab.errors import BiaslabError

from conftest import default_tokenizer


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    from transformers import T5Config, T5ForConditionalGeneration

    tok = default_tokenizer()
    cfg = T5Config(vocab_size=len(tok), d_model=16, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=8,
                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   decoder_start_token_id=tok.pad_token_id, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("t5") / "tiny-t5"
    T5ForConditionalGeneration(cfg).eval().save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def t5(t5_dir):
    from biaslab.models import load_model

    return load_model(str(t5_dir))


def test_scoring_primitives(t5):
    from biaslab.models.seq2seq import Seq2SeqLanguageModel

    assert isinstance(t5, Seq2SeqLanguageModel) and t5.describe()["scoring_mode"] == "seq2seq-padded"
    reqs = [("Question: is it good?", " yes"), ("Question: is it bad? A longer input here.", " no way"), ("Q", " maybe")]
    together = t5.loglikelihood(reqs)
    alone = [t5.loglikelihood([r])[0] for r in reqs]
    for a, b in zip(together, alone):   # padding and batching change nothing
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4) and a.n_tokens == b.n_tokens
        assert a.token_ids[-1] == t5.eos_id     # an option is scored up to its end: P(exactly this answer)
    assert sum(together[0].token_logprobs) == pytest.approx(together[0].logprob)
    first = t5.next_token_logprobs([reqs[0][0]], [" yes"])[0][0]   # the decoder's first position
    assert first == pytest.approx(together[0].token_logprobs[0], abs=1e-5)
    outs = t5.generate(["Question: is it good?", "hi"], max_new_tokens=4)
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)
    with pytest.raises(BiaslabError, match="encoder-decoder: it scores an answer given an input"):
        t5.loglikelihood([("", "A sentence alone.")])


def test_nan_at_a_scored_position_is_an_error_nan_in_the_padding_is_not(t5):
    """T5 overflows in float16 (NaN logits); only the positions that are scored count, not the decoder's padding."""
    seen = {}
    pre = t5.model.register_forward_pre_hook(lambda mod, args, kw: seen.update(kw), with_kwargs=True)

    def nan_where(pad_only):
        def hook(mod, args, out):
            mask = seen["decoder_attention_mask"].bool()
            return out.masked_fill(~mask[..., None] if pad_only else mask[..., None], float("nan"))
        return hook

    reqs = [("Question: is it good?", " yes"), ("Q", " no way at all, not ever")]   # one batch, unequal targets
    want = [r.logprob for r in t5.loglikelihood(reqs)]
    hook = t5.model.lm_head.register_forward_hook(nan_where(pad_only=True))
    try:
        assert [r.logprob for r in t5.loglikelihood(reqs)] == want
    finally:
        hook.remove()
    hook = t5.model.lm_head.register_forward_hook(nan_where(pad_only=False))
    try:
        with pytest.raises(BiaslabError, match="NaN log-probabilities"):
            t5.loglikelihood(reqs)
    finally:
        hook.remove()
        pre.remove()
    hook = t5.model.lm_head.register_forward_hook(lambda mod, args, out: out * float("nan"))
    try:
        with pytest.raises(BiaslabError, match="NaN next-token scores while generating"):
            t5.generate(["Question: is it good?"], max_new_tokens=2)
    finally:
        hook.remove()


def test_bf16_t5_logits_are_formed_in_float32(t5_dir):
    """Flan-T5 ships in bf16: its decoder's logits come out of the model's own forward, with the head's output
    formed in float32 there too (bf16-rounded logits tie options; models.lm.float32_head)."""
    from biaslab.models import load_model

    t5b = load_model(str(t5_dir), dtype="bfloat16")
    enc, dec = [t5b.encode("Question: is it good?")], [[t5b.start_id, 5, 9]]
    with torch.no_grad():
        logits, _, _ = t5b.decoder_forward(enc, dec)
        seen = {}
        hook = t5b.model.lm_head.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
        t5b.decoder_forward(enc, dec)   # again, recording the head input
        hook.remove()
    want = seen["x"].float() @ t5b.model.lm_head.weight.float().T
    assert logits.dtype == torch.float32 and torch.allclose(logits, want, atol=1e-4, rtol=1e-4)
    assert not torch.equal(logits, logits.bfloat16().float())


@pytest.mark.parametrize("site_name", ["encoder.block.1.layer.1.DenseReluDense.wi_0",
                                       "decoder.block.0.layer.0.SelfAttention.v",
                                       "decoder.block.1.layer.1.EncDecAttention.k",
                                       "decoder.block.1.layer.2.DenseReluDense.wo"])
def test_attribution_equals_finite_differences(t5_dir, site_name):
    """Continuation mode (an option's text in the decoder): activation × gradient per position equals a central
    finite difference of log P(continuation | input), at encoder, decoder and cross-attention sites."""
    from biaslab import attribution as A
    from biaslab.attribution_seq2seq import on_input_positions
    from biaslab.models import load_model

    lm = load_model(str(t5_dir))
    lm.model.double()   # (T5's RMS norm takes its variance in float32: differences below ~1e-6 are noise)
    ctx, cont = lm.split_context("the nurse told the doctor that", " she was late")
    seqs = [ctx + cont]
    site = next(s for s in A.resolve_sites(lm, "linear") if s.name == site_name)
    with A.attribution_pass(lm, [site], seqs, reduce="sum", continuation=[len(cont)]) as ap:
        g = torch.autograd.grad(ap.objective(None).sum(), [ap.hooks.s[site.name]])[0]
        per, h = ap.hooks.h[site.name] * g, ap.hooks.h[site.name].detach().clone()
    t_max = len(ctx) if on_input_positions(site_name) else len(cont)
    t = int(per[0, :t_max].abs().amax(-1).argmax())
    i = int(per[0, t].abs().argmax())

    def value(delta):
        def bump(m, a, out):
            out = out.clone()
            out[0, t, i] += delta
            return out
        hk = site.module.register_forward_hook(bump)
        try:
            with torch.no_grad():
                return float(sum(lm.loglikelihood([("the nurse told the doctor that", " she was late")])[0].token_logprobs))
        finally:
            hk.remove()

    eps = 1e-2
    fd = (value(eps) - value(-eps)) / (2 * eps) * float(h[0, t, i])
    assert abs(float(per[0, t, i])) > 1e-6
    assert fd == pytest.approx(float(per[0, t, i]), rel=1e-2, abs=1e-6)


def test_only_span_all_on_an_encoder_decoder(t5):
    from biaslab import attribution as A

    sites = A.resolve_sites(t5, "ffn")
    assert [s.name.split(".")[0] for s in sites] == ["encoder", "encoder", "decoder", "decoder"]
    with pytest.raises(BiaslabError, match="fixed by the architecture"):
        A.attribution_pass(t5, sites, [t5.encode("a b c")], span="answer")


def test_crispr_end_to_end_on_a_t5_directory(t5_dir, tmp_path):
    """`biaslab mitigate crispr --model <T5 dir>` (letter protocol: the decoder's first token is the answer;
    every nn.Linear of encoder and decoder), then `biaslab export` and plain transformers reloads it."""
    from transformers import T5ForConditionalGeneration
    from typer.testing import CliRunner

    from biaslab.cli import app
    from biaslab.models import load_model
    from biaslab.patches import load_patch

    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["mitigate", "crispr", "--model", str(t5_dir), "--task", "sst2", "--limit", "40",
                                 "--neurons", "5", "--sites", "linear", "--instructions", "1", "--dev-size", "4",
                                 "--control-seeds", "1", "--baselines", "cc,dc", "--retention-benchmarks", "retention",
                                 "--retention-limit", "4", "--n-boot", "20", "--out", str(out), "-q"])
    assert r.exit_code == 0, (r.output, r.exception)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["details"]["n_neurons"] == 5 and "after" in summary["metrics"]["accuracy"]
    assert {"cc", "dc"} <= set(summary["controls"]) and summary["retention"]
    patch = load_patch(out / "patch.safetensors")
    assert patch.n_neurons == 5 and all(k.startswith(("encoder.block.", "decoder.block.")) for k in patch.units)
    # option-loglik: options scored as decoder sequences under teacher forcing
    r = CliRunner().invoke(app, ["mitigate", "crispr", "--model", str(t5_dir), "--task", "sst2", "--limit", "30",
                                 "--neurons", "3", "--protocol", "option-loglik", "--instructions", "1",
                                 "--dev-size", "4", "--control-seeds", "0", "--no-retention", "--n-boot", "20",
                                 "--out", str(tmp_path / "run-ll"), "-q"])
    assert r.exit_code == 0, (r.output, r.exception)
    exp = tmp_path / "exported"
    r = CliRunner().invoke(app, ["export", "--model", str(t5_dir), "--patch", str(out / "patch.safetensors"),
                                 "--out", str(exp)])
    assert r.exit_code == 0, (r.output, r.exception)
    lm = load_model(str(t5_dir))
    ids = torch.tensor([lm.encode("Is this review positive?")])
    plain = T5ForConditionalGeneration.from_pretrained(exp).eval()
    with torch.no_grad(), patch.applied(lm):
        want = lm.model(input_ids=ids, decoder_input_ids=ids[:, :1]).logits
        got = plain(input_ids=ids, decoder_input_ids=ids[:, :1]).logits
    assert torch.allclose(want, got, atol=1e-5)


def test_verbs_that_need_a_decoder_only_model_say_so(t5_dir, tmp_path):
    from typer.testing import CliRunner

    from biaslab.cli import app

    for argv in (["mitigate", "fast"], ["mitigate", "srllm"], ["probe", "softprompt"]):
        r = CliRunner().invoke(app, argv + ["--model", str(t5_dir), "--out", str(tmp_path / argv[-1])])
        assert isinstance(r.exception, BiaslabError) and "needs a decoder-only model" in str(r.exception), argv
    r = CliRunner().invoke(app, ["mitigate", "crispr", "--model", str(t5_dir), "--task", "sst2", "--neurons", "2",
                                 "--out", str(tmp_path / "c")])   # default retention includes CrowS-Pairs
    assert isinstance(r.exception, BiaslabError) and "--retention-benchmarks retention" in str(r.exception)
