"""Config files (``--config FILE|PRESET``): every bad file is one line naming the file, the line or setting, and
what was expected; good values are coerced to the field's type (the one source of defaults: the config class)."""
import pytest

from biaslab.errors import BiaslabError
from biaslab.evaluation.config import config_from, load_config
from biaslab.methods.crispr.config import CrisprConfig


@pytest.mark.parametrize("name, text, match", [
    ("bad.yaml", "neurons: [1, 2\n", r"bad\.yaml, line 2: not valid YAML \(expected ',' or ']'"),
    ("tab.yaml", "neurons:\t3\n\tsearch: true\n", r"tab\.yaml, line 1: not valid YAML"),
    ("list.yaml", "- a\n- b\n", "a config file holds a mapping of settings, got a list"),
    ("typo.yaml", "neuron: 3\n", r"unknown setting 'neuron'; did you mean 'neurons'\?"),
    ("run.yaml", "limt: 3\n", r"did you mean 'limit'\?"),   # run keys are suggested too
    ("word.yaml", "neurons: three\n", "neurons expects int, got 'three'"),
    ("half.yaml", "neurons: 2.5\n", "neurons expects int, got 2.5"),
    ("flag.yaml", "search: maybe\n", "search expects bool, got 'maybe'"),
    ("null.yaml", "protocol: null\n", "protocol cannot be null"),
    ("one.yaml", "retention_benchmarks: 5\n", "retention_benchmarks expects a list, got 5"),
    ("bad.json", "{neurons: 3}", r"bad\.json: not valid JSON"),
    ("bytes.yaml", b"\xff\xfe\x00", "not UTF-8 text"),
])
def test_bad_config_files_are_one_clear_line(tmp_path, name, text, match):
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(BiaslabError, match=match) as e:
        load_config(CrisprConfig, p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_config_values_are_coerced_and_run_keys_split_off(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("neurons: '4'\nsearch: no\nretention_benchmarks: crows, bold\ntask: bbq:Age\nlimit: 50\n")
    fields, run = load_config(CrisprConfig, p)
    assert fields == {"neurons": 4, "search": False, "retention_benchmarks": ("crows", "bold")}
    assert run == {"task": "bbq:Age", "limit": 50}
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(CrisprConfig, tmp_path / "empty.yaml") == ({}, {})
    # file < overrides; everything else from the class defaults
    cfg = config_from(CrisprConfig, {"neurons": 4, "protocol": "cloze"}, {"neurons": 2})
    assert (cfg.neurons, cfg.protocol, cfg.sites) == (2, "cloze", CrisprConfig().sites)


@pytest.mark.parametrize("spec, match", [
    ("dem", r"--config dem: no such file, and crispr has no preset of that name \(presets: demo\)"),
    ("/nonexistent/c.yaml", "no such file"),
])
def test_unknown_presets_and_missing_files(spec, match, tmp_path):
    with pytest.raises(BiaslabError, match=match):
        load_config(CrisprConfig, spec, method_name="crispr")
    with pytest.raises(BiaslabError, match="not a regular file"):
        load_config(CrisprConfig, tmp_path, method_name="crispr")
