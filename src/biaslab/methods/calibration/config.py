"""Settings of the calibration baselines: the one source of their defaults (CLI options are derived from it)."""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import BiaslabError, UnknownNameError
from ...evaluation.config import option

CONTENT_FREE = ("N/A", "", "[MASK]")     # Zhao et al. 2021, §5
PROTOCOLS = ("letter", "cloze")
PAPERS = {"cc": "Zhao et al., ICML 2021 (arXiv 2102.09690): contextual calibration",
          "dc": "Fei et al., ACL 2023 (arXiv 2305.19148): domain-context calibration"}


@dataclass(frozen=True)
class CalibrationConfig:
    instructions: int | None = option(None, "instruction paraphrases used (default: all the task's own)")
    protocol: str = option("letter", "letter | cloze (single answer token per option; option-loglik cannot be "
                                     "calibrated by a per-token correction)")
    dev_fraction: float = option(0.1, "share of the task's items in the dev split (the same split as CRISPR's)")
    split_seed: int = option(0, "seed of the dev/test split (CRISPR's default, so both evaluate the same items)")
    content_free: tuple[str, ...] = option(CONTENT_FREE, "CC: content-free inputs put in place of the item's text")
    dc_samples: int = option(20, "DC: random in-domain-word inputs averaged (Fei et al.: 20)")
    dc_seed: int = option(0, "DC: seed of the random word sampling")

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise UnknownNameError("calibration protocol", self.protocol, PROTOCOLS)
        if self.dc_samples < 1:
            raise BiaslabError(f"--dc-samples must be ≥ 1, got {self.dc_samples}")
        if not 0 < self.dev_fraction < 1:
            raise BiaslabError(f"--dev-fraction must be between 0 and 1, got {self.dev_fraction}")
