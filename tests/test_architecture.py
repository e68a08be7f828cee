"""Structural contracts of the package, checked from the source with ``ast``: no import cycle among biaslab's
modules (imports inside functions included), pure metric modules, module sizes, the CLI derived from the config
classes, and no library code reached through the CLI."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "biaslab"
MAX_LINES = 430


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _imports(mod: str, path: Path) -> set[str]:
    """biaslab modules that ``mod`` imports anywhere in its body (a package's __init__ counts as the package)."""
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    deps = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[:len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for n in names:
            while n and n not in MODULES:
                n = n.rpartition(".")[0]
            if n and n != mod:
                deps.add(n)
    return deps


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_the_package_modules():
    assert _cycles(GRAPH) == []
    assert "biaslab.tasks" in GRAPH["biaslab.benchmarks.bbq"]  # the graph sees real edges


def test_metric_modules_are_pure():
    """metrics/ never imports a model, a benchmark or a method: only the statistics and errors."""
    for m, deps in GRAPH.items():
        if m.startswith("biaslab.metrics"):
            assert deps <= {"biaslab.stats", "biaslab.errors", "biaslab.metrics"}, (m, deps)


def test_modules_stay_small():
    big = {m: n for m, p in MODULES.items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not big, big


def test_experiments_and_tests_never_reach_library_code_through_the_cli():
    for folder in ("experiments", "tests", "bench"):
        for p in (ROOT / folder).rglob("*.py"):
            text = p.read_text(encoding="utf-8")
            assert "biaslab.commands" not in text or p.name == Path(__file__).name, p
            if folder != "tests":
                assert "biaslab.cli" not in text, p


def test_method_modules_hold_no_run_directory_bootstrap_or_html():
    for m, p in MODULES.items():
        if m.startswith("biaslab.methods."):
            text = p.read_text(encoding="utf-8")
            for banned in ("RunDir(", "paired_bootstrap(", "bootstrap_ci(", "write_page(", "atomic_write_json("):
                assert banned not in text, (m, banned)


@pytest.mark.parametrize("name", ["crispr", "fast", "srllm"])
def test_cli_options_are_the_config_class_fields_with_its_defaults(name):
    from typer.main import get_command

    from biaslab.cli import app
    from biaslab.methods import METHODS

    method = METHODS.get(name)()
    cmd = get_command(app).commands["mitigate"].commands[name]
    opts = {p.name: p for p in cmd.params}
    for f in dataclasses.fields(method.config_class):
        if f.name == "seed":
            continue  # the run's --seed
        assert f.name in opts, f.name
        want = ",".join(map(str, f.default)) if isinstance(f.default, tuple) and f.default else (
            None if isinstance(f.default, tuple) else f.default)
        assert opts[f.name].default == want, (f.name, opts[f.name].default, want)
        assert f.metadata.get("help"), f"{name}.{f.name} has no help text"
    for common in ("model", "task", "out", "limit", "seed", "config", "force", "n_boot"):
        assert common in opts
