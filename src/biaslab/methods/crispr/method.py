"""CRISPR as a registered method (``biaslab mitigate crispr``): task loading, the cached fit (attribution and
the n search resume), the held-out test set, the site-matched random-pruning control, retention, and the
report's method sections. Evaluation, statistics and files are the runner's (:mod:`biaslab.evaluation`)."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from ...errors import BiaslabError
from ...evaluation.method import Method
from ...evaluation.plan import Control, EvalSet, FitResult, RetentionPlan, TaskData
from .config import METHOD_ID, PROMPT_LAYOUT, CrisprConfig, fit_settings, resolve_instructions

SEARCH_FIELDS = ("neurons", "search", "search_max", "search_tol", "search_dev_limit", "search_objective", "search_small")


class Crispr(Method):
    name = "crispr"
    version = METHOD_ID
    paper = "Yang et al., ACL 2024 (arXiv 2311.09627): bias neuron elimination"
    config_class = CrisprConfig
    summary = "Find bias neurons by attribution and prune them; evaluate before / after / random control."
    task_help = "bbq:Age | bbq:Age,Religion | bbq:all | sst2 | mc:PATH (your own multiple-choice task as JSON Lines)"
    limit_help = "held-out test items evaluated (seeded, stratified)"
    seed_help = "seed of the test-item sample and the bootstrap"
    encoder_decoder = True   # the paper's own setting: Flan-T5 / T0 (biaslab.models.seq2seq)

    def check_model(self, lm, cfg: CrisprConfig) -> None:
        from ... import attribution as attr

        if hasattr(cfg, "sites"):   # a model without that site kind is refused before the run directory (not cc/dc,
            attr.resolve_sites(lm, cfg.sites)   # which subclass this method and prune nothing)
        if getattr(lm, "is_seq2seq", False) and cfg.retention:
            alone = [b for b in cfg.retention_benchmarks if b in ("crows", "stereoset")]
            if alone:
                raise BiaslabError(f"retention benchmark(s) {', '.join(alone)} score sentences alone, which an "
                                   "encoder-decoder cannot; on a T5 model use --retention-benchmarks retention "
                                   "(or --no-retention)")

    def load_task(self, task, cfg) -> TaskData:
        from ...task_specs import load_task, task_data_files

        if not task:
            raise BiaslabError("--task is required (bbq:<Category>, bbq:all, sst2 or mc:PATH), or use --config demo")
        name, items = load_task(task) if isinstance(task, str) else ("custom", list(task))
        spec = f"mc:{Path(task[3:]).expanduser().resolve()}" if isinstance(task, str) and task.startswith("mc:") \
            else None
        return TaskData(name, items, task_data_files(task) if isinstance(task, str) else {}, spec)

    def prepare(self, cfg: CrisprConfig, task: TaskData) -> CrisprConfig:
        from .selection import check_task_items

        cfg = resolve_instructions(cfg, task.data)
        check_task_items(task.data, task.name, cfg.instructions)
        if cfg.search and cfg.search_objective == "condition-hmean":
            conds = {it.meta.get("context_condition") for it in task.data}
            if not {"ambig", "disambig"} <= conds:
                raise BiaslabError(f"--search-objective condition-hmean needs BBQ items with both ambiguous and "
                                   f"disambiguated contexts; task {task.name!r} has context_condition values "
                                   f"{sorted(map(str, conds))}")
        return cfg

    # ------------------------------------------------------------------------------------------------ fit
    def fit(self, lm, task: TaskData, cfg: CrisprConfig, *, seed: int, cache, log) -> FitResult:
        from ... import attribution as attr
        from .fitting import fit_details
        from .scores import trial_scores
        from .selection import split_dev_test

        settings = {k: v for k, v in fit_settings(cfg).items() if k not in SEARCH_FIELDS}
        key = hashlib.sha256(json.dumps({"model": lm.spec, **lm.identity(), "task": task.name,
                                         "layout": PROMPT_LAYOUT, "cfg": settings}, sort_keys=True).encode()).hexdigest()
        cached = cache.load_tensors("attribution.safetensors", key)
        if cached is None:
            dev, _ = split_dev_test(task.data, dev_fraction=cfg.dev_fraction, seed=cfg.split_seed)
            scores, trials = trial_scores(lm, dev, cfg)
            cache.save_tensors("attribution.safetensors", key, scores, trials)
        else:
            (scores, trials) = cached
            log("reusing cached attribution scores")
        skey = [key, cfg.search_dev_limit, cfg.search_objective]
        search_cache = {int(k): v for k, v in (cache.load_json("search.json", skey) or {}).items()} if cfg.search else {}

        def on_step(n, value, all_values):
            log(f"  dev search: n={n:>3}  dev {cfg.search_objective} {value:.4f}", markup=False)
            cache.save_json("search.json", skey, {str(k): v for k, v in sorted(all_values.items())})

        res = fit_details(lm, task.data, cfg, task=task.name, scores=scores, trials_info=trials,
                          search_cache=search_cache, on_search_step=on_step)
        patch = res.patch
        site_of = {s.name: s for s in attr.resolve_sites(lm, cfg.sites)}
        per_layer, per_expert = Counter(), Counter()
        for name, v in patch.units.items():
            per_layer[site_of[name].layer] += int(v.numel())
            if site_of[name].expert_width:      # MoE: unit e·I + i is expert e's neuron i (models/experts.py)
                per_expert.update(f"{site_of[name].layer}.{int(u) // site_of[name].expert_width}" for u in v)
        notes = []
        if patch.n_neurons == 0:
            notes.append("n = 0: no number of pruned neurons beat the unpruned model on the dev objective, so the "
                         "patch is empty and 'after' equals 'before'")
        half = lm.identity().get("dtype")
        if half:
            notes.append(f"attributed in {half}: it keeps the ranking of the neurons (Spearman "
                         "0.98-0.995 against float32 on the default model) but the few pruned can differ from a "
                         "float32 fit's (experiments/crispr/bf16_attribution.md); --dtype float32 reproduces one, "
                         "and its patch applies to this load")
        if cfg.search and res.n == cfg.search_max:
            notes.append(f"the chosen n is the upper end of the search interval ({cfg.search_max}); a wider interval "
                         "may do better")
        details = {"n_neurons": patch.n_neurons, "chosen_n": res.n,
                   "neurons_per_layer": {str(k): per_layer[k] for k in sorted(per_layer)},
                   **({"neurons_per_expert": {k: per_expert[k] for k in sorted(
                       per_expert, key=lambda k: tuple(map(int, k.split("."))))}} if per_expert else {}),
                   "search": ({"dev_objective": {str(k): v for k, v in sorted(res.search.items())},
                               "objective": cfg.search_objective} if res.search else {"fixed": True}),
                   "attribution": {"trials": res.trials, "convention": cfg.convention},
                   "split": {k: patch.provenance[k] for k in ("n_dev", "n_test", "dev_ids_hash", "test_ids_hash")}}
        return FitResult(patch, details, notes, list(patch.params.get("deviations", [])))

    def headline(self, summary: dict) -> str:
        d = summary["details"]
        how = "the dev search" if "dev_objective" in d.get("search", {}) else "a fixed n"
        return f"{d['n_neurons']} neurons pruned (n chosen by {how})"

    # ------------------------------------------------------------------------------------------------ evaluation
    def evaluation(self, lm, task: TaskData, cfg: CrisprConfig, fit: FitResult, *, limit, seed) -> list[EvalSet]:
        from ...tasks import protocol_id, score_mc
        from .metrics import task_metrics
        from .selection import sample_items, split_dev_test

        _, test = split_dev_test(task.data, dev_fraction=cfg.dev_fraction, seed=cfg.split_seed)
        items = sample_items(test, limit, seed)
        instr = list(range(cfg.instructions))
        return [EvalSet("test", items, lambda lm_, part: score_mc(lm_, part, instr, protocol=cfg.protocol, desc="test"),
                        task_metrics(task.name, items), protocol=protocol_id(cfg.protocol), chunk=32,
                        item_id=lambda it: it.id)]

    def metrics_for(self, task: TaskData, cfg: CrisprConfig) -> dict[str, list]:
        from .metrics import task_metrics

        return {"test": task_metrics(task.name, task.data)}

    def controls(self, lm, task: TaskData, cfg: CrisprConfig, fit: FitResult) -> list[Control]:
        out = self._random_control(lm, cfg, fit) if cfg.control_seeds else []
        out += self._baselines(lm, task, cfg) if cfg.baselines else []
        if cfg.constant_controls:
            from ...tasks import LETTERS
            from .metrics import constant_answer

            n_opt = max(len(it.options) for it in task.data)
            answers = list(range(n_opt)) + (["unknown"] if all("unknown" in it.meta for it in task.data) else [])
            for a in answers:
                name = f"always_{'unknown' if a == 'unknown' else LETTERS[a]}"
                out.append(Control(name, f"always answering {'“unknown”' if a == 'unknown' else 'option ' + LETTERS[a]}"
                                   " (no model: the before records with a constant answer)",
                                   derive=lambda before, a=a: {"test": constant_answer(before["test"], a)}))
        return out

    def planned_control_states(self, cfg: CrisprConfig) -> int:
        # constant-answer controls are derived from the before records, not scored
        return cfg.control_seeds + len(getattr(cfg, "baselines", ()))

    def _baselines(self, lm, task: TaskData, cfg: CrisprConfig) -> list[Control]:
        """The paper's Table 1 baselines: contextual and domain-context calibration, fitted on the same dev split
        and scored on the same test items."""
        from ..calibration.config import PAPERS, CalibrationConfig
        from ..calibration.fitting import content_free_probs
        from ..calibration.patch import CalibrationPatch
        from .selection import split_dev_test

        dev, _ = split_dev_test(task.data, dev_fraction=cfg.dev_fraction, seed=cfg.split_seed)
        ccfg = CalibrationConfig(instructions=cfg.instructions, protocol=cfg.protocol, dev_fraction=cfg.dev_fraction,
                                 split_seed=cfg.split_seed)
        out = []
        for b in cfg.baselines:
            tokens, p_cf, _ = content_free_probs(lm, b, dev, ccfg, list(range(cfg.instructions)))
            patch = CalibrationPatch.from_probs(lm, tokens, p_cf, params={"method": b, "protocol": cfg.protocol})
            out.append(Control(b, f"{PAPERS[b]} (p_cf {[round(x, 3) for x in patch.params['p_cf']]})", [patch]))
        return out

    def _random_control(self, lm, cfg: CrisprConfig, fit: FitResult) -> list[Control]:
        from ... import attribution as attr
        from ...patches import NeuronMaskPatch
        from .selection import random_units

        patch = fit.patch
        counts = {k: int(v.numel()) for k, v in patch.units.items()}
        chosen = {k: v.tolist() for k, v in patch.units.items()}
        sizes = {s.name: s.n_units for s in attr.resolve_sites(lm, cfg.sites)}
        members = [NeuronMaskPatch.from_units(lm, random_units(sizes, counts, s, exclude=chosen), sites=cfg.sites,
                                              params={"method": "random-control", "seed": s,
                                                      "matched_to": "crispr site counts"})
                   for s in range(cfg.control_seeds)]
        return [Control("random", "per site, as many uniformly random units as CRISPR pruned there (never CRISPR's "
                        f"own units), {cfg.control_seeds} seeds pooled", members,
                        labels=[f"seed{s}" for s in range(cfg.control_seeds)])]

    def retention(self, cfg: CrisprConfig) -> RetentionPlan | None:
        return RetentionPlan(tuple(cfg.retention_benchmarks), cfg.retention_limit) if cfg.retention else None

    # ------------------------------------------------------------------------------------------------ report
    def report_sections(self, summary: dict, out: Path) -> list[tuple[str, str]]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from ...report import figure

        d = summary["details"]
        per_layer = d.get("neurons_per_layer", {})
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
        layers = sorted(int(k) for k in per_layer)
        n_layers = max(layers) + 1 if layers else 1
        axes[0].bar(range(n_layers), [per_layer.get(str(i), 0) for i in range(n_layers)], color="#b00020")
        axes[0].set_xlabel("layer")
        axes[0].set_ylabel("pruned bias neurons")
        axes[0].set_title(f"{d['n_neurons']} bias neurons ({summary['config']['sites']} sites)")
        srch = d.get("search", {}).get("dev_objective")
        if srch:
            xs = sorted(int(k) for k in srch)
            axes[1].plot(xs, [srch[str(x)] for x in xs], "o-")
            axes[1].axvline(d["chosen_n"], color="#b00020", ls="--")
            axes[1].set_xlabel("n pruned")
            axes[1].set_ylabel(f"dev {d['search']['objective']}")
            axes[1].set_title("search on dev")
        else:
            axes[1].axis("off")
            axes[1].text(0.1, 0.5, f"n fixed at {d['chosen_n']}")
        return [("Bias neurons per layer", figure(fig, alt="bias neurons per layer")
                 + f"<p class='note'>convention {d['attribution']['convention']}; dev/test split "
                   f"{d['split']['n_dev']}/{d['split']['n_test']} items</p>")]
