"""The calibration patch (kind ``calibration``): a scoring-time correction of the answer tokens' logits.

Contextual / domain-context calibration divide each label's probability by its content-free probability p_cf and
renormalise over the labels (W = diag(p_cf)⁻¹, b = 0). Adding −log p_cf(label) to each label token's logit gives
exactly that decision and those label-renormalised probabilities, for protocols whose options are single answer
tokens (letter, cloze). The correction is a hook on the LM head's output (removed on exit), not a weight change:
most LM heads have no bias to hold it, so an export writes the base model unchanged plus ``calibration.json`` and
says so in the model card — apply ``logits[token_ids] += bias`` at inference."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ...errors import BiaslabError
from ...interventions import Hooks, Intervention
from ...patches import Patch


class CalibrationPatch(Patch):
    kind = "calibration"
    bakes_into_weights = False
    KEYS = ("token_ids", "bias")

    @classmethod
    def from_probs(cls, lm, token_ids: list[int], p_cf: list[float], *, params: dict | None = None) -> "CalibrationPatch":
        p = torch.tensor(p_cf, dtype=torch.float64)
        p = p / p.sum()
        bias = (-torch.log(p)).float()
        bias = bias - bias.mean()       # a constant shift changes nothing; centred for readability
        return cls(base_fingerprint=lm.fingerprint, base_spec=lm.spec,
                   params={"p_cf": [float(x) for x in p], **(params or {})},
                   tensors={"token_ids": torch.tensor(token_ids, dtype=torch.long), "bias": bias})

    def validate(self) -> "CalibrationPatch":
        if sorted(self.tensors) != sorted(self.KEYS):
            raise BiaslabError(f"calibration patch tensors must be token_ids and bias; got {', '.join(sorted(self.tensors))}")
        ids, b = self.tensors["token_ids"], self.tensors["bias"]
        if ids.dim() != 1 or b.dim() != 1 or ids.shape != b.shape or ids.is_floating_point() or not b.is_floating_point():
            raise BiaslabError(f"calibration patch: token_ids (long) and bias (float) must be vectors of one length; "
                               f"got {tuple(ids.shape)} and {tuple(b.shape)}")
        if not torch.isfinite(b).all():
            raise BiaslabError("calibration patch: the bias holds a non-finite value")
        return self

    def is_identity(self) -> bool:
        return bool((self.tensors["bias"] == 0).all())

    def _apply(self, lm):
        head = lm.model.get_output_embeddings()
        vocab = head.weight.shape[0]
        ids = self.tensors["token_ids"]
        if int(ids.max()) >= vocab or int(ids.min()) < 0:
            raise BiaslabError(f"calibration patch: token id {int(ids.max())} is outside this model's vocabulary ({vocab})")
        full = torch.zeros(vocab, dtype=head.weight.dtype, device=head.weight.device)
        full[ids.to(full.device)] = self.tensors["bias"].to(full)
        return Hooks([Intervention("calibration:logits", head, "add_output", lambda x, out: full.to(out.dtype))]).attach().remove

    def _export_notes(self, directory: Path) -> None:
        (directory / "calibration.json").write_text(json.dumps({
            "note": "the base model is unchanged: this calibration is applied at scoring time, "
                    "logits[..., token_ids] += bias (biaslab applies it with `biaslab audit --patch`)",
            "token_ids": self.tensors["token_ids"].tolist(), "bias": self.tensors["bias"].tolist(),
            "params": self.params}, indent=2))
