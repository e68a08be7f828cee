"""Patches: the saved result of a mitigation, applied and removed reversibly, loadable onto any copy of
the base model (and refused on any other).

File format: one ``.safetensors`` file. Tensors hold the patch's data; the metadata holds ``biaslab.kind``
and ``biaslab.meta`` (JSON: params, provenance, base model spec and fingerprint).

Kinds: ``neuron-mask`` (CRISPR, here), ``weights`` (replacement values of named parameters: FAST's FT-L baseline,
here), ``stamp`` (FAST, biaslab.methods.fast.stamp), ``lora`` (SR_LLM, biaslab.methods.srllm.lora). Kinds register
lazily, so loading a mask never imports peft.
"""
from __future__ import annotations

import contextlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import BiaslabError, PatchMismatchError
from .progress import library_bars
from .registry import LazyRegistry

PATCH_KINDS = LazyRegistry("patch kind", {
    "neuron-mask": "biaslab.patches:NeuronMaskPatch",
    "stamp": "biaslab.methods.fast.stamp:StampPatch",
    "lora": "biaslab.methods.srllm.lora:LoraPatch",
    "weights": "biaslab.patches:WeightsPatch",
    "calibration": "biaslab.methods.calibration.patch:CalibrationPatch",
})


class Patch:
    kind: str = ""
    exportable: bool = True

    def __init__(self, *, base_fingerprint: str, base_spec: str = "", params: dict | None = None,
                 provenance: dict | None = None, tensors: dict[str, torch.Tensor] | None = None):
        self.base_fingerprint = base_fingerprint
        self.base_spec = base_spec
        self.params = params or {}
        self.provenance = provenance or {}
        self.tensors = tensors or {}

    # ---- identity
    def describe(self) -> dict:
        return {"kind": self.kind, "base_spec": self.base_spec, "base_fingerprint": self.base_fingerprint,
                "params": self.params, "provenance": self.provenance}

    def check_base(self, lm) -> None:
        if lm.fingerprint != self.base_fingerprint:
            raise PatchMismatchError(
                f"this {self.kind} patch was made for base model {self.base_spec or '?'} "
                f"({self.base_fingerprint}), but the loaded model {lm.spec} has fingerprint {lm.fingerprint}; "
                "a patch only loads onto the exact base model it was made for.")

    # ---- apply / remove
    def validate(self) -> "Patch":
        """Check the patch's own tensors and params (dtype, rank, ranges, pairing) — without a model. Called when a
        patch is loaded and before it is applied; a kind overrides it. Returns self."""
        for k, v in self.tensors.items():
            if not torch.is_tensor(v):
                raise BiaslabError(f"{self.kind} patch: {k} is not a tensor")
        return self

    @contextmanager
    def applied(self, lm):
        """Apply to ``lm`` for the duration of the block; every weight is restored bit-for-bit on exit. Everything
        is validated before the model is touched, so a patch that does not fit leaves the model as it was."""
        self.check_base(lm)
        self.validate()
        undo = self._apply(lm)
        try:
            yield lm
        finally:
            undo()

    def _apply(self, lm):  # returns an undo callable
        raise NotImplementedError

    def is_identity(self) -> bool:
        """True when applying the patch changes nothing (the runner then reuses the unpatched records)."""
        return False

    EXPORT_PROBE = "The doctor told the nurse that the results would be ready by Friday."
    EXPORT_ATOL = 1e-3    # |logit| difference allowed between the exported directory and the patched model

    def export_target(self, out_dir, *, force: bool = False) -> tuple[Path, list[str], bool]:
        """(the export directory, what it already holds, whether it is an export of biaslab's own), or the one-line
        refusal — a patch that cannot be exported, a directory biaslab did not create — before any model loads."""
        from .outputs import check_target

        if not self.exportable:
            why = self.export_refusal()
            raise BiaslabError(f"a {self.kind} patch cannot be exported to a plain model directory" +
                               (f": {why}" if why else ""))
        out = check_target(out_dir).absolute()
        existing = sorted(x.name for x in out.iterdir()) if out.is_dir() else []
        own = _own_export(out, existing)
        if existing and not own and not force:
            raise BiaslabError(f"{out} is not empty and is not a biaslab export (it holds {', '.join(existing[:5])}"
                               f"{' …' if len(existing) > 5 else ''}); choose a new --out (biaslab never deletes a "
                               "directory it did not create; --force adds the export's files beside them)")
        return out, existing, own

    def export(self, lm, out_dir, *, verify: bool = True, force: bool = False, summary: dict | None = None) -> Path:
        """Bake into a plain Hugging Face model directory (loads with transformers alone).

        With ``verify`` (default) the written directory is loaded back with transformers alone (the model's own
        class, no biaslab hooks) and its logits on :attr:`EXPORT_PROBE` are compared with the patched model's;
        a difference above :attr:`EXPORT_ATOL` is an error and nothing is written to ``out_dir``. The check is
        recorded in ``biaslab_patch.json`` (``export_check``).

        ``out_dir`` must be new, empty, or a previous export of biaslab's own (replaced). A directory biaslab did
        not create is refused; with ``force`` the export's files are added to it, but never over a file that is
        already there, and nothing in it is deleted. A model card (``README.md``) is written with it; ``summary`` (the
        run's summary.json) adds the before / after evidence to the card."""
        import shutil

        from .outputs import EXPORT_MARK

        out, existing, own = self.export_target(out_dir, force=force)
        self.check_base(lm)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        info = self.describe()
        try:
            # a patch that cannot live in the weights (a scoring-time calibration) exports the base model and a note
            with self.applied(lm) if self.bakes_into_weights else contextlib.nullcontext():
                model = self._export_model(lm)
                with library_bars(label="writing the exported model"):
                    model.save_pretrained(tmp)
                lm.tokenizer.save_pretrained(tmp)
                self._export_notes(tmp)
                for f in getattr(lm, "license_files", []):   # e.g. Gemma's NOTICE and terms: a derivative carries them
                    shutil.copyfile(f, tmp / Path(f).name)
                if verify:
                    info["export_check"] = self._verify_export(lm, tmp)
            from .signoff.model_card import model_card

            (tmp / "README.md").write_text(model_card(self, summary, export_check=info.get("export_check"),
                                                      license_files=[Path(f).name for f in
                                                                     getattr(lm, "license_files", [])]),
                                           encoding="utf-8")
            info["export_files"] = sorted(x.name for x in tmp.iterdir()) + [EXPORT_MARK]
            info["export_created_directory"] = not existing   # only then may a later export replace it whole
            (tmp / EXPORT_MARK).write_text(json.dumps(info, indent=2))
            if not existing:
                if out.exists():
                    out.rmdir()
                os.replace(tmp, out)
            elif own:  # a previous export of biaslab's own: replaced whole
                shutil.rmtree(out)
                os.replace(tmp, out)
            else:      # --force into a directory biaslab did not create: add files, overwrite none
                clash = sorted(x.name for x in tmp.iterdir() if (out / x.name).exists())
                if clash:
                    raise BiaslabError(f"{out} already holds {', '.join(clash)}, which the export would overwrite; "
                                       "choose a new --out")
                for x in tmp.iterdir():
                    os.replace(x, out / x.name)
                tmp.rmdir()
        except OSError as e:
            raise BiaslabError(f"cannot write the export to {out}: {e.strerror or e}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)   # nothing half-written is left behind
        return out

    def _verify_export(self, lm, path: Path) -> dict:
        """Max |logit| difference on the probe between ``path`` loaded by transformers and the patched ``lm``."""
        from .models.embedded import PLAIN_TORCH

        ids = torch.tensor([lm.encode(self.EXPORT_PROBE)], device=lm.device)

        def logits(model):
            kw = {"decoder_input_ids": ids[:, :1]} if getattr(model.config, "is_encoder_decoder", False) else {}
            with torch.no_grad():
                return model(input_ids=ids, **kw).logits.float()

        want = logits(lm.model)
        placed = getattr(lm.model, "hf_device_map", None) if getattr(lm, "device_map", None) else None
        # a model spread over devices: the export is reloaded with the same map (not gathered onto one device)
        with library_bars(label="reloading the export with transformers alone"):
            plain = type(lm.model).from_pretrained(path, dtype=lm.model.dtype, local_files_only=True, **PLAIN_TORCH,
                                                   **({"device_map": placed} if placed else {}))
        plain = (plain if placed else plain.to(lm.device)).eval()
        try:
            diff = float((logits(plain) - want).abs().max())
        finally:
            del plain
        if not diff <= self.EXPORT_ATOL:
            raise BiaslabError(f"export check failed: the exported model's logits differ from the patched model's by "
                               f"{diff:.3g} (allowed {self.EXPORT_ATOL:g}) on the probe sentence; nothing was written")
        return {"probe": self.EXPORT_PROBE, "max_abs_logit_diff": diff, "atol": self.EXPORT_ATOL,
                "loaded_with": f"transformers {type(lm.model).__name__}.from_pretrained"
                               + (" with the same device map" if placed else "")}

    def _export_model(self, lm):
        return lm.model

    bakes_into_weights = True   # False: export writes the base model unchanged plus the patch as a note

    def _export_notes(self, directory: Path) -> None:
        """Extra files an export carries (a patch that is not in the weights describes itself here)."""

    def export_refusal(self) -> str:
        """Why this patch is not exportable, and what to do instead ('' when it is)."""
        return ""

    # ---- file I/O
    def save(self, path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
        if not tensors:
            tensors = {"_empty": torch.zeros(0)}
        meta = {"biaslab.kind": self.kind, "biaslab.meta": json.dumps(self.describe())}
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
        return path


def _own_export(out: Path, existing: list[str]) -> bool:
    """A directory biaslab's export created and that holds nothing but the files that export wrote."""
    from .outputs import EXPORT_MARK

    if EXPORT_MARK not in existing:
        return False
    try:
        info = json.loads((out / EXPORT_MARK).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return (isinstance(info, dict) and info.get("export_created_directory") is True
            and set(existing) <= set(info.get("export_files") or ()))


def load_patch(path) -> Patch:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise BiaslabError(f"patch file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys() if k != "_empty"}
    except Exception as e:  # safetensors raises its own error types
        raise BiaslabError(f"{path} is not a readable safetensors patch file: {e}") from None
    if "biaslab.kind" not in meta:
        raise BiaslabError(f"{path} is a safetensors file but not a biaslab patch (no 'biaslab.kind' metadata)")
    cls = PATCH_KINDS.get(meta["biaslab.kind"])
    try:
        info = json.loads(meta.get("biaslab.meta", ""))
    except ValueError:
        raise BiaslabError(f"{path}: the patch metadata 'biaslab.meta' is not JSON; the file is damaged") from None
    if not isinstance(info, dict):
        raise BiaslabError(f"{path}: the patch metadata 'biaslab.meta' is not a JSON object; the file is damaged")
    if not isinstance(info.get("base_fingerprint"), str) or not info["base_fingerprint"]:
        raise BiaslabError(f"{path}: the patch metadata has no 'base_fingerprint' (the base model it was made for); "
                           "a patch without one is never applied")
    for key in ("params", "provenance"):
        if not isinstance(info.get(key, {}), dict):
            raise BiaslabError(f"{path}: the patch metadata field {key!r} is not an object")
    try:
        return cls(base_fingerprint=info["base_fingerprint"], base_spec=str(info.get("base_spec", "")),
                   params=info.get("params", {}), provenance=info.get("provenance", {}), tensors=tensors).validate()
    except BiaslabError as e:
        raise BiaslabError(f"{path}: {e}") from None


class NeuronMaskPatch(Patch):
    """CRISPR's result: a set of pruned neurons. Tensors: ``units.<site name>`` → int64 unit indices.
    params["sites"] is the site kind (``ffn`` or ``linear``)."""

    kind = "neuron-mask"

    @classmethod
    def from_units(cls, lm, units: dict[str, list[int]], *, sites: str, params: dict | None = None,
                   provenance: dict | None = None) -> "NeuronMaskPatch":
        tensors = {f"units.{name}": torch.tensor(sorted(set(ix)), dtype=torch.long) for name, ix in units.items() if ix}
        return cls(base_fingerprint=lm.fingerprint, base_spec=lm.spec, params={"sites": sites, **(params or {})},
                   provenance=provenance, tensors=tensors)

    @property
    def units(self) -> dict[str, torch.Tensor]:
        return {k[len("units."):]: v for k, v in self.tensors.items() if k.startswith("units.")}

    @property
    def n_neurons(self) -> int:
        return int(sum(v.numel() for v in self.units.values()))

    def is_identity(self) -> bool:
        return self.n_neurons == 0

    def validate(self) -> "NeuronMaskPatch":
        if self.params.get("sites", "ffn") not in ("ffn", "linear"):
            raise BiaslabError(f"neuron-mask patch: unknown site kind {self.params.get('sites')!r} (ffn or linear)")
        for k, v in self.tensors.items():
            if not k.startswith("units."):
                raise BiaslabError(f"neuron-mask patch: unexpected tensor {k!r} (only units.<site>)")
            if v.dtype not in (torch.int64, torch.int32) or v.dim() != 1 or v.numel() == 0:
                raise BiaslabError(f"neuron-mask patch: {k} must be a non-empty 1-D integer tensor of unit indices, "
                                   f"got dtype {v.dtype}, shape {tuple(v.shape)}")
            if int(v.min()) < 0:
                raise BiaslabError(f"neuron-mask patch: {k} holds the negative unit index {int(v.min())}")
            if v.unique().numel() != v.numel():
                raise BiaslabError(f"neuron-mask patch: {k} repeats a unit index")
        return self

    def _apply(self, lm):
        from .interventions import overwrite
        from .models.sites import site_by_name

        sites = site_by_name(lm.model, self.params.get("sites", "ffn"))
        changes = []
        for name, ix in self.units.items():   # every unit is checked before any weight is touched
            if name not in sites:
                raise BiaslabError(f"patch names site {name!r}, which this model does not have")
            site = sites[name]
            if int(ix.max()) >= site.n_units:
                raise BiaslabError(f"patch prunes unit {int(ix.max())} of {name}, which has {site.n_units}")
            changes += [(param, index, 0.0) for param, index in site.unit_weights(ix.to(site.device))]
        return overwrite(changes)


class WeightsPatch(Patch):
    """New values for named parameters of the base model (e.g. FAST's FT-L baseline: one layer's fine-tuned MLP
    weights). Tensors: ``param.<parameter name>``; applying copies them in, removing restores the saved originals
    bit for bit; exported as the model with the new values."""

    kind = "weights"

    @classmethod
    def from_state(cls, lm, state: dict, *, prefix: str = "", params: dict | None = None,
                   provenance: dict | None = None) -> "WeightsPatch":
        """``state``: {name inside ``prefix``: tensor}, e.g. an MLP's ``state_dict()`` with its module path."""
        tensors = {f"param.{prefix + '.' if prefix else ''}{k}": v.detach().cpu().clone() for k, v in state.items()}
        return cls(base_fingerprint=lm.fingerprint, base_spec=lm.spec, params=params, provenance=provenance,
                   tensors=tensors)

    def validate(self) -> "WeightsPatch":
        for k, v in self.tensors.items():
            if not k.startswith("param.") or not v.is_floating_point():
                raise BiaslabError(f"weights patch: {k!r} must be a floating-point tensor named param.<parameter>")
        return self

    def _targets(self, model) -> list[tuple[torch.Tensor, torch.Tensor]]:
        named = dict(model.named_parameters())
        out = []
        for k, v in self.tensors.items():
            name = k[len("param."):]
            if not k.startswith("param.") or name not in named:
                raise BiaslabError(f"weights patch names parameter {name!r}, which this model does not have")
            p = named[name]
            if tuple(p.shape) != tuple(v.shape):
                raise BiaslabError(f"weights patch: {name} has shape {tuple(v.shape)}, the model's {tuple(p.shape)}")
            out.append((p, v))
        return out

    def _apply(self, lm):
        from .interventions import overwrite

        return overwrite([(p, ..., v) for p, v in self._targets(lm.model)])   # validated before anything is touched
