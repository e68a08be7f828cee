"""A model spread over devices (``--device-map`` over several GPUs) puts each layer's tensors on that layer's
device. The pieces that cross devices are checked here on the CPU with PyTorch's ``meta`` device standing in for
"another GPU": the tree-attention plans travel through Accelerate's own device-map mover, attribution reduces on
the activations' device, a stamp runs on its layer's device."""
import pytest
import torch
from accelerate.utils import send_to_device

from biaslab.attribution_core import reduce_positions
from biaslab.models.packing import pack, tree_plan

from conftest import make_tiny_llama


def _rows():
    return pack([[1, 2, 3, 4], [1, 2, 5], [6, 7]], row_tokens=100).rows


def test_a_tree_plan_moves_with_the_device_map_hooks_once_per_device():
    """Accelerate's AlignDevicesHook sends every forward kwarg through ``send_to_device``, which calls ``.to``:
    the plan arrives on the layer's device, copied once per device, and is itself on its own device."""
    _, _, _, plan = tree_plan(_rows(), torch.float32, "cpu")
    assert send_to_device(plan, "cpu") is plan
    moved = send_to_device(plan, "meta")
    assert moved is not plan and send_to_device(plan, "meta") is moved          # once per device
    tensors = [t for b in moved.buckets for t in (b.q_index, b.k_index, b.mask, b.src, b.dst)]
    assert tensors and all(t.device.type == "meta" for t in tensors)
    assert all(b.mask.device.type == "cpu" for b in plan.buckets)              # the original stays where it was
    assert (moved.n_nodes, moved.pairs_needed, moved.pairs_executed) == (plan.n_nodes, plan.pairs_needed,
                                                                         plan.pairs_executed)


def test_a_flex_plan_moves_with_the_device_map_hooks():
    from biaslab.models.flex import flex_plan

    _, _, _, plan = flex_plan(_rows(), "cpu")
    assert send_to_device(plan, "cpu") is plan
    moved = send_to_device(plan, "meta")
    assert moved.ends.device.type == "meta" and send_to_device(plan, "meta") is moved
    assert moved.n_nodes == plan.n_nodes and plan.ends.device.type == "cpu"


@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
def test_attribution_reduces_on_the_activations_device(reduce):
    """A layer on another device than the inputs: its (B, T, U) scores are reduced there (the position mask
    follows them); the values are those of the same reduction on one device."""
    a = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    pm = torch.tensor([[True, True, False], [False, True, True]])
    assert reduce_positions(a.to("meta"), pm, reduce).device.type == "meta"
    want = {"sum": a[0, :2].sum(0), "mean": a[0, :2].mean(0), "max": a[0, 1]}[reduce]   # row 0 by hand
    assert torch.equal(reduce_positions(a, pm, reduce)[0], want)


def test_a_stamp_runs_on_its_layers_device():
    from biaslab.methods.fast.stamp import stamp_device
    from biaslab.models import LanguageModel

    model, tok = make_tiny_llama()
    lm = LanguageModel(model, tok, spec="tiny")
    layer = model.config.num_hidden_layers - 1
    model.model.layers[layer].mlp.to("meta")                                  # "another GPU"
    assert stamp_device(lm, layer).type == "meta" and stamp_device(lm, 0).type == "cpu"


def test_export_takes_the_placement_options_and_checks_with_the_same_map(tmp_path):
    """`biaslab export --device-map auto --dtype float32` loads through Accelerate and exports; a model spread over
    devices (transformers then records ``hf_device_map``, which it never does on one CPU — set here by hand) has
    its export reloaded with that same map for the logit check, not gathered onto one device."""
    import json

    from typer.testing import CliRunner

    from biaslab.cli import app
    from biaslab.models import load_model
    from biaslab.models.sites import find_sites
    from biaslab.patches import NeuronMaskPatch

    model, tok = make_tiny_llama()
    d = tmp_path / "tiny"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    lm = load_model(str(d), dtype="float32")
    site = find_sites(lm.model, "ffn")[1].name
    NeuronMaskPatch.from_units(lm, {site: [0, 3, 5]}, sites="ffn").save(tmp_path / "p.safetensors")
    res = CliRunner().invoke(app, ["export", "--model", str(d), "--patch", str(tmp_path / "p.safetensors"), "--out",
                                   str(tmp_path / "out"), "--device-map", "auto", "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    check = json.loads((tmp_path / "out" / "biaslab_patch.json").read_text())["export_check"]
    assert check["max_abs_logit_diff"] == 0
    spread = load_model(str(d), dtype="float32", device_map="auto")
    spread.model.hf_device_map = {"": "cpu"}
    p = NeuronMaskPatch.from_units(spread, {site: [0, 3, 5]}, sites="ffn")
    check = json.loads((p.export(spread, tmp_path / "out2") / "biaslab_patch.json").read_text())["export_check"]
    assert check["loaded_with"].endswith("with the same device map") and check["max_abs_logit_diff"] == 0
