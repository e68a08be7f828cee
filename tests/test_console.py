"""Console, progress, formats, the tidy AuditResult views, dry runs and the audit report (issue 18, parts 3–4)."""
from __future__ import annotations

import io
import json
import math
import time

import pytest

from biaslab.audit_result import SMALL_N, AuditResult


def _results():
    """A hand-made audit results dict: two groups of 30 items and one of 5 (small-n); a long metric name."""
    long = "stereotype_score_with_a_really_long_metric_name"
    def block(v, lo, hi):
        return {"value": v, "ci95": [lo, hi], "scale": "0-100", "ideal": 50.0}
    return {"model": {"spec": "tiny", "fingerprint": "sha256:" + "0" * 64}, "patch": None, "benchmarks": {
        "crows": {"protocol": "crows.shared-tokens.v1", "n_items": 65, "n_records": 65,
                  "metrics": {long: block(60.0, 50.0, 70.0)},
                  "groups": {"gender": {"n_items": 30, "metrics": {long: block(70.0, 55.0, 85.0)}},
                             "race": {"n_items": 30, "metrics": {long: block(56.0, 40.0, 72.0)}},
                             "age": {"n_items": 5, "metrics": {long: block(40.0, 0.0, 100.0)}}}}}}, long


def test_to_frame_is_tidy_and_marks_small_groups():
    res, long = _results()
    f = AuditResult(res).to_frame()
    assert list(f.columns) == ["benchmark", "protocol", "group", "metric", "value", "lo", "hi", "n", "small_n"]
    assert len(f) == 4                                   # overall + 3 groups
    age = f[f["group"] == "age"].iloc[0]
    assert age["small_n"] and age["n"] == 5 < SMALL_N and age["lo"] == 0.0 and age["hi"] == 100.0
    assert not f[f["group"] == "all"].iloc[0]["small_n"]


def test_by_group_difference_and_ratio_by_hand():
    res, long = _results()
    g = AuditResult(res).by_group("crows", long)
    assert g.difference() == pytest.approx(70.0 - 40.0)
    assert g.ratio() == pytest.approx(40.0 / 70.0)
    assert g.difference(include_small=False) == pytest.approx(70.0 - 56.0)   # age (n=5) left out
    assert g.ratio(include_small=False) == pytest.approx(56.0 / 70.0)
    with pytest.raises(Exception, match="has no by-group metric 'nope'"):
        AuditResult(res).by_group("crows", "nope")


def test_print_never_cuts_names_and_formats_parse():
    res, long = _results()
    r = AuditResult(res)
    assert long in str(r)                                     # the plain table folds, never "stereotype_sc…"
    md = r.render("markdown")
    assert f"| crows | crows.shared-tokens.v1 | {long} | 60.00 | [50.00, 70.00] |" in md
    import csv

    rows = list(csv.DictReader(io.StringIO(r.render("csv"))))
    assert {x["group"] for x in rows} == {"all", "gender", "race", "age"} and rows[0]["value"] == "60.0"
    assert json.loads(r.render("json"))["benchmarks"]["crows"]["n_items"] == 65
    with pytest.raises(Exception, match="--format must be one of"):
        r.render("yaml")


def test_rich_table_folds_at_narrow_width():
    from rich.console import Console

    res, long = _results()
    con = Console(width=60, file=io.StringIO(), color_system=None)
    con.print(AuditResult(res).table())
    text = con.file.getvalue()
    assert "…" not in text
    metric_col = "".join(line.split("│")[3].strip() for line in text.splitlines() if line.count("│") == 8)
    assert long in metric_col                                # folded over lines, every character kept


def test_markdown_escapes_pipes():
    from biaslab.formats import markdown_table

    assert markdown_table(["a"], [["x|y"]]).splitlines()[2] == "| x\\|y |"


def test_stage_counts_inner_progress_and_prints_plain_lines(monkeypatch, capsys):
    """Off a terminal: a plain line every BIASLAB_PROGRESS_EVERY seconds and one at the end; the count moves by the
    primitive's share of the chunk (not once per chunk), and read-back chunks do not count toward the rate."""
    from biaslab import progress

    monkeypatch.setenv("BIASLAB_PROGRESS", "1")
    monkeypatch.setenv("BIASLAB_PROGRESS_EVERY", "0.1")
    seen = []
    with progress.stage_prefix("2/5 before"), progress.stage("bbq", 10) as st:
        st.start_chunk(4)
        st.end_chunk(resumed=True)                       # a chunk read back from the journal
        st.start_chunk(4)
        with progress.progress_bar(8, "scoring") as adv:  # 8 sequences for the chunk's 4 items
            adv(2)
            seen.append(st.count())                      # 4 + 4 · 2/8
            adv(2)
            seen.append(st.count())
        st.end_chunk()
        assert st.resumed == 4
    assert seen == [5.0, 6.0]
    err = capsys.readouterr().err
    assert "[biaslab] 2/5 before: bbq: 8/10 items (80 %)" in err and "done in" in err
    with progress.stage("crows", 4) as st:               # at 100 % only the final line: no "4/4 … eta 0s" first
        st.start_chunk(4)
        with progress.progress_bar(4, "scoring") as adv:
            adv(4)
            time.sleep(0.15)
            adv(0)
        st.end_chunk()
    lines = [x for x in capsys.readouterr().err.splitlines() if "crows" in x]
    assert len(lines) == 1 and "4/4 items (100 %)" in lines[0] and "done in" in lines[0], lines


def test_a_sharded_map_is_one_stage_named_for_its_processes(monkeypatch, capsys):
    """A dev search's map is one progress line for all its chunks (the bars each chunk opens move it), not a line
    per chunk; the label says how many processes share the work."""
    from biaslab import distributed as D, progress

    monkeypatch.setenv("BIASLAB_PROGRESS", "1")
    monkeypatch.setattr(progress, "_quiet", False)

    def fn(part):
        with progress.progress_bar(2 * len(part), "scoring") as adv:
            adv(2 * len(part))
        return [x * 10 for x in part]

    assert D.sharded_map(fn, list(range(7)), 3, desc="dev search n=3", per_item=2) == [x * 10 for x in range(7)]
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("[biaslab]")]
    assert len(lines) == 1 and lines[0].startswith("[biaslab] dev search n=3: 14/14 items (100 %)"), lines
    assert D.shared_label("CRISPR attribution") == "CRISPR attribution"
    monkeypatch.setattr(D, "world_size", lambda: 4)
    assert D.shared_label("CRISPR attribution") == "CRISPR attribution (4 processes)"


def test_quiet_turns_progress_off(monkeypatch):
    from biaslab import progress

    monkeypatch.setenv("BIASLAB_PROGRESS", "1")
    progress.set_quiet(True)
    try:
        with progress.stage("x", 5) as st:
            assert st is None
    finally:
        progress.set_quiet(False)


def test_audit_dry_run_writes_nothing_and_counts_items(tiny_lm, tmp_path):
    from biaslab.auditing import audit
    from biaslab.evaluation.dryrun import DryRun

    out = tmp_path / "run"
    plan = audit(tiny_lm, "crows,winobias", limit=6, out=out, dry_run=True)
    assert isinstance(plan, DryRun) and not out.exists()
    assert [(r[1], r[2]) for r in plan.rows] == [("crows", 6), ("winobias", 6)]
    assert all(r[3] > 0 and r[4] == pytest.approx(r[3] * r[2]) for r in plan.rows)
    assert "| total |" in plan.render("markdown")


def test_a_dry_run_under_several_processes_estimates_the_busiest_rank(monkeypatch):
    """Under W processes a set's chunks are dealt out in rounds (chunk k to rank k mod W) and a round lasts as long
    as its fullest chunk: 200 items in chunks of 128 on 2 ranks take one round of 128 items, not 200; 300 items in
    chunks of 32 on 4 ranks (10 chunks) take rounds of 32, 32 and 32 — the estimate one process made (all 300)
    was 3× too long. In one process nothing changes."""
    from biaslab import distributed as D
    from biaslab.evaluation.dryrun import estimated_s

    assert estimated_s(0.5, 200, 128) == 100.0
    monkeypatch.setattr(D, "world_size", lambda: 2)
    assert estimated_s(0.5, 200, 128) == 64.0 and estimated_s(0.5, 100, 128) == 50.0
    monkeypatch.setattr(D, "world_size", lambda: 4)
    assert estimated_s(1.0, 300, 32) == 96.0 and estimated_s(None, 300, 32) is None


def test_mitigation_dry_run_counts_every_state(tiny_lm, tmp_path):
    from biaslab.evaluation.runner import run_mitigation

    plan = run_mitigation("crispr", tiny_lm, "sst2", {"instructions": 1, "control_seeds": 2, "retention": False,
                                                      "neurons": 2, "dev_size": 4},
                          out=tmp_path / "r", limit=5, dry_run=True)
    assert not (tmp_path / "r").exists()
    stages = {r[0]: r[2] for r in plan.rows}
    assert stages["before"] == 5 and stages["after"] == 5 and stages["controls (2 scored states)"] == 10


def test_audit_report_has_summary_forest_plots_and_footer(tiny_lm, tmp_path):
    from biaslab.auditing import audit

    res = audit(tiny_lm, "crows", limit=12, out=tmp_path / "a", n_boot=50)
    html = (tmp_path / "a" / "report.html").read_text()
    assert "name='viewport'" in html and "max-width:100%" in html
    assert "Summary — policy default" in html and "crows.stereotype_score within [45, 55]" in html
    assert html.count("<img") >= 1 and "data:image/png;base64," in html
    assert "small-n" in html                                 # 12 items over 9 bias types: every group is small
    assert "<footer" in html and "seed" in html and "command" in html
    assert math.isfinite(res.metric("crows", "stereotype_score"))


def test_cli_formats_quiet_and_dry_run_on_a_model_directory(tmp_path):
    """`audit` and `mitigate` print markdown / csv / json on stdout, `--dry-run` writes nothing, `--out` is
    required otherwise (one clear line)."""
    import csv as _csv

    from typer.testing import CliRunner

    from biaslab.cli import app
    from biaslab.errors import BiaslabError
    from conftest import make_tiny_llama

    model, tok = make_tiny_llama()
    d = tmp_path / "tiny"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    r = CliRunner().invoke(app, ["audit", "--model", str(d), "--bench", "crows", "--limit", "5", "--n-boot", "20",
                                 "--out", str(tmp_path / "a"), "--format", "csv", "-q"])
    assert r.exit_code == 0, r.output
    rows = list(_csv.DictReader(io.StringIO(r.stdout)))
    assert rows and {x["benchmark"] for x in rows} == {"crows"} and (tmp_path / "a" / "report.html").is_file()
    r = CliRunner().invoke(app, ["audit", "--model", str(d), "--bench", "crows", "--limit", "5", "--dry-run",
                                 "--format", "json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["rows"][0]["items"] == 5
    r = CliRunner().invoke(app, ["audit", "--model", str(d), "--bench", "crows"])
    assert isinstance(r.exception, BiaslabError) and "--out DIR is required" in str(r.exception)
    r = CliRunner().invoke(app, ["mitigate", "crispr", "--model", str(d), "--task", "sst2", "--neurons", "2", "--instructions", "1",
                                 "--dev-size", "4", "--control-seeds", "0", "--no-retention", "--limit", "4",
                                 "--n-boot", "20", "--out", str(tmp_path / "m"), "--format", "markdown", "-q"])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("**crispr on sst2**") and "| accuracy | test |" in r.stdout
    r = CliRunner().invoke(app, ["audit", "--model", str(d), "--bench", "crows", "--out", str(tmp_path / "b"),
                                 "--format", "yaml"])
    assert isinstance(r.exception, BiaslabError) and "--format must be one of" in str(r.exception)


def test_many_controls_go_to_a_table_of_their_own_at_80_columns():
    """With more than two controls (the default: random and one constant answer per option), a column per control
    folded every cell at 80 columns: the differences come as rows (metric, control, after − control) instead."""
    from rich.console import Console

    from biaslab.evaluation.report import summary_tables

    m = {"set": "test", "before": 0.5, "after": 0.6, "delta": 0.1, "delta_ci95": [0.0, 0.2]}
    names = ["random", "always A", "always B", "always C", "shuffled"]
    controls = {n: {"members": [1, 2, 3] if n == "random" else [1],
                    "metrics": {"acc": {"method_minus_control": 0.01 * i, "method_minus_control_ci95": [-0.5, 0.5]}}}
                for i, n in enumerate(names)}
    summary = {"method": "crispr", "task": "bbq", "evaluation": {"sets": {"test": {"n_items": 10}}},
               "metrics": {"acc": m}, "controls": controls, "retention": None}
    con = Console(record=True, width=80)
    tables = summary_tables(summary, "4 neurons")
    for t in tables:
        con.print(t)
    text = con.export_text()
    assert len(tables) == 2 and len(tables[0].columns) == 6 and len(tables[1].rows) == 5
    assert "random (mean of 3)" in text and "0.040 [-0.500, 0.500]" in text and "always C" in text
    assert "0.100 [0.000, 0.200]" in text   # the main row no longer folds its interval
    two = summary_tables({**summary, "controls": dict(list(controls.items())[:2])}, "4 neurons")
    assert len(two) == 1 and len(two[0].columns) == 8   # two controls still fit inline
