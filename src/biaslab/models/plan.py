"""Where a model's weights would go, before anything loads (``biaslab env --model SPEC [--device-map …]``): the model
is built from its config on the meta device in the dtype a run would use, and Accelerate's own planner
(``get_balanced_memory`` / ``infer_auto_device_map``, the calls transformers makes when it loads with a strategy)
places it within ``--max-memory`` or the devices' free memory — under torchrun within this rank's block of GPUs.
The plan is Accelerate's inference; the real load uses the same calls on the same numbers, so they agree unless
free memory changes in between. Nothing is read but the config; nothing is written."""
from __future__ import annotations

from pathlib import Path

from ..errors import BiaslabError


def _config_dir(spec: str) -> Path:
    from .embedded import cache_problem, converted_dir
    from .loading import resolve_spec

    kind, ref = resolve_spec(spec)
    if kind == "dir":
        return Path(ref)
    if kind == "hub":
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(ref, local_files_only=True))
        except Exception:  # noqa: BLE001 - not in the local cache (biaslab never downloads)
            raise BiaslabError(f"{ref!r} is not in the local Hugging Face cache (biaslab never downloads)") from None
    if kind == "embedded":
        target = converted_dir(ref)
        if target.is_dir() and cache_problem(target) is None:
            return target
        raise BiaslabError(f"the embedded model {ref!r} is not converted yet (any command that loads it converts it "
                           "once, ~30 s); plan after that")
    raise BiaslabError(f"--model {spec}: a placement plan needs a model directory with config.json, not a .gguf file")


def _gib(n: float) -> float:
    return round(n / 2**30, 3)


def _free_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device).index or 0)[0]
    import psutil

    return psutil.virtual_memory().available


def plan_placement(spec: str, *, device=None, dtype=None, device_map=None, max_memory=None) -> dict:
    """The plan for ``spec``: its weights' size in the run's dtype and, per device, the modules and GiB placed there;
    ``fits`` False where weights would go to disk (biaslab refuses that load) or, without a map, exceed the device's
    free memory. The same one-line errors as a load for a bad device, dtype, map or cap."""
    import itertools

    from .. import distributed as D
    from .loading import pick_device, pick_dtype
    from .placement import check_map_covers, meta_model, resolve_placement

    dev = pick_device(device or D.local_device())
    dt = pick_dtype(dev, dtype)
    dm, mm = resolve_placement(device_map, max_memory)
    cdir = _config_dir(spec)
    model = meta_model(cdir, dt)
    check_map_covers(dm, cdir, model)
    tensors = list(itertools.chain(model.named_parameters(), model.named_buffers()))
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    out = {"model": spec, "dtype": str(dt).replace("torch.", ""), "weights_bytes": total, "weights_gib": _gib(total),
           "device_map": device_map, "max_memory": max_memory}
    from .quantized import checkpoint_quantization

    if q := checkpoint_quantization(cdir):   # the meta model is built unquantized: its sizes bound the quantized ones
        out["quantization"] = q
    if dm is None:
        free = _free_bytes(dev)
        out.update(devices={dev: {"modules": 1, "bytes": total, "gib": _gib(total)}}, free_bytes={dev: free},
                   fits=total <= free)
        return out
    if isinstance(dm, str):
        from accelerate.utils import get_balanced_memory, get_max_memory, infer_auto_device_map

        no_split = getattr(model, "_no_split_modules", None) or []
        caps = (get_max_memory(dict(mm) if mm else None) if dm == "sequential" else
                get_balanced_memory(model, max_memory=dict(mm) if mm else None, no_split_module_classes=no_split,
                                    low_zero=dm == "balanced_low_0"))
        dm = infer_auto_device_map(model, max_memory=caps, no_split_module_classes=no_split)

    def named(v) -> str:   # Accelerate's plan numbers GPUs; a user's map may say cuda:N
        return f"cuda:{v}" if str(v).isdigit() else str(v)

    devices: dict[str, dict] = {}
    for v in dm.values():
        devices.setdefault(named(v), {"modules": 0, "bytes": 0})["modules"] += 1
    keys = sorted(dm, key=len, reverse=True)   # the longest module name that holds a tensor places it
    for name, t in tensors:
        key = next((k for k in keys if k == "" or name == k or name.startswith(k + ".")), None)
        where = named(dm[key]) if key is not None else "none"
        devices.setdefault(where, {"modules": 0, "bytes": 0})["bytes"] += t.numel() * t.element_size()
    devices = {d: {**v, "gib": _gib(v["bytes"])} for d, v in devices.items()}
    out.update(devices=devices, fits="disk" not in devices and "none" not in devices)
    return out


def render_plan(plan: dict) -> str:
    """One line: the weights' size, where they go, and whether that load would succeed (and what to change)."""
    from .placement import _size

    how = f" with --device-map {plan['device_map']}" if plan["device_map"] else ""
    how += f" and --max-memory {plan['max_memory']}" if plan["max_memory"] else ""
    parts = ", ".join(f"{d} {_size(v['bytes'])} ({v['modules']} module{'s' if v['modules'] != 1 else ''})"
                      for d, v in plan["devices"].items())
    size = f"{_size(plan['weights_bytes'])} of weights"
    if plan.get("quantization"):
        size += f" unquantized — an upper bound for this {plan['quantization']}-quantized checkpoint"
    line = f"placement of {plan['model']} ({plan['dtype']}, {size}){how}: {parts}"
    if plan["fits"]:
        return line + " — fits"
    if "free_bytes" in plan:
        (d, free), = plan["free_bytes"].items()
        return (line + f" — does NOT fit: {d} has {_size(free)} free; use --device-map auto (with --max-memory to "
                "leave room for activations) or a smaller --dtype")
    lost = sum(plan["devices"].get(k, {}).get("bytes", 0) for k in ("disk", "none"))
    return (line + f" — does NOT fit: {_size(lost)} would go to disk, which biaslab does not use; give the devices "
            "more (--max-memory), more GPUs, or a smaller --dtype")
