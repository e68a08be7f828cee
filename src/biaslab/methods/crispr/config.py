"""CRISPR's settings (Yang et al., ACL 2024, arXiv 2311.09627; docs/methods/crispr.md): the one source of defaults
for the Python API, config files and the CLI (``biaslab mitigate crispr --help`` lists these fields)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ...evaluation.config import option
from ...errors import BiaslabError, UnknownNameError
from ...tasks import PROTOCOL_LAYOUTS

if TYPE_CHECKING:  # pragma: no cover
    from ...tasks import MCItem

GOLDEN_RATIO = (5 ** 0.5 - 1) / 2
METHOD_ID = "crispr.v1"
CONVENTIONS = {"logprob": "logp-alpha", "prob": "p-alpha"}
SEARCH_OBJECTIVES = ("accuracy", "accuracy+goldprob", "condition-hmean")
# tasks.py; option-loglik: whole option texts; generation: attributed as option-loglik (same prompt), evaluated and
# searched by greedy generation with the released code's exact match (no match = wrong)
ATTRIBUTION_PROTOCOLS = ("letter", "cloze", "option-loglik", "generation")
# prompt layout of biaslab.tasks.render_mc's letter protocol (v2: instruction after the item, commit 9ea39bb); part of
# every attribution cache key (the config in the key names the protocol), so runs made with another layout are never reused
PROMPT_LAYOUT = PROTOCOL_LAYOUTS["letter"]



DEFAULT_RETENTION = ("crows", "stereoset", "retention")


@dataclass
class CrisprConfig:
    """Every CRISPR setting with its default (docs/methods/crispr.md explains each)."""
    sites: str = option("ffn", "ffn (FFN intermediate neurons) | linear (every linear output unit, the released code)")
    instructions: int | None = option(None, "instruction paraphrases used (default: all the task's own — the 10 "
                                          "generic ones, or an mc: task file's)")
    protocol: str = option("letter", "letter (options with letters, chat template) | cloze (plain-text completion, "
                                   "options' first words) | option-loglik (options' texts as continuations) | "
                                   "generation (the released code's evaluation: greedy ≤ 16 tokens, exact match, "
                                   "no match = wrong; attribution as option-loglik)")
    span: str = option("all", "positions reduced over: all | prompt | answer")
    reduce: str = option("max", "token reduction: max (paper) | mean (ablation)")
    objective: str = option("logprob", "logprob (convention logp-alpha, released code) | prob (p-alpha, paper literal)")
    confusion_weighting: bool = option(True, "weight instances by the confusion score α (ablation: off, α ≡ 1)")
    skill_disentanglement: bool = option(True, "subtract the gold option's attribution (ablation: off, B = A(ŷ))")
    dev_fraction: float = option(0.1, "share of the task's items in the dev split (attribution and search)")
    split_seed: int = option(0, "seed of the dev/test split")
    dev_size: int = option(20, "dev instances sampled per attribution trial")
    trials: int = option(1, "attribution trials (dev samples) averaged")
    trial_seed: int = option(0, "trial t samples its dev instances with seed trial_seed + t")
    neurons: int | None = option(None, "prune this many top bias neurons (or choose n with --search)")
    search: bool = option(False, "choose n by golden-section search on the dev objective")
    search_max: int = option(500, "upper end of the searched interval [0, max]")
    search_tol: int = option(4, "the search shrinks the interval to this width, then tries every n in it")
    search_dev_limit: int | None = option(None, "dev items scored per search step (default: the whole dev split)")
    search_objective: str = option("accuracy", "accuracy (released code) | accuracy+goldprob (ties broken by the gold "
                                             "probability; a deviation) | condition-hmean (BBQ: harmonic mean of "
                                             "ambiguous and disambiguated accuracy; a deviation)")
    search_small: int = option(0, "also try every n in 1..K on dev (a deviation; guards against plateaus)")
    token_budget: int = option(1024, "tokens per attribution batch")
    checkpoint_layers: bool = option(False, "activation checkpointing in attribution: the backward pass recomputes "
                                            "each layer instead of keeping its activations (large models; the same "
                                            "scores, about one more forward pass)")
    layers_per_pass: int | None = option(None, "layer chunking in attribution: each pass hooks the sites of this "
                                               "many consecutive layers only, so only their activations and "
                                               "gradients are held (large models, --sites linear; the same scores, "
                                               "one forward + backward per chunk; default: all layers in one pass)")
    control_seeds: int = option(3, "random-pruning control seeds (site-matched, never CRISPR's own units)")
    constant_controls: bool = option(True, "also compare with always giving the same answer (each option letter, and "
                                           "'unknown' on BBQ)")
    baselines: tuple[str, ...] = option((), "also compare with the paper's calibration baselines: cc "
                                            "(contextual), dc (domain-context); comma-separated")
    retention: bool = option(True, "audit the retention benchmarks before / after the patch")
    retention_benchmarks: tuple[str, ...] = option(DEFAULT_RETENTION, "retention benchmarks (comma-separated)")
    retention_limit: int | None = option(50, "items per retention benchmark")

    def validate(self) -> "CrisprConfig":
        from ... import attribution as attr
        from ...models.sites import SITE_KINDS

        if self.sites not in SITE_KINDS:
            raise UnknownNameError("site kind", self.sites, SITE_KINDS)
        # the upper bound is the task's own count (ten generic ones, or a task file's header): check_task_items
        if self.instructions is not None and (isinstance(self.instructions, bool) or not isinstance(self.instructions, int)
                                              or self.instructions < 1):
            raise BiaslabError(f"--instructions must be a positive number of instructions, got {self.instructions!r}")
        if self.protocol not in ATTRIBUTION_PROTOCOLS:
            raise BiaslabError("CRISPR attribution supports the task protocols "
                               f"{', '.join(map(repr, ATTRIBUTION_PROTOCOLS))} (got {self.protocol!r})")
        attr.check_options(span=self.span, reduce=self.reduce, objective=self.objective)
        if self.reduce == "sum":
            raise BiaslabError("CRISPR reduces token positions by 'max' (paper) or 'mean' (ablation), not 'sum'")
        if not 0 < self.dev_fraction < 1:
            raise BiaslabError(f"dev fraction must be in (0, 1), got {self.dev_fraction}")
        if self.dev_size < 1 or self.trials < 1:
            raise BiaslabError("--dev-size and --trials must be at least 1")
        if self.neurons is None and not self.search:
            raise BiaslabError("choose the number of neurons: --neurons N or --search")
        if self.neurons is not None and self.search:
            raise BiaslabError("--neurons and --search are exclusive")
        if self.neurons is not None and self.neurons < 0:
            raise BiaslabError(f"--neurons must be ≥ 0, got {self.neurons}")
        if self.layers_per_pass is not None and self.layers_per_pass < 1:
            raise BiaslabError(f"--layers-per-pass must be ≥ 1 (or left out for all layers in one pass), "
                               f"got {self.layers_per_pass}")
        if self.search_objective not in SEARCH_OBJECTIVES:
            raise UnknownNameError("search objective", self.search_objective, SEARCH_OBJECTIVES)
        if self.search_small < 0:
            raise BiaslabError(f"--search-small must be ≥ 0, got {self.search_small}")
        if self.search and (self.search_max < 1 or self.search_tol < 1):
            raise BiaslabError("search bounds: --search-max and the tolerance must be ≥ 1")
        if self.control_seeds < 0:
            raise BiaslabError(f"--control-seeds must be ≥ 0, got {self.control_seeds}")
        if self.retention_limit is not None and self.retention_limit < 1:
            raise BiaslabError(f"--retention-limit must be a positive number of items, got {self.retention_limit}")
        self.retention_benchmarks = tuple(self.retention_benchmarks)
        self.baselines = tuple(self.baselines)
        for b in self.baselines:
            if b not in BASELINES:
                raise UnknownNameError("CRISPR baseline", b, BASELINES)
        if self.baselines and self.protocol not in ("letter", "cloze"):
            raise BiaslabError(f"--baselines {','.join(self.baselines)}: calibration corrects single answer tokens, so it "
                               f"needs --protocol letter or cloze (got {self.protocol!r})")
        return self

    @property
    def convention(self) -> str:
        return CONVENTIONS[self.objective]


BASELINES = ("cc", "dc")
RUN_SETTINGS = ("control_seeds", "constant_controls", "baselines", "retention", "retention_benchmarks",
                "retention_limit")   # evaluation, not fit


def fit_settings(cfg: CrisprConfig) -> dict:
    """The settings that shape the fit (the patch records them; the attribution cache is keyed by them)."""
    from dataclasses import asdict

    return {k: v for k, v in asdict(cfg).items() if k not in RUN_SETTINGS}


def resolve_instructions(cfg: CrisprConfig, items: Sequence[MCItem]) -> CrisprConfig:
    """``cfg`` with ``instructions=None`` replaced by the task's own count (ten generic ones, or a task file's)."""
    from ...tasks import task_instruction_count

    return cfg if cfg.instructions is not None else replace(cfg, instructions=task_instruction_count(items))

