"""Model specs: clear errors, fingerprints, device/dtype choice (no model is downloaded)."""
import pytest
import torch

from biaslab.errors import BiaslabError, UnknownNameError
from biaslab.models.loading import pick_dtype, resolve_spec, weights_fingerprint

from conftest import make_tiny_llama


def test_resolve_specs(tmp_path):
    assert resolve_spec("smollm2-135m-instruct") == ("embedded", "smollm2-135m-instruct")
    assert resolve_spec("org/model")[0] == "hub"
    with pytest.raises(BiaslabError, match="no config.json"):
        resolve_spec(str(tmp_path))
    with pytest.raises(BiaslabError, match="GGUF file not found"):
        resolve_spec(str(tmp_path / "x.gguf"))
    with pytest.raises(UnknownNameError, match="Did you mean"):
        resolve_spec("smollm2-135m")


def test_local_hf_dir_roundtrip_keeps_fingerprint(tmp_path, capfd, monkeypatch):
    from transformers.utils import logging as hf_logging

    from biaslab import progress
    from biaslab.models import load_model

    model, tok = make_tiny_llama(seed=3)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    monkeypatch.setattr(progress, "_quiet", False)   # an earlier in-process CLI test may have run with --quiet
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    capfd.readouterr()
    try:
        lm = load_model(str(tmp_path), progress=False)
        assert "Loading weights" not in capfd.readouterr().err   # transformers' bar follows biaslab's (--quiet: off)
        monkeypatch.setenv("BIASLAB_PROGRESS", "1")
        load_model(str(tmp_path))
        err = capfd.readouterr().err   # off a terminal (a log): plain lines, not the bar's carriage returns
        assert "Loading weights" not in err and f"[biaslab] loading {tmp_path} in float32: done in" in err, err
        from rich.console import Console

        monkeypatch.setattr(progress, "_console", Console(stderr=True, force_terminal=True))
        load_model(str(tmp_path))
        err = capfd.readouterr().err   # on a terminal: transformers' bar (a big load's), no plain lines
        assert "Loading weights" in err and "[biaslab] loading" not in err, err
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
    assert weights_fingerprint(lm.model) == weights_fingerprint(model)   # the weights come back bit for bit
    assert lm.fingerprint.startswith("sha256-files:")                    # identity from the checkpoint files
    assert lm.dtype == torch.float32 and str(lm.device) == "cpu"


def test_fingerprint_changes_with_one_weight():
    model, _ = make_tiny_llama(seed=0)
    a = weights_fingerprint(model)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-3
    assert weights_fingerprint(model) != a


def test_dtype_choice():
    assert pick_dtype("cpu") == torch.float32
    assert pick_dtype("cuda") == torch.bfloat16
    assert pick_dtype("cpu", "bf16") == torch.bfloat16
    with pytest.raises(UnknownNameError):
        pick_dtype("cpu", "float8")


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_auto_dtype_follows_the_gpu_bf16_hardware(device, monkeypatch):
    """`--device cuda:1` is a GPU too (it got float32 before); a GPU without native bf16 (compute capability
    below 8: V100, T4, where torch only emulates it) gets float16, with a warning naming --dtype float32."""
    class Props:
        major = 8
    seen = []
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: (seen.append(i), Props)[1])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Tesla V100-SXM2-16GB")
    assert pick_dtype(device) == torch.bfloat16
    assert seen == [1 if device == "cuda:1" else 0]
    Props.major = 7
    with pytest.warns(UserWarning, match=r"V100.*no native bfloat16.*float16.*--dtype float32"):
        assert pick_dtype(device) == torch.float16
    assert pick_dtype(device, "bf16") == torch.bfloat16   # asked for: given, emulated or not


def test_missing_hub_model_says_no_download():
    from biaslab.models import load_model

    with pytest.raises(BiaslabError, match="never downloads"):
        load_model("no-such-org/no-such-model-xyz", progress=False)


def test_under_several_ranks_rank_0_converts_the_embedded_model_first(monkeypatch):
    """torchrun on a fresh cache: rank 0 converts while the others wait at the broadcast, then they find its
    conversion; an error of rank 0 reaches the others instead of leaving them waiting."""
    import biaslab.distributed as D
    from biaslab.errors import BiaslabError
    from biaslab.models import embedded as E

    calls = []
    monkeypatch.setattr(D, "world_size", lambda: 2)
    monkeypatch.setattr(D, "broadcast", lambda obj: calls.append(("broadcast", obj)) or obj)
    monkeypatch.setattr(E, "embedded_model_dir", lambda name, progress=True: calls.append(("convert", progress)) or "dir")
    for rank, want in ((0, [("convert", True), ("broadcast", None)]), (1, [("broadcast", None), ("convert", False)])):
        calls.clear()
        monkeypatch.setattr(D, "is_main", lambda rank=rank: rank == 0)
        assert E.embedded_model_dir_once("m") == "dir" and calls == want

    def broken(name, progress=True):
        raise BiaslabError("the embedded model 'm' needs the package x")

    monkeypatch.setattr(E, "embedded_model_dir", broken)
    monkeypatch.setattr(D, "is_main", lambda: True)
    with pytest.raises(BiaslabError, match="needs the package x"):
        E.embedded_model_dir_once("m")
    monkeypatch.setattr(D, "is_main", lambda: False)                      # rank 1 gets rank 0's error
    monkeypatch.setattr(D, "broadcast", lambda obj: "the embedded model 'm' needs the package x")
    monkeypatch.setattr(E, "embedded_model_dir", lambda *a, **k: pytest.fail("rank 1 converted after rank 0 failed"))
    with pytest.raises(BiaslabError, match="needs the package x"):
        E.embedded_model_dir_once("m")


def test_models_load_as_plain_torch(tmp_path, monkeypatch):
    """No layer is swapped for a kernel fetched from the Hub (transformers 5.25 kernelizes by default, and requires
    the `kernels` package), even where the environment asks for it, and a GGUF is always de-quantised (never left
    in transformers' packed GgufLinear blocks, which pruning, attribution and export would not see as weights)."""
    import transformers

    from biaslab.models import load_model
    from biaslab.models.embedded import _load_gguf, embedded_gguf_path

    monkeypatch.setenv("USE_HUB_KERNELS", "1")
    model, tok = make_tiny_llama(seed=3)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), progress=False)
    assert getattr(lm.model, "use_kernels", False) is False
    seen = {}

    def spy(*a, **k):
        seen.update(k)
        raise RuntimeError("stop after the options")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    with pytest.raises(BiaslabError, match="stop after the options"):
        _load_gguf(embedded_gguf_path("smollm2-135m-instruct"))
    assert seen["use_kernels"] is False and seen["trust_remote_code"] is False
    if hasattr(transformers, "GgufConfig"):
        assert seen["quantization_config"].dequantize is True


def _declare_quantized(d, method="bitsandbytes"):
    """A tiny checkpoint whose config.json declares a quantizer (its weights stay float: enough for every path that
    reads the config; none of these tests needs the quantizer's library)."""
    import json

    model, tok = make_tiny_llama(seed=3)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": method, "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_a_quantized_checkpoint_without_its_library_is_one_line(tmp_path):
    import importlib.util

    from biaslab.models import load_model

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here: the checkpoint would load")
    d = _declare_quantized(tmp_path / "q")
    with pytest.raises(BiaslabError) as e:
        load_model(str(d), progress=False)
    msg = str(e.value)
    assert "bitsandbytes-quantized checkpoint" in msg and "not installed" in msg and "unquantized checkpoint" in msg
    assert "damaged" not in msg


def test_mitigations_and_probes_refuse_a_quantized_checkpoint_before_it_loads(tmp_path, monkeypatch):
    import biaslab.models.loading as L
    from biaslab.models import LanguageModel
    from biaslab.models.plan import plan_placement, render_plan
    from biaslab.models.quantized import require_full_precision

    d = _declare_quantized(tmp_path / "q", method="gptq")
    monkeypatch.setattr(L, "load_model", lambda *a, **k: pytest.fail("the weights were loaded"))
    for what in ("mitigate crispr", "the soft-prompt probe"):
        with pytest.raises(BiaslabError, match=f"{what} needs unquantized weights; .* gptq-quantized checkpoint"):
            require_full_precision(what, spec=str(d))
    require_full_precision("mitigate crispr", spec=str(tmp_path / "absent"))   # not a directory: the loader decides
    # a model whose quantization shows only once loaded (a hub id): refused then, and its manifest says so
    model, tok = make_tiny_llama(seed=3)
    model.config.quantization_config = {"quant_method": "awq"}
    lm = LanguageModel(model, tok, spec="org/awq-model")
    assert lm.describe()["quantization"] == "awq"
    with pytest.raises(BiaslabError, match="org/awq-model is a awq-quantized"):
        require_full_precision("mitigate fast", lm=lm)
    # biaslab env's plan says its sizes are the unquantized model's
    line = render_plan(plan_placement(str(d), device="cpu"))
    assert "unquantized — an upper bound for this gptq-quantized checkpoint" in line


def test_mitigate_on_a_quantized_checkpoint_is_one_line(tmp_path):
    import subprocess
    import sys

    d = _declare_quantized(tmp_path / "q")
    p = subprocess.run([sys.executable, "-m", "biaslab", "mitigate", "crispr", "--model", str(d), "--task",
                        "bbq:Gender_identity", "--neurons", "1", "--limit", "8", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=120, env={**__import__("os").environ,
                                                                         "BIASLAB_PROGRESS": "0"})
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-800:]
    assert "mitigate crispr needs unquantized weights" in p.stderr and "biaslab audit" in p.stderr
