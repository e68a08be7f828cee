"""``biaslab mitigate METHOD``: one command per registered method, all with one grammar —

    biaslab mitigate METHOD --model SPEC --task TASK [--limit N] [--seed S] [--config FILE|PRESET] [--force]
                            [--n-boot B] [--device D] [--dtype T] [method options] --out DIR

The method options are derived from the method's config dataclass (its fields, defaults and help), so the config
class is the one source of defaults; a value given on the command line beats the config file, which beats the
defaults. ``--limit`` always means evaluated items.
"""
from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Optional

import typer

from ..methods import METHODS
from ._app import DEVICE_MAP_HELP, MAX_MEMORY_HELP, console, err_console, mitigate_app, print_result, quiet_mode

RUN_OPTIONS = ("model", "task", "out", "limit", "seed", "config", "force", "n_boot", "device", "dtype", "format",
               "quiet", "dry_run", "device_map", "max_memory")


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _cli_type(cls, f: dataclasses.Field):
    """(annotation, default shown) of a config field on the command line: tuples are comma-separated strings."""
    t = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(t) if a is not type(None)]
    base = args[0] if args and typing.get_origin(t) is not tuple else t
    if (typing.get_origin(base) or base) is tuple:
        return Optional[str], ",".join(map(str, f.default)) if f.default else None
    if base is bool:
        return bool, f.default
    return (Optional[base] if f.default is None or type(None) in typing.get_args(t) else base), f.default


def config_parameters(method) -> list[inspect.Parameter]:
    """typer options for every field of the method's config class (``seed`` is the run's ``--seed``)."""
    cls = method.config_class
    params = []
    for f in dataclasses.fields(cls):
        if f.name in RUN_OPTIONS:
            continue
        ann, default = _cli_type(cls, f)
        decl = [f"{option_name(f.name)}/--no-{f.name.replace('_', '-')}"] if ann is bool else [option_name(f.name)]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=ann,
                                        default=typer.Option(default, *decl, help=f.metadata.get("help", ""))))
    return params


def _run_parameters(method) -> list[inspect.Parameter]:
    P, K = inspect.Parameter, inspect.Parameter.KEYWORD_ONLY
    return [
        P("model", K, annotation=str, default=typer.Option("smollm2-135m-instruct", "--model", "-m",
                                                           help="model spec (see `biaslab models`)")),
        P("task", K, annotation=Optional[str], default=typer.Option(method.default_task, "--task",
                                                                    help=method.task_help)),
        P("out", K, annotation=Optional[Path], default=typer.Option(None, "--out", "-o",
                                                                      help="run directory (required unless --dry-run)")),
        P("limit", K, annotation=Optional[int], default=typer.Option(getattr(method, "default_limit", None),
                                                                     "--limit", help=method.limit_help)),
        P("seed", K, annotation=int, default=typer.Option(0, "--seed", help=method.seed_help)),
        P("config", K, annotation=Optional[str], default=typer.Option(
            None, "--config", help="a YAML/JSON file of the method's settings, or a shipped preset name "
                                   "(command line > file > defaults)")),
        P("force", K, annotation=bool, default=typer.Option(False, "--force",
                                                            help="overwrite a run made with different arguments")),
        P("n_boot", K, annotation=int, default=typer.Option(1000, "--n-boot",
                                                            help="bootstrap resamples for the 95% intervals")),
        P("device", K, annotation=Optional[str], default=typer.Option(None, "--device", help="cpu | cuda | mps")),
        P("dtype", K, annotation=Optional[str], default=typer.Option(None, "--dtype", help="float32 | bfloat16 | float16")),
        P("device_map", K, annotation=Optional[str], default=typer.Option(None, "--device-map", help=DEVICE_MAP_HELP)),
        P("max_memory", K, annotation=Optional[str], default=typer.Option(None, "--max-memory", help=MAX_MEMORY_HELP)),
        P("format", K, annotation=str, default=typer.Option("table", "--format",
                                                            help="table | markdown | csv | json (results on stdout)")),
        P("quiet", K, annotation=bool, default=typer.Option(False, "--quiet", "-q", help="no progress display")),
        P("dry_run", K, annotation=bool, default=typer.Option(
            False, "--dry-run", help="print items per stage and an estimated time (a few seconds of calibration); "
                                     "fit and write nothing")),
    ]


def resolve_arguments(method, values: dict, given: set[str]) -> tuple[dict, object]:
    """(run arguments, config) from the parsed command line: values the user typed (``given``) win over the config
    file, which wins over the defaults."""
    from ..evaluation.config import check_fields, config_from, load_config

    file_cfg, file_run = load_config(method.config_class, values["config"], method_name=method.name) \
        if values.get("config") else ({}, {})
    cli_cfg = check_fields(method.config_class, {k: v for k, v in values.items()
                                                 if k in given and k not in RUN_OPTIONS}, "command line")
    cfg = config_from(method.config_class, {**file_cfg, **cli_cfg})
    run = {k: values[k] for k in RUN_OPTIONS if k != "config"}
    for k in ("task", "limit", "seed", "n_boot"):
        if k not in given and k in file_run:
            run[k] = file_run[k]
    return run, cfg


def make_command(name: str):
    method = METHODS.get(name)()

    def command(ctx: typer.Context, **values):
        # typer runs its own click: the source of each value says whether the user typed it
        given = {k for k in values if getattr(ctx.get_parameter_source(k), "name", "") == "COMMANDLINE"}
        run, cfg = resolve_arguments(method, values, given)
        from ..errors import BiaslabError
        from ..evaluation.report import render_summary, summary_tables
        from ..evaluation.runner import run_mitigation
        from ..formats import check_format

        check_format(run["format"])
        if run["out"] is None and not run["dry_run"]:
            raise BiaslabError("--out DIR is required: the run directory the mitigation writes (or use --dry-run)")
        quiet_mode(run["quiet"])
        res = run_mitigation(method, run["model"], run["task"], cfg, out=run["out"], limit=run["limit"],
                             seed=run["seed"], n_boot=run["n_boot"], force=run["force"], device=run["device"],
                             dtype=run["dtype"], console=None if run["quiet"] else err_console, dry_run=run["dry_run"],
                             device_map=run["device_map"], max_memory=run["max_memory"])
        if run["dry_run"]:
            print_result(res, run["format"])
            return
        if run["format"] == "table":
            for t in summary_tables(res, method.headline(res)):
                console.print(t)
        else:
            print(render_summary(res, run["format"], method.headline(res)), end="")
        err_console.print(f"run directory: {run['out']} (summary.json, report.html, patch.safetensors)", markup=False,
                          highlight=False)

    command.__name__ = f"mitigate_{name}"
    command.__doc__ = method.summary
    ctx_param = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    command.__signature__ = inspect.Signature([ctx_param] + _run_parameters(method) + config_parameters(method))
    mitigate_app.command(name, help=f"{method.summary} ({method.paper})")(command)
    return command


for _name in METHODS.names():
    make_command(_name)
