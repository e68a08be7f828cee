"""Method configs from files and presets: ``--config FILE`` (YAML or JSON) or ``--config PRESET`` (a file shipped
with the method, e.g. CRISPR's ``demo``). Precedence: command line > file > the config class's defaults.

A config file is a mapping of the method's config fields; four run keys may sit beside them — ``task``,
``limit``, ``seed``, ``n_boot`` — with the same meaning as the command-line options. Unknown keys are an error
naming the file, the key and the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from pathlib import Path

from ..errors import BiaslabError

RUN_KEYS = ("task", "limit", "seed", "n_boot")


def option(default, help: str):
    """A config-class field with its help text (shown by ``biaslab mitigate METHOD --help``)."""
    return dataclasses.field(default=default, metadata={"help": help})


def preset_dir(method_name: str) -> Path:
    return Path(__file__).resolve().parent.parent / "methods" / method_name / "presets"


def presets(method_name: str) -> list[str]:
    d = preset_dir(method_name)
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def resolve_config_path(method_name: str, spec) -> Path:
    """A config file path, or the shipped preset of that name."""
    p = Path(spec)
    if p.is_file():
        return p
    if p.exists():
        raise BiaslabError(f"--config {spec}: not a regular file")
    pre = preset_dir(method_name) / f"{spec}.yaml"
    if not p.suffix and pre.is_file():
        return pre
    names = presets(method_name)
    raise BiaslabError(f"--config {spec}: no such file, and {method_name} has no preset of that name"
                       + (f" (presets: {', '.join(names)})" if names else ""))


def read_config_file(path) -> dict:
    """The mapping in a YAML / JSON config file (one clear error for anything else)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BiaslabError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise BiaslabError(f"{path}: cannot read the config file ({e.strerror})") from None
    if path.suffix == ".json":
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise BiaslabError(f"{path}: not valid JSON ({e})") from None
    else:
        import yaml

        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f", line {mark.line + 1}" if mark is not None else ""
            raise BiaslabError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise BiaslabError(f"{path}: a config file holds a mapping of settings, got a {type(doc).__name__}")
    return doc


def _coerce(cls, f: dataclasses.Field, value, where: str):
    """Check one value against the field's type (ints, floats, bools, strings, optional, tuples)."""
    hints = typing.get_type_hints(cls)
    t = hints.get(f.name, type(f.default))
    args = typing.get_args(t)
    optional = type(None) in args
    if value is None:
        if optional or f.default is None:
            return None
        raise BiaslabError(f"{where}: {f.name} cannot be null")
    base = next((a for a in args if a is not type(None)), t) if args and typing.get_origin(t) is not tuple else t
    origin = typing.get_origin(base) or base
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise BiaslabError(f"{where}: {f.name} expects a list, got {value!r}")
        elem = (typing.get_args(base) or (str,))[0]
        elem = type(f.default[0]) if elem is Ellipsis and f.default else (elem if isinstance(elem, type) else str)
        return tuple(_scalar(elem, v, f.name, where) for v in value)
    return _scalar(base if isinstance(base, type) else type(f.default), value, f.name, where)


def _scalar(t: type, value, name: str, where: str):
    if t is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
    elif t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    elif t is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise BiaslabError(f"{where}: {name} expects {t.__name__}, got {value!r}")


def check_fields(cls, values: dict, where: str) -> dict:
    """``values`` with every key a field of ``cls`` and every value of the field's type."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for k, v in values.items():
        if k not in names:
            close = difflib.get_close_matches(k, list(names) + list(RUN_KEYS), n=1, cutoff=0.6)
            raise BiaslabError(f"{where}: unknown setting {k!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                               + f" (settings: {', '.join(sorted(names))}; run keys: {', '.join(RUN_KEYS)})")
        out[k] = _coerce(cls, names[k], v, where)
    return out


def load_config(cls, spec, *, method_name: str | None = None) -> tuple[dict, dict]:
    """(config field values, run settings) of a config file or preset."""
    path = resolve_config_path(method_name, spec) if method_name else Path(spec)
    doc = read_config_file(path)
    run = {k: doc.pop(k) for k in RUN_KEYS if k in doc}
    return check_fields(cls, doc, str(path)), run


def config_from(cls, config=None, overrides: dict | None = None):
    """A ``cls`` instance from None / an instance / a dict / a file, with ``overrides`` applied last."""
    overrides = dict(overrides or {})
    if config is None:
        base = {}
    elif isinstance(config, cls):
        base = {f.name: getattr(config, f.name) for f in dataclasses.fields(cls)}
    elif isinstance(config, dict):
        base = check_fields(cls, config, "config")
    elif isinstance(config, (str, Path)):
        base, _ = load_config(cls, config)
    else:
        raise BiaslabError(f"config must be a {cls.__name__}, a dict or a file, got {type(config).__name__}")
    try:
        return cls(**{**base, **check_fields(cls, overrides, "config")})
    except TypeError as e:
        raise BiaslabError(f"bad {cls.__name__}: {e}") from None
