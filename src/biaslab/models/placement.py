"""Where a model's weights go: ``--device-map`` / ``--max-memory`` parsed for Accelerate's big-model loading, and,
under several processes per node (torchrun, NCCL), rewritten so that each rank places its copy of the model on
its own share of the node's GPUs (:func:`biaslab.distributed.node_share`) and never on another rank's."""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from ..errors import BiaslabError, UnknownNameError

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(device_map):
    """``auto | balanced | balanced_low_0 | sequential``, a JSON object (inline or a file) mapping module names to
    devices, or a dict; None keeps the whole model on one device."""
    if device_map is None or isinstance(device_map, dict):
        return device_map
    dm = str(device_map).strip()
    if dm in DEVICE_MAPS:
        return dm
    text = dm
    if not dm.startswith("{"):
        f = Path(dm)
        if not f.is_file():
            raise UnknownNameError("device map", dm, list(DEVICE_MAPS) + ["<JSON object>", "<JSON file>"])
        text = f.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise BiaslabError(f"--device-map {dm[:80]}: not valid JSON ({e})") from None
    if not isinstance(obj, dict) or not obj:
        raise BiaslabError(f"--device-map {dm[:80]}: expected a JSON object of module name → device")
    return obj


def parse_max_memory(max_memory):
    """``0=70GiB,1=70GiB,cpu=200GiB`` (or a dict) → Accelerate's max_memory dict. Devices are GPU numbers
    (``0`` or ``cuda:0``), ``cpu`` or ``mps``; sizes are what Accelerate reads (``70GiB``, ``5GB``, ``512MB``) or
    bytes. Anything else is one line naming the part (Accelerate's own error was a traceback from inside it)."""
    if max_memory is None or isinstance(max_memory, dict):
        return max_memory
    from accelerate.utils import convert_file_size_to_int

    out = {}
    for part in str(max_memory).split(","):
        k, sep, v = (s.strip() for s in part.partition("="))
        if not sep or not k or not v:
            raise BiaslabError(f"--max-memory expects DEVICE=SIZE pairs such as 0=70GiB,cpu=200GiB, got {part!r}")
        gpu = k[5:] if k.startswith("cuda:") else k
        key = int(gpu) if gpu.isdigit() else k
        if key == "disk":
            raise BiaslabError(f"--max-memory {part.strip()}: biaslab never offloads weights to disk; cap the GPUs "
                               "and cpu only")
        if not isinstance(key, int) and key not in ("cpu", "mps"):
            raise BiaslabError(f"--max-memory {part.strip()}: unknown device {k!r}; expected a GPU number (0, 1, …), "
                               "cpu or mps")
        size = int(v) if v.isdigit() else v
        try:
            n = convert_file_size_to_int(size)
        except ValueError:
            raise BiaslabError(f"--max-memory {part.strip()}: {v!r} is not a size; give one such as 70GiB, 5GB or "
                               "512MB (or a number of bytes)") from None
        if n <= 0:
            raise BiaslabError(f"--max-memory {part.strip()}: a device needs more than 0 bytes; leave a device out "
                               "of a JSON --device-map instead")
        out[key] = size
    return out


def gpu_index(v) -> int | None:
    """The GPU a device-map value names (``3`` or ``"cuda:3"``), else None (``cpu``, ``mps``, ``disk``, …)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, str) and v.startswith("cuda:") and v[5:].isdigit():
        return int(v[5:])
    return None


def resolve_placement(device_map, max_memory):
    """``--device-map`` / ``--max-memory`` as Accelerate takes them for this process: parsed, checked against the
    devices here (:func:`check_devices_exist`) and, under several ranks per node, rewritten onto this rank's GPUs
    (:func:`placement_for_this_rank`) — the one path a load and a placement plan share."""
    dm, mm = parse_device_map(device_map), parse_max_memory(max_memory)
    if mm is not None and dm is None:
        raise BiaslabError("--max-memory limits a --device-map; give --device-map auto (or another map) with it")
    check_devices_exist(dm, mm)
    return placement_for_this_rank(dm, mm)


def check_devices_exist(dm, mm) -> None:
    """The GPUs a device map or ``--max-memory`` names exist here (one process; under several ranks per node their
    numbers count within each rank's block, checked by :func:`place_on_share`), so a map made for another machine
    is one line, not a CUDA assertion from inside torch."""
    import torch

    from .. import distributed as D

    if D.uses_gpu_share():
        return
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    named = list(dm.items()) if isinstance(dm, dict) else []
    named = [(f"--device-map: module {module!r} →", v) for module, v in named]
    named += [("--max-memory names", k) for k in (mm or {}) if isinstance(k, int)]
    for where, v in named:
        if isinstance(v, str) and v.strip() in ("cpu", "mps", "cuda") or isinstance(v, torch.device):
            if str(v).strip() == "cuda" and n == 0:
                raise BiaslabError(f"{where} cuda, but torch {torch.__version__} sees no CUDA device here; "
                                   "map it to cpu or leave --device-map out")
            continue
        if isinstance(v, str) and v.strip() == "disk":
            raise BiaslabError(f"{where} disk: biaslab never offloads weights to disk; map it to a GPU or cpu")
        idx = gpu_index(v)
        if idx is None:
            raise BiaslabError(f"{where} {v!r}: expected a GPU number (0, 1, …), 'cuda:N', 'cpu' or 'mps'")
        if idx >= n:
            seen = f"{n} GPU{'s' if n != 1 else ''} (0 … {n - 1})" if n else f"no CUDA device (torch {torch.__version__})"
            raise BiaslabError(f"{where} GPU {idx}, but this machine has {seen}; change the map or --max-memory")


def memory_error(e: Exception, device_map, max_memory) -> BiaslabError:
    msg = str(e)
    return BiaslabError(f"the model does not fit with --device-map {device_map}"
                        + (f" and --max-memory {max_memory}" if max_memory else "") +
                        f": {msg[:300]} — give more devices or memory (--max-memory), or a smaller --dtype")


def _size(n: float) -> str:
    """Bytes in binary units: 512 B, 9.8 KiB, 6.1 MiB, 70.0 GiB."""
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TiB"


def meta_model(config_dir, dtype=None):
    """The model of ``config_dir``'s config.json built on the meta device (no weights: seconds, even for 70 B), in
    ``dtype`` when given; never the directory's own code."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cfg = AutoConfig.from_pretrained(config_dir, local_files_only=True, trust_remote_code=False)
    auto = AutoModelForSeq2SeqLM if getattr(cfg, "is_encoder_decoder", False) else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(cfg, trust_remote_code=False)
    return model if dtype is None else model.to(dtype)


def check_map_covers(dm, config_dir, model=None) -> None:
    """A JSON ``--device-map`` names only modules the model has and places every weight (``""`` places the rest),
    checked before anything loads on :func:`meta_model` (or the meta ``model`` given): a misspelt module or a
    forgotten ``lm_head`` would otherwise show up after the weights loaded, or not at all. A config that cannot be
    built here leaves the check to transformers."""
    if not isinstance(dm, dict) or set(dm) == {""}:
        return
    import difflib

    if model is None:
        try:
            model = meta_model(config_dir)
        except Exception:  # noqa: BLE001 - an unusual config: transformers' own checks apply
            return
    weights = [n for n, _ in model.named_parameters()]
    modules = {n for n, _ in model.named_modules()} | set(weights)
    for key in dm:
        if key and key not in modules:
            near = difflib.get_close_matches(key, sorted(modules), n=1)
            raise BiaslabError(f"--device-map names {key!r}, which this model does not have"
                               + (f" (did you mean {near[0]!r}?)" if near else "")
                               + "; module names are those of model.named_modules(), e.g. model.layers.0")
    left = [] if "" in dm else [n for n in weights if not any(n == k or n.startswith(k + ".") for k in dm)]
    if left:
        top = sorted({".".join(n.split(".")[:2]) for n in left})[:3]
        raise BiaslabError(f"--device-map places no device for {len(left)} of the model's weights (first: {left[0]}): "
                           f"add their modules (e.g. {', '.join(repr(t) for t in top)}) or \"\": <device> for the rest")


class _DiskOffloadNotice:
    """Drops Accelerate's "Some parameters are on the meta device because they were offloaded to the disk" warning:
    biaslab never offloads to disk, and :func:`check_all_placed` turns that case into the "does not fit" error."""

    def filter(self, record) -> bool:
        return "offloaded to the" not in (msg := record.getMessage()) or "disk" not in msg


@contextlib.contextmanager
def no_disk_offload_notice(active: bool = True):
    """While a model loads under a device map, without Accelerate's disk-offload warning (see above)."""
    if not active:
        yield
        return
    log = logging.getLogger("accelerate.big_modeling")
    f = _DiskOffloadNotice()
    log.addFilter(f)
    try:
        yield
    finally:
        log.removeFilter(f)


def check_all_placed(model, device_map, max_memory, budget: dict | None = None) -> None:
    """Refuse a model some of whose weights found no device: Accelerate sends what the devices cannot hold to
    ``disk`` and, without an offload folder, leaves it as data-less meta tensors that fail only at the first forward
    pass. biaslab never offloads to disk, so this is the "does not fit" error, with how much is missing and what
    each device could hold (Accelerate's reading of ``budget``, the parsed max_memory, or the free memory when
    there is none). ``device_map`` and ``max_memory`` are the user's words, for the message."""
    import itertools

    left = [(n, t.numel() * t.element_size()) for n, t in itertools.chain(model.named_parameters(),
                                                                          model.named_buffers())
            if t.device.type == "meta"]
    if not left:
        return
    from accelerate.utils import get_max_memory

    caps = get_max_memory(dict(budget) if budget else None)
    held = ", ".join(f"{'GPU ' if isinstance(k, int) else ''}{k} {_size(v)}" for k, v in caps.items()
                     if k != "disk")
    missing = sum(b for _, b in left)
    raise BiaslabError(
        f"the model does not fit with --device-map {device_map}" + (f" and --max-memory {max_memory}" if max_memory
                                                                     else "") +
        f": {_size(missing)} of weights ({len(left)} tensors, first {left[0][0]}) found no room on the devices "
        f"(they could hold: {held}) and would have gone to disk, which biaslab does not use — give the devices "
        f"at least {_size(missing)} more (--max-memory), more GPUs, or a smaller --dtype")


def _own(share: list[int], i: int, flag: str) -> int:
    if not 0 <= i < len(share):
        raise BiaslabError(f"{flag} names GPU {i}, but each process of this run owns {len(share)} GPU(s) (this one: "
                           f"GPUs {share}) — under several processes per node, GPU numbers in --device-map and "
                           f"--max-memory count within a process's own GPUs (0 … {len(share) - 1})")
    return share[i]


def place_on_share(dm, mm, share: list[int], *, free_gpu, cpu_free: int, ranks_on_node: int):
    """``(device_map, max_memory)`` for one of ``ranks_on_node`` ranks that owns the GPUs ``share``.

    GPU numbers the user gave count within the share (GPU ``i`` is ``share[i]``), so one command line serves every
    rank. A strategy (``auto``, ``balanced`` …) gets a ``max_memory`` that lists only the share — each GPU capped by
    the user's ``--max-memory`` entry or its free memory ``free_gpu(index)`` — and, unless the user capped it, a
    ``1/ranks_on_node`` part of the free host memory ``cpu_free`` (every rank holds a whole copy of the model)."""
    mm = dict(mm or {})
    ints = {k: v for k, v in mm.items() if isinstance(k, int)}
    for k in ints:
        _own(share, k, "--max-memory")
    if isinstance(dm, dict):
        def move(v):
            i = gpu_index(v)
            if i is None:
                return v
            g = _own(share, i, "--device-map")
            return g if isinstance(v, int) else f"cuda:{g}"
        out_mm = ({share[k]: v for k, v in ints.items()} | {k: v for k, v in mm.items() if not isinstance(k, int)}
                  if mm else None)
        return {k: move(v) for k, v in dm.items()}, out_mm
    out = {g: ints.get(i, free_gpu(g)) for i, g in enumerate(share)}
    out["cpu"] = mm.get("cpu", cpu_free // max(1, ranks_on_node))
    if "disk" in mm:
        out["disk"] = mm["disk"]
    return dm, out


def placement_for_this_rank(dm, mm):
    """:func:`place_on_share` for this process when it is one of several NCCL ranks and a device map was asked
    for; otherwise ``(dm, mm)`` unchanged (one process, or gloo on CPUs, places as Accelerate would)."""
    from .. import distributed as D

    if dm is None or not D.uses_gpu_share():
        return dm, mm
    import os

    import psutil
    import torch

    return place_on_share(dm, mm, D.node_share(), free_gpu=lambda g: torch.cuda.mem_get_info(g)[0],
                          cpu_free=psutil.virtual_memory().available,
                          ranks_on_node=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
