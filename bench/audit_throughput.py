#!/usr/bin/env python
"""Audit throughput: biaslab's scoring engine vs a plain fp32 matmul peak and vs lm-evaluation-harness.

Issue 2, "Performance". One run on this machine measures, for the embedded default model:

1. **Matmul peak** — best GFLOP/s of ``torch.matmul`` on large square fp32 matrices, same thread count, measured
   before and after the workload (the larger is the peak; the two differ when the machine is noisy).
2. **biaslab phases** on the same seeded, stratified sample of items (``Benchmark.sample``):
   BBQ default (``bbq.letter.v2``, 3 instructions = what ``biaslab audit`` runs), BBQ letter with 1 instruction,
   BBQ ``bbq.option-loglik.v2`` with 1 instruction, CrowS-Pairs (default ``crows.shared-tokens.v1``; the
   ``sum``/``mean`` protocols are post-processing of the same log-likelihoods). For each: wall time, items/s,
   tokens/s, achieved GFLOP/s and its fraction of the matmul peak, peak RSS.
3. **lm-evaluation-harness** (``lm_eval.simple_evaluate``, in-process, offline) on the *same* items: its own
   BBQ multiple-choice and CrowS-Pairs-English task definitions, pointed at local JSONL copies of the sampled
   items (``bench/lmeval_tasks/``), with the default model loaded as an HF directory from the biaslab cache.
4. **Engine replay**: biaslab's ``LanguageModel.loglikelihood`` on lm-eval's *exact* requests (same strings,
   same protocol). Log-likelihoods must agree to float noise, so lm-eval's own metric code applied to our
   numbers must give lm-eval's metric values; the wall-time ratio is engine against engine.

FLOP model (forward pass, stated in the output): ``FLOPs = 2·N_nonemb·T + 2·d·V·K`` where N_nonemb = parameters
outside the token embedding (and outside the LM head when untied), T = real (non-padding) tokens fed to the
model, K = positions the LM head runs on (biaslab runs it only where a log-prob is needed; lm-eval runs it on
every padded position), d = hidden size, V = vocabulary. Attention score/value FLOPs (``4·L·d·Σ T_row²``) are
left out of the headline and reported separately. "Useful" GFLOP/s counts real tokens only and divides by the
phase's whole wall time (tokenisation, prompt rendering and Python overhead included).

Peak RSS: ``VmHWM`` from ``/proc/self/status``, reset before each phase through ``/proc/self/clear_refs`` (so
each phase's peak is its own; the biaslab peak is the maximum over model loading and the biaslab phases, all
before lm-eval loads anything) and ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` recorded alongside.

Usage (see bench/README.md)::

    .venv/bin/python bench/audit_throughput.py --bbq-items 200 --crows-items 200 --threads 2
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import resource
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
TASK_TEMPLATES = BENCH_DIR / "lmeval_tasks"
DEFAULT_OUT = BENCH_DIR / "results" / "audit_throughput.json"
MODEL = "smollm2-135m-instruct"
TARGETS = {"bbq_speedup": 3.0, "crows_speedup": 1.5, "matmul_fraction": 0.60, "peak_rss_gb": 2.5}


# ------------------------------------------------------------------------------------------------ arguments
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bbq-items", type=int, default=200, help="BBQ items (seeded, stratified by category × context)")
    p.add_argument("--crows-items", type=int, default=200, help="CrowS-Pairs pairs (seeded, stratified by bias type)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for everything, matmul peak included")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same sample as `biaslab audit --seed`)")
    p.add_argument("--skip-lmeval", action="store_true", help="biaslab phases and matmul peak only")
    p.add_argument("--skip-variants", action="store_true",
                   help="skip the BBQ letter×1-instruction and option-loglik phases (default protocol only)")
    p.add_argument("--skip-unpacked", action="store_true",
                   help="skip the phases re-run with tree attention off (BBQ, dense-mask rows) and packing off (BBQ and "
                        "CrowS, padded batches)")
    p.add_argument("--lmeval-batch-size", type=int, default=None,
                   help="fixed lm-eval batch size (default: matched to biaslab's token budget, see README)")
    p.add_argument("--matmul-sizes", default="1024,2048", help="square sizes tried for the matmul peak")
    p.add_argument("--matmul-repeats", type=int, default=5, help="timed repeats per size (best is kept)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results (written atomically)")
    a = p.parse_args(argv)
    for name in ("bbq_items", "crows_items", "threads", "matmul_repeats"):
        if getattr(a, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(a, name)}")
    if a.lmeval_batch_size is not None and a.lmeval_batch_size <= 0:
        p.error(f"--lmeval-batch-size must be positive, got {a.lmeval_batch_size}")
    try:
        a.matmul_sizes = [int(s) for s in a.matmul_sizes.split(",") if s.strip()]
        assert a.matmul_sizes and all(s > 0 for s in a.matmul_sizes)
    except (ValueError, AssertionError):
        p.error(f"--matmul-sizes must be a comma-separated list of positive integers, got {a.matmul_sizes!r}")
    return a


# ------------------------------------------------------------------------------------------------ memory
class Memory:
    """Peak resident memory per phase: VmHWM, reset through /proc/self/clear_refs where the kernel allows it."""

    def __init__(self):
        self.can_reset = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.can_reset = True
        except OSError:
            pass

    @staticmethod
    def _status(field: str) -> float | None:
        try:
            m = re.search(rf"^{field}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
        except OSError:
            return None
        return int(m.group(1)) / 1024 if m else None

    def hwm_mb(self) -> float | None:
        return self._status("VmHWM")

    def rss_mb(self) -> float | None:
        return self._status("VmRSS")

    @staticmethod
    def ru_maxrss_mb() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r / 1024 / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS, KiB on Linux

    def reset(self) -> None:
        if self.can_reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")


# ------------------------------------------------------------------------------------------------ FLOPs
def model_dims(model) -> dict:
    cfg = model.config
    seen, total = set(), 0
    for prm in model.parameters():
        if prm.data_ptr() not in seen:
            seen.add(prm.data_ptr())
            total += prm.numel()
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.data_ptr()
    n_nonemb = total - emb.numel() - (0 if tied or head is None else head.weight.numel())
    return {"n_params": total, "n_nonembedding": n_nonemb, "tied_embeddings": tied, "layers": cfg.num_hidden_layers,
            "hidden": cfg.hidden_size, "vocab": cfg.vocab_size}


class Work:
    """Counts what the model is fed: real tokens, padded positions, LM-head positions, attention pairs."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.calls = self.real = self.padded = self.head = 0
        self.pairs_needed = self.pairs_executed = 0
        self.seq_tokens = 0  # tokens of the scored sequences before prefix sharing (= real when unpacked)
        self.forward_s = 0.0

    def add(self, real: int, positions: int, head: int, pairs_needed: int, pairs_executed: int, dt: float):
        """``real`` tokens (trie nodes when packed) in ``positions`` fed positions; attention (query, key)
        pairs: ``pairs_needed`` = those causal attention must compute (each token with itself and the tokens
        it sees), ``pairs_executed`` = what the kernels computed (dense over a padded row, or the tree plan's
        buckets)."""
        self.calls += 1
        self.real += real
        self.padded += positions
        self.head += head
        self.pairs_needed += pairs_needed
        self.pairs_executed += pairs_executed
        self.forward_s += dt

    def flops(self, dims: dict) -> dict:
        d, V, L, N = dims["hidden"], dims["vocab"], dims["layers"], dims["n_nonembedding"]
        return {"useful": 2 * N * self.real + 2 * d * V * self.head,
                "executed": 2 * N * self.padded + 2 * d * V * self.head,
                "attention_useful": 4 * L * d * self.pairs_needed,
                "attention_executed": 4 * L * d * self.pairs_executed}

    def snapshot(self) -> dict:
        return {"forward_calls": self.calls, "real_tokens": self.real, "padded_positions": self.padded,
                "lm_head_positions": self.head, "padding_share": 1 - self.real / self.padded if self.padded else None,
                "sequence_tokens": self.seq_tokens or self.real,
                "prefix_sharing_factor": round((self.seq_tokens or self.real) / self.real, 3) if self.real else None,
                "attention_pairs_needed": self.pairs_needed, "attention_pairs_executed": self.pairs_executed,
                "forward_s": round(self.forward_s, 3)}


_PACK_HOOK: dict = {}


def instrument_biaslab(lm, work: Work) -> None:
    """Count the work of every forward pass of a LanguageModel (wraps the instance's ``logits_at``).

    Padded batches: real tokens = the 2-D mask's sum. Prefix-sharing packing (dense 4-D mask rows, or the flat
    sequence of tree attention): real tokens = the trie nodes (what is computed), and the sequences' own
    lengths are counted apart (``sequence_tokens``), so GFLOP/s is always work actually done, never credited
    for shared prefixes."""
    import biaslab.models.lm as lm_mod

    _PACK_HOOK["work"] = work
    if "pack" not in _PACK_HOOK:  # wrap the engine module's packing helpers once per process
        _PACK_HOOK["pack"], _PACK_HOOK["row_tensors"] = lm_mod.pack, lm_mod.row_tensors
        _PACK_HOOK["tree_plan"] = lm_mod.tree_plan

        def pack_counted(seqs, *a, **kw):
            _PACK_HOOK["work"].seq_tokens += sum(len(x) for x in seqs)
            return _PACK_HOOK["pack"](seqs, *a, **kw)

        def rows_counted(rows, *a, **kw):
            out = _PACK_HOOK["row_tensors"](rows, *a, **kw)
            width = out[0].shape[1]
            _PACK_HOOK["last"] = (sum(len(r) for r in rows), width * len(rows),
                                  sum(d + 1 for r in rows for d in r.depth), width * width * len(rows))
            return out

        def plan_counted(rows, *a, **kw):
            out = _PACK_HOOK["tree_plan"](rows, *a, **kw)
            plan = out[3]
            _PACK_HOOK["last"] = (plan.n_nodes, plan.n_nodes, plan.pairs_needed, plan.pairs_executed)
            return out

        lm_mod.pack, lm_mod.row_tensors, lm_mod.tree_plan = pack_counted, rows_counted, plan_counted
    orig = lm.logits_at

    def counted(input_ids, attention_mask, position_ids, rows, cols, **kw):
        t0 = time.perf_counter()
        out = orig(input_ids, attention_mask, position_ids, rows, cols, **kw)
        dt = time.perf_counter() - t0
        if attention_mask is None or attention_mask.dim() == 4:  # tree plan or dense-mask rows
            real, positions, needed, executed = _PACK_HOOK.pop("last")
            work.add(real, positions, len(rows), needed, executed, dt)
        else:
            lengths = attention_mask.sum(1).tolist()
            work.seq_tokens += sum(lengths)
            work.add(sum(lengths), attention_mask.numel(), len(rows), sum(n * (n + 1) // 2 for n in lengths),
                     attention_mask.shape[1] ** 2 * attention_mask.shape[0], dt)
        return out

    lm.logits_at = counted


def instrument_lmeval(hflm, work: Work, timer: dict) -> None:
    """Count lm-eval's forward passes (right-padded, no mask: every padded position runs, LM head included)
    and time its ``loglikelihood`` (tokenisation + batching + model), the engine part of a task."""
    orig_call, orig_ll = hflm._model_call, hflm.loglikelihood

    def call(inps, attn_mask=None, labels=None):
        t0 = time.perf_counter()
        out = orig_call(inps, attn_mask, labels)
        b, w = inps.shape
        work.add(b * w, b * w, b * w, b * w * (w + 1) // 2, b * w * w,  # real tokens are recounted in the replay
                 time.perf_counter() - t0)
        return out

    def loglikelihood(requests, *a, **kw):
        t0 = time.perf_counter()
        try:
            return orig_ll(requests, *a, **kw)
        finally:
            timer["loglikelihood_s"] = timer.get("loglikelihood_s", 0.0) + time.perf_counter() - t0
            timer["requests"] = timer.get("requests", 0) + len(requests)

    hflm._model_call = call
    hflm.loglikelihood = loglikelihood


def warm_up(model) -> None:
    """One small untimed forward pass (either engine), so one-time start-up costs are left out of both."""
    import torch

    if hasattr(model, "_model_call"):  # lm-eval HFLM
        model._model_call(torch.tensor([[model.prefix_token_id] * 16]))
    else:  # biaslab LanguageModel
        model.next_token_logprobs(["warm-up " * 8], ["A"], desc="warm-up")


# ------------------------------------------------------------------------------------------------ matmul peak
def matmul_peak(torch, sizes: list[int], repeats: int, min_gflop: float = 4.0) -> dict:
    """Best GFLOP/s of an fp32 N×N @ N×N matmul (2·N³ FLOPs) over sizes and repeats, after one warm-up each.

    Each timed repeat runs enough back-to-back matmuls for ``min_gflop`` GFLOP, so a single short product that
    happens to run between other processes' time slices cannot pose as the peak."""
    per = {}
    for n in sizes:
        g = torch.Generator().manual_seed(n)
        a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        out = torch.empty(n, n)
        torch.matmul(a, b, out=out)  # warm-up
        k = max(1, math.ceil(min_gflop * 1e9 / (2 * n ** 3)))
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(k):
                torch.matmul(a, b, out=out)
            best = min(best, (time.perf_counter() - t0) / k)
        per[str(n)] = round(2 * n ** 3 / best / 1e9, 2)
        del a, b, out
    return {"gflops": max(per.values()), "per_size_gflops": per}


# ------------------------------------------------------------------------------------------------ phases
def timed_phase(name: str, fn, mem: Memory, work: Work | None, dims: dict | None, n_items: int, peak: float | None,
                **extra):
    gc.collect()
    mem.reset()
    if work is not None:
        work.reset()
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    row = {"phase": name, "items": n_items, "wall_s": round(wall, 3), "items_per_s": round(n_items / wall, 3),
           "peak_rss_mb": _r(mem.hwm_mb()), "ru_maxrss_mb": _r(mem.ru_maxrss_mb()), **extra}
    if work is not None and work.calls:
        row.update(work.snapshot())
        fl = work.flops(dims)
        row["tokens_per_s"] = round(work.real / wall, 1)
        row["gflop"] = {k: round(v / 1e9, 2) for k, v in fl.items()}
        row["useful_gflops"] = round(fl["useful"] / 1e9 / wall, 2)
        row["useful_gflops_incl_attention"] = round((fl["useful"] + fl["attention_useful"]) / 1e9 / wall, 2)
        row["forward_only_gflops"] = round(fl["useful"] / 1e9 / work.forward_s, 2) if work.forward_s else None
        if peak:
            row["fraction_of_matmul_peak"] = round(row["useful_gflops"] / peak, 3)
            if row["forward_only_gflops"]:
                row["forward_only_fraction_of_peak"] = round(row["forward_only_gflops"] / peak, 3)
    return out, row


def _r(x, nd=1):
    return None if x is None else round(x, nd)


def metric_values(section: dict) -> dict:
    return {k: v.get("value") for k, v in section["metrics"].items()}


def crows_protocol_records(records: list[dict], protocol: str) -> list[dict]:
    """Records of the sum / mean protocols from the log-likelihoods the shared-token protocol already scored
    (crows.py computes the three from the same two loglikelihood calls; only the compared quantity differs)."""
    if protocol == "sum":
        return [{**r, "score_more": r["loglik_more"], "score_less": r["loglik_less"]} for r in records]
    if protocol == "mean":
        return [{**r, "score_more": r["loglik_more"] / max(r["n_tokens_more"], 1),
                 "score_less": r["loglik_less"] / max(r["n_tokens_less"], 1)} for r in records]
    raise ValueError(protocol)


# ------------------------------------------------------------------------------------------------ lm-eval data
def write_lmeval_inputs(tmp: Path, bbq_items: list[dict], crows_items: list[dict]) -> Path:
    """JSONL copies of exactly the sampled items + the task configs with their data path filled in."""
    from biaslab.benchmarks.bbq import BBQ
    from biaslab.data import read_jsonl

    data = tmp / "data"
    tasks = tmp / "tasks"
    data.mkdir(parents=True)
    tasks.mkdir(parents=True)
    raw: dict[str, dict] = {}
    wanted_cats = {d["category"] for d in bbq_items}
    bbq = BBQ()
    bbq.load_items()   # where each category comes from: upstream, or regenerated from the templates (bbq-regen-*)
    for cat, src in bbq.sources.items():
        if cat not in wanted_cats:
            continue
        prefix = "bbq-regen-" if src["label"].startswith("regenerated") else "bbq-"
        for row in read_jsonl(src["path"]):
            row = {k: v for k, v in row.items() if k != "_line"}
            raw[f"{prefix}{cat}-{row['example_id']}"] = row
    with open(data / "bbq.jsonl", "w", encoding="utf-8") as f:
        for d in bbq_items:
            f.write(json.dumps({**raw[d["id"]], "biaslab_id": d["id"]}, ensure_ascii=False) + "\n")
    with open(data / "crows.jsonl", "w", encoding="utf-8") as f:
        for d in crows_items:
            f.write(json.dumps({"biaslab_id": d["id"], "sent_more": d["sent_more"], "sent_less": d["sent_less"],
                                "stereo_antistereo": d["direction"], "bias_type": d["bias_type"]},
                               ensure_ascii=False) + "\n")
    for src in TASK_TEMPLATES.iterdir():
        if src.suffix == ".yaml":
            (tasks / src.name).write_text(src.read_text().replace("__DATA_DIR__", str(data)))
        elif src.name == "utils.py":
            shutil.copy(src, tasks / src.name)
    return tasks


def lmeval_request_lengths(tok, bbq_items: list[dict], crows_items: list[dict]) -> tuple[list[int], list[int]]:
    """Token lengths of the sequences lm-eval will build (prompt + choice), to match batch sizes before running."""
    from lm_eval.tasks.bbq.utils import UNKNOWN_RESPONSES

    bbq = []
    for d in bbq_items:
        it = d["item"]
        prompt = f"{it.context}\n\nQ: {it.question}\nA:"
        choices = [o for k, o in enumerate(it.options) if k != d["unknown"]] + list(UNKNOWN_RESPONSES)
        bbq += [len(tok(prompt + " " + c, add_special_tokens=False).input_ids) for c in choices]
    crows = [1 + len(tok(s, add_special_tokens=False).input_ids) for d in crows_items
             for s in (d["sent_more"], d["sent_less"])]
    return bbq, crows


def matched_batch_size(lengths: list[int], token_budget: int, max_batch: int) -> int:
    """A fixed batch size with biaslab's token budget at the median sequence length (lm-eval batches by count)."""
    if not lengths:
        return 1
    return int(max(1, min(max_batch, token_budget // max(1, statistics.median(lengths)))))


def lmeval_results(res: dict, task: str) -> tuple[dict, dict]:
    """(overall metrics, per-category metrics) of one lm-eval task, NaN → None."""
    out, per_cat = {}, {}
    for k, v in res["results"][task].items():
        if k.endswith(",none") and "stderr" not in k:
            name = k.split(",")[0]
            v = None if isinstance(v, float) and math.isnan(v) else v
            (per_cat if "_bias_score_" in name else out)[name] = v
    return out, per_cat


# ------------------------------------------------------------------------------------------------ replay
def bbq_lmeval_metrics_from(samples: list[dict], lls: list[list[float]]) -> dict:
    """lm-eval's own BBQ per-doc and aggregate functions applied to given option log-likelihoods."""
    from lm_eval.tasks.bbq import utils as U

    per = [U.process_results_multiple_choice(s["doc"], [(x, False) for x in ll]) for s, ll in zip(samples, lls)]
    col = lambda k: [p[k] for p in per]  # noqa: E731
    vals = {"acc": float(sum(col("acc")) / len(per)), "accuracy_amb": U.agg_accuracy_amb(col("accuracy_amb")),
            "accuracy_disamb": U.agg_accuracy_disamb(col("accuracy_disamb")),
            "amb_bias_score": U.agg_amb_bias_scores(col("amb_bias_score")),
            "disamb_bias_score": U.agg_disamb_bias_scores(col("disamb_bias_score"))}
    return {k: (None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)) for k, v in vals.items()}


def bbq_records_from_lmeval_choice(samples: list[dict], lls: list[list[float]], item_by_id: dict) -> list[dict]:
    """biaslab BBQ records from lm-eval's 12-way choice (2 named options + 10 UNKNOWN phrasings): an argmax on
    any UNKNOWN phrasing is the item's UNKNOWN option; a named option maps back to its original index."""
    from lm_eval.tasks.bbq.utils import doc_to_choice

    recs = []
    for s, ll in zip(samples, lls):
        d = item_by_id[s["doc"]["biaslab_id"]]
        it = d["item"]
        k = max(range(len(ll)), key=lambda i: (ll[i], -i))
        choices = doc_to_choice(s["doc"])
        if k >= 2:
            pred = d["unknown"]
        else:
            named = [i for i in range(len(it.options)) if i != d["unknown"]]
            hit = [i for i in named if it.options[i] == choices[k]]
            if not hit:
                raise RuntimeError(f"{it.id}: lm-eval choice {choices[k]!r} is none of the item's named options")
            pred = hit[0]
        recs.append({"id": it.id, "instruction": 0, "pred": pred, "gold": it.gold, "correct": int(pred == it.gold),
                     **it.meta})
    return recs


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    args = parse_args(argv)
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[k] = "1"
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tmp = Path(tempfile.mkdtemp(prefix="biaslab-bench-"))
    os.environ["HF_DATASETS_CACHE"] = str(tmp / "hf_datasets")  # lm-eval's json datasets: fresh, not shared
    try:
        return run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args, tmp: Path) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from biaslab.auditing import score_items, summarize
    from biaslab.benchmarks.bbq import BBQ
    from biaslab.benchmarks.crows import CrowSPairs
    from biaslab.models import load_model
    from biaslab.models.loading import embedded_model_dir
    from biaslab.runs import atomic_write_json, clean_nan, environment_info

    console = Console(width=None if sys.stdout.isatty() else 140)
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    mem = Memory()
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    result: dict = {
        "benchmark": "audit_throughput", "version": 1,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"cpu": _cpu_name(), "cpus_visible": os.cpu_count(), "threads": torch.get_num_threads(),
                    "platform": platform.platform(), "loadavg_start": [round(x, 2) for x in load_start]},
        "environment": environment_info(), "model": MODEL, "targets": TARGETS,
        "rss_reset_supported": mem.can_reset,
        "flop_formula": "FLOPs = 2*N_nonemb*T_real + 2*d*V*K_head (attention 4*L*d*sum(T_row^2) reported apart)",
    }
    try:
        from importlib.metadata import version

        result["environment"]["packages"]["lm_eval"] = version("lm_eval")
    except Exception:  # noqa: BLE001 - lm-eval is optional
        result["environment"]["packages"]["lm_eval"] = None
    console.rule(f"audit throughput — {MODEL}, {args.threads} thread(s)")
    console.print(f"load average at start: {load_start[0]:.2f} (1 min) — timings are noisy when this is high")

    # ---------------------------------------------------------------- matmul peak (before)
    mm_before = matmul_peak(torch, args.matmul_sizes, args.matmul_repeats)
    console.print(f"fp32 matmul peak (before): {mm_before['gflops']:.1f} GFLOP/s {mm_before['per_size_gflops']}")

    # ---------------------------------------------------------------- biaslab
    mem.reset()
    t0 = time.perf_counter()
    lm = load_model(MODEL, progress=False)
    load_s = time.perf_counter() - t0
    load_peak = mem.hwm_mb()
    dims = model_dims(lm.model)
    result["model_dims"] = dims
    warm_up(lm)
    work = Work()
    instrument_biaslab(lm, work)
    peak = mm_before["gflops"]

    t0 = time.perf_counter()
    bbq = BBQ()
    bbq_items = bbq.sample(bbq.load_items(), args.bbq_items, args.seed)
    crows = CrowSPairs()
    crows_items = crows.sample(crows.load_items(), args.crows_items, args.seed)
    items_s = time.perf_counter() - t0  # all vendored rows parsed + validated, then sampled (not in phase walls)
    item_by_id = {d["id"]: d for d in bbq_items}
    phases, metrics = [], {"bbq": {}, "crows": {}}
    proto = bbq.protocol()

    recs, row = timed_phase("biaslab bbq default (letter, 3 instr.)",
                            lambda: score_items(lm, bbq, bbq_items, proto), mem, work, dims, len(bbq_items), peak,
                            records=None, protocol=proto.id, instructions=bbq.opts["instructions"], scoring_mode=lm.scoring_mode())
    row["records"] = len(recs)
    t0 = time.perf_counter()
    sec = summarize(bbq, recs, proto, seed=args.seed)
    row["summarize_s"] = round(time.perf_counter() - t0, 3)
    phases.append(row)
    metrics["bbq"]["biaslab bbq.letter.v2 (3 instr., chat)"] = metric_values(sec)

    if not args.skip_unpacked:  # the same with prefix-sharing rows under a dense 4-D mask (tree attention off)
        lm.tree_attention = False
        recs_d, row = timed_phase("biaslab-dense bbq default (letter, 3 instr., dense-mask rows)",
                                  lambda: score_items(lm, bbq, bbq_items, proto), mem, work, dims, len(bbq_items),
                                  peak, protocol=proto.id, instructions=bbq.opts["instructions"],
                                  scoring_mode=lm.scoring_mode())
        row["max_abs_logprob_diff_vs_packed"] = max(
            abs(x - y) for a, b in zip(recs, recs_d) for x, y in zip(a["logprobs"], b["logprobs"]))
        row["predictions_equal_packed"] = all(a["pred"] == b["pred"] for a, b in zip(recs, recs_d))
        phases.append(row)
        lm.tree_attention = None

    if not args.skip_unpacked:  # the same default audit with prefix-sharing packing off: padded batches
        lm.packing = False
        recs_u, row = timed_phase("biaslab-unpacked bbq default (letter, 3 instr., padded batches)",
                                  lambda: score_items(lm, bbq, bbq_items, proto), mem, work, dims, len(bbq_items),
                                  peak, protocol=proto.id, instructions=bbq.opts["instructions"])
        row["max_abs_logprob_diff_vs_packed"] = max(
            abs(x - y) for a, b in zip(recs, recs_u) for x, y in zip(a["logprobs"], b["logprobs"]))
        row["predictions_equal_packed"] = all(a["pred"] == b["pred"] for a, b in zip(recs, recs_u))
        phases.append(row)
        lm.packing = None

    if not args.skip_variants:
        for pname in ("letter", "option-loglik"):
            b1 = BBQ(instructions=1)
            p1 = b1.protocol(pname)
            recs, row = timed_phase(f"biaslab bbq {pname} (1 instr.)", lambda: score_items(lm, b1, bbq_items, p1),
                                    mem, work, dims, len(bbq_items), peak, protocol=p1.id, instructions=1)
            row["records"] = len(recs)
            phases.append(row)
            metrics["bbq"][f"biaslab {p1.id} (1 instr., chat)"] = metric_values(summarize(b1, recs, p1, n_boot=0,
                                                                                            seed=args.seed))

    cproto = crows.protocol()
    crecs, row = timed_phase(f"biaslab crows ({cproto.name})", lambda: score_items(lm, crows, crows_items, cproto),
                             mem, work, dims, len(crows_items), peak, protocol=cproto.id)
    row["records"] = len(crecs)
    phases.append(row)
    if not args.skip_unpacked:
        lm.packing = False
        crecs_u, row = timed_phase(f"biaslab-unpacked crows ({cproto.name}, padded batches)",
                                   lambda: score_items(lm, crows, crows_items, cproto), mem, work, dims,
                                   len(crows_items), peak, protocol=cproto.id)
        row["max_abs_loglik_diff_vs_packed"] = max(
            max(abs(a["loglik_more"] - b["loglik_more"]), abs(a["loglik_less"] - b["loglik_less"]))
            for a, b in zip(crecs, crecs_u))
        phases.append(row)
        lm.packing = None
    metrics["crows"][f"biaslab {cproto.id}"] = metric_values(summarize(crows, crecs, cproto, n_boot=0))
    for pname in ("sum", "mean"):
        p = crows.protocol(pname)
        metrics["crows"][f"biaslab {p.id}"] = metric_values(summarize(crows, crows_protocol_records(crecs, pname), p,
                                                                      n_boot=0))
    biaslab_peak = max(x for x in [load_peak] + [p["peak_rss_mb"] for p in phases] if x is not None)
    result["biaslab"] = {"model_load_s": round(load_s, 2), "item_load_and_sample_s": round(items_s, 2), "model_load_peak_rss_mb": _r(load_peak),
                         "peak_rss_mb": _r(biaslab_peak), "ru_maxrss_mb_after_biaslab": _r(mem.ru_maxrss_mb()),
                         "token_budget": lm.token_budget, "max_batch": lm.max_batch}
    tok = lm.tokenizer
    token_budget, max_batch = lm.token_budget, lm.max_batch
    del lm
    gc.collect()

    # ---------------------------------------------------------------- lm-evaluation-harness
    lme: dict = {"skipped": True}
    replay: dict = {}
    result.update(phases=phases, metrics=metrics, status="biaslab phases done, lm-eval running")
    atomic_write_json(args.out, clean_nan(result))  # a partial record survives a crash in the lm-eval part
    if not args.skip_lmeval:
        lme, replay = _guarded_lmeval(
            args, tmp, mem, dims, peak, tok, token_budget, max_batch, bbq_items, crows_items,
            item_by_id, metrics, phases, embedded_model_dir, load_model, instrument_biaslab, bbq)
    result["lm_eval"] = lme
    result["replay"] = replay

    # ---------------------------------------------------------------- matmul peak (after)
    mm_after = matmul_peak(torch, args.matmul_sizes, args.matmul_repeats)
    best_peak = max(mm_before["gflops"], mm_after["gflops"])
    result["matmul_peak"] = {"before": mm_before, "after": mm_after, "gflops": best_peak,
                             "spread": round(abs(mm_before["gflops"] - mm_after["gflops"]) / best_peak, 3)}
    for p in phases:  # fractions against the best of the two peak measurements
        if p.get("useful_gflops") is not None:
            p["fraction_of_matmul_peak"] = round(p["useful_gflops"] / best_peak, 3)
            if p.get("forward_only_gflops"):
                p["forward_only_fraction_of_peak"] = round(p["forward_only_gflops"] / best_peak, 3)
    result["phases"] = phases
    result["metrics"] = metrics
    result["summary"] = summary = build_summary(phases, lme, replay, biaslab_peak)
    result["status"] = "finished" if "error" not in lme else "finished without lm-eval (error)"
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["total_wall_s"] = round(time.perf_counter() - t_start, 1)
    atomic_write_json(args.out, clean_nan(result))

    # ---------------------------------------------------------------- tables
    t = Table(title="phases (same items; wall time includes prompt building and tokenisation)")
    for c in ("phase", "items", "wall s", "items/s", "tokens/s", "pad %", "GFLOP/s", "% peak", "fwd % peak",
              "peak RSS MB"):
        t.add_column(c, justify="left" if c == "phase" else "right")
    for p in phases:
        t.add_row(p["phase"], str(p["items"]), f"{p['wall_s']:.1f}", f"{p['items_per_s']:.2f}",
                  _f(p.get("tokens_per_s"), "{:.0f}"), _f(p.get("padding_share"), "{:.0%}"),
                  _f(p.get("useful_gflops"), "{:.1f}"), _f(p.get("fraction_of_matmul_peak"), "{:.0%}"),
                  _f(p.get("forward_only_fraction_of_peak"), "{:.0%}"), _f(p.get("peak_rss_mb"), "{:.0f}"))
    console.print(t)
    console.print(f"fp32 matmul peak: {best_peak:.1f} GFLOP/s (before {mm_before['gflops']:.1f}, after "
                  f"{mm_after['gflops']:.1f}); FLOPs = 2·N_nonemb·T_real + 2·d·V·K_head, N_nonemb = "
                  f"{dims['n_nonembedding']:,}, d = {dims['hidden']}, V = {dims['vocab']}")
    s = Table(title="targets")
    for c in ("measure", "value", "target", "ok"):
        s.add_column(c, justify="left" if c == "measure" else "right")
    for k, v in summary.items():
        if isinstance(v, dict) and "value" in v:
            s.add_row(k, _f(v["value"], "{:.2f}"), v.get("target_text", ""),
                      {True: "yes", False: "NO", None: "–"}[v.get("ok")])
    console.print(s)
    for bench_name, cols in METRIC_COLUMNS.items():
        m = Table(title=f"{bench_name}: metric values on the same items (protocols differ; see bench/README.md)")
        m.add_column("source / protocol")
        for label, _ in cols:
            m.add_column(label, justify="right")
        for src, vals in metrics[bench_name].items():
            m.add_row(src, *[_f(_norm_metric(vals, names), "{:.3f}") for _, names in cols])
        console.print(m)
    if replay:
        for k, v in replay.items():
            console.print(f"replay {k}: max |Δ loglik| vs lm-eval = {v['max_abs_loglik_diff']:.2e}, "
                          f"argmax agreement {v['argmax_agreement']:.1%}, metrics equal: {v['metrics_equal']}")
    console.print(f"load average at end: {result['machine']['loadavg_end'][0]:.2f}; wrote {args.out}")
    return 0


def _guarded_lmeval(*a):
    """lm-eval is a third-party stack: if it fails, keep biaslab's numbers and record the error."""
    try:
        return run_lmeval(*a)
    except ImportError as e:
        msg = f"lm-eval is not installed ({e}); install it with `pip install -e '.[bench]'` or use --skip-lmeval"
    except Exception as e:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        msg = f"{type(e).__name__}: {e}"
    print(f"lm-eval part failed: {msg}", file=sys.stderr)
    return {"error": msg}, {}


def run_lmeval(args, tmp, mem, dims, peak, tok, token_budget, max_batch, bbq_items, crows_items, item_by_id,
               metrics, phases, embedded_model_dir, load_model, instrument_biaslab, bbq):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task_dir = write_lmeval_inputs(tmp, bbq_items, crows_items)
    bbq_lens, crows_lens = lmeval_request_lengths(tok, bbq_items, crows_items)
    bs = {"biaslab_bbq_local": args.lmeval_batch_size or matched_batch_size(bbq_lens, token_budget, max_batch),
          "biaslab_crows_local": args.lmeval_batch_size or matched_batch_size(crows_lens, token_budget, max_batch)}
    model_dir = embedded_model_dir(MODEL, progress=False)
    t0 = time.perf_counter()
    hflm = HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=1)
    lme = {"version": getattr(lm_eval, "__version__", None), "model_dir": str(model_dir),
           "model_load_s": round(time.perf_counter() - t0, 2), "batch_size": bs,
           "batch_size_policy": "fixed" if args.lmeval_batch_size else
           "token_budget // median request length (biaslab's budget), capped at biaslab's max_batch",
           "median_request_tokens": {"bbq": statistics.median(bbq_lens) if bbq_lens else None,
                                     "crows": statistics.median(crows_lens) if crows_lens else None},
           "tasks": {}}
    warm_up(hflm)
    work = Work()
    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    samples = {}
    n_items = {"biaslab_bbq_local": len(bbq_items), "biaslab_crows_local": len(crows_items)}
    for task in ("biaslab_bbq_local", "biaslab_crows_local"):
        hflm.batch_size_per_gpu = bs[task]
        timer: dict = {}
        instrument_lmeval(hflm, work, timer)
        res, row = timed_phase(
            f"lm-eval {task.split('_')[1]} (simple_evaluate)",
            lambda: lm_eval.simple_evaluate(model=hflm, tasks=[task], task_manager=tm, bootstrap_iters=0,
                                            log_samples=True, apply_chat_template=False, random_seed=args.seed,
                                            numpy_random_seed=args.seed, torch_random_seed=args.seed,
                                            verbosity="WARNING"),
            mem, work, dims, n_items[task], peak, batch_size=bs[task])
        hflm._model_call = type(hflm)._model_call.__get__(hflm)
        hflm.loglikelihood = type(hflm).loglikelihood.__get__(hflm)
        row["loglikelihood_s"] = round(timer.get("loglikelihood_s", 0.0), 3)
        row["requests"] = timer.get("requests", 0)
        row["note"] = "lm-eval pads on the right without a mask: every padded position (and the LM head) runs"
        phases.append(row)
        samples[task] = sorted(res["samples"][task], key=lambda s: s["doc_id"])
        overall, per_cat = lmeval_results(res, task)
        lme["tasks"][task] = {"metrics": overall, "per_category": {k: v for k, v in per_cat.items() if v is not None},
                              "n_docs": len(samples[task])}
    metrics["bbq"]["lm-eval bbq (12-way option loglik, no chat)"] = lme["tasks"]["biaslab_bbq_local"]["metrics"]
    metrics["crows"]["lm-eval crows_pairs_english (sum loglik)"] = lme["tasks"]["biaslab_crows_local"]["metrics"]
    del hflm
    gc.collect()

    # ---------------------------------------------------------------- replay lm-eval's exact requests
    lm = load_model(MODEL, progress=False, chat_template=False)
    warm_up(lm)
    work = Work()
    instrument_biaslab(lm, work)
    replay = {}
    for task, key in (("biaslab_bbq_local", "bbq"), ("biaslab_crows_local", "crows")):
        ss = samples[task]
        reqs = [tuple(a) for s in ss for a in s["arguments"]]
        theirs = [float(r[0]) for s in ss for r in s["filtered_resps"]]
        out, row = timed_phase(f"biaslab engine on lm-eval's {key} requests", lambda: lm.loglikelihood(reqs, desc=key),
                               mem, work, dims, len(ss), peak, requests=len(reqs))
        phases.append(row)
        ours = [o.logprob for o in out]
        spans, k = [], 0
        for s in ss:
            spans.append((k, k + len(s["arguments"])))
            k += len(s["arguments"])
        o_ll = [ours[a:b] for a, b in spans]
        t_ll = [theirs[a:b] for a, b in spans]
        agree = sum(_argmax(x) == _argmax(y) for x, y in zip(o_ll, t_ll)) / len(ss)
        if key == "bbq":
            ours_m = bbq_lmeval_metrics_from(ss, o_ll)
            recs = bbq_records_from_lmeval_choice(ss, o_ll, item_by_id)
            b1 = type(bbq)(instructions=1)
            metrics["bbq"]["biaslab engine, lm-eval protocol, lm-eval metric code"] = ours_m
            metrics["bbq"]["biaslab engine, lm-eval protocol, biaslab metrics"] = {
                m.name: _nan_none(m.fn(recs)) for m in b1.metric_defs(b1.protocol())}
        else:
            from lm_eval.tasks.crows_pairs.utils import process_results

            per = [process_results(s["doc"], [(x, False) for x in ll]) for s, ll in zip(ss, o_ll)]
            ours_m = {"likelihood_diff": sum(p["likelihood_diff"] for p in per) / len(per),
                      "pct_stereotype": sum(p["pct_stereotype"] for p in per) / len(per)}
            metrics["crows"]["biaslab engine, lm-eval protocol, lm-eval metric code"] = ours_m
        theirs_m = lme["tasks"][task]["metrics"]
        equal = all(_close(ours_m.get(k), v, 1e-6 if k != "likelihood_diff" else 1e-3) for k, v in theirs_m.items()
                    if k in ours_m)
        lrow = next(p for p in phases if p["phase"] == f"lm-eval {key} (simple_evaluate)")
        _fix_lmeval_row(lrow, work, dims, peak)
        replay[key] = {"requests": len(reqs), "max_abs_loglik_diff": max(abs(a - b) for a, b in zip(ours, theirs)),
                       "mean_abs_loglik_diff": sum(abs(a - b) for a, b in zip(ours, theirs)) / len(ours),
                       "argmax_agreement": agree, "metrics_equal": equal}
    del lm
    gc.collect()
    return lme, replay


def _fix_lmeval_row(row: dict, replay_work: Work, dims: dict, peak: float | None) -> None:
    """lm-eval's own forward passes only show padded positions; its real tokens and the FLOPs the job needs
    (real tokens + LM head on continuation tokens) are those of the replay of the very same requests."""
    need = replay_work.flops(dims)["useful"]
    row["real_tokens"] = replay_work.real
    row["gflop"] = {**row.get("gflop", {}), "useful": round(need / 1e9, 2)}
    row["padding_share"] = 1 - replay_work.real / row["padded_positions"] if row.get("padded_positions") else None
    row["tokens_per_s"] = round(replay_work.real / row["wall_s"], 1)
    row["useful_gflops"] = round(need / 1e9 / row["wall_s"], 2)
    row["executed_gflops"] = round(row["gflop"]["executed"] / row["wall_s"], 2)
    row["forward_only_gflops"] = round(need / 1e9 / row["forward_s"], 2) if row.get("forward_s") else None
    for k in ("useful_gflops_incl_attention", "fraction_of_matmul_peak", "forward_only_fraction_of_peak"):
        row.pop(k, None)
    if peak:
        row["fraction_of_matmul_peak"] = round(row["useful_gflops"] / peak, 3)
        if row["forward_only_gflops"]:
            row["forward_only_fraction_of_peak"] = round(row["forward_only_gflops"] / peak, 3)


def build_summary(phases: list[dict], lme: dict, replay: dict, biaslab_peak: float) -> dict:
    by = {p["phase"]: p for p in phases}
    bbq_def = next(p for p in phases if p["phase"].startswith("biaslab bbq default"))
    crows = next(p for p in phases if p["phase"].startswith("biaslab crows"))
    out: dict = {
        "bbq_items_per_s": {"value": bbq_def["items_per_s"]},
        "bbq_tokens_per_s": {"value": bbq_def.get("tokens_per_s")},
        "bbq_useful_gflops": {"value": bbq_def.get("useful_gflops")},
        "bbq_fraction_of_matmul_peak": _target(bbq_def.get("fraction_of_matmul_peak"), TARGETS["matmul_fraction"], "≥ 0.60"),
        "bbq_forward_only_fraction_of_peak": {"value": bbq_def.get("forward_only_fraction_of_peak")},
        "biaslab_peak_rss_gb": _target(biaslab_peak / 1024, TARGETS["peak_rss_gb"], "≤ 2.5", higher=False),
    }
    lb, lc = by.get("lm-eval bbq (simple_evaluate)"), by.get("lm-eval crows (simple_evaluate)")
    if lb and lc:
        one = by.get("biaslab bbq letter (1 instr.)")
        out["bbq_speedup_default_vs_default"] = _target(lb["wall_s"] / bbq_def["wall_s"], TARGETS["bbq_speedup"], "≥ 3")
        if one:
            out["bbq_speedup_letter_1instr"] = _target(lb["wall_s"] / one["wall_s"], TARGETS["bbq_speedup"], "≥ 3")
        out["crows_speedup"] = _target(lc["wall_s"] / crows["wall_s"], TARGETS["crows_speedup"], "≥ 1.5")
        rb = by.get("biaslab engine on lm-eval's bbq requests")
        rc = by.get("biaslab engine on lm-eval's crows requests")
        if rb:
            out["bbq_engine_speedup_same_requests"] = {"value": round(lb["loglikelihood_s"] / rb["wall_s"], 3)}
        if rc:
            out["crows_engine_speedup_same_requests"] = {"value": round(lc["loglikelihood_s"] / rc["wall_s"], 3)}
    ub = next((p for p in phases if p["phase"].startswith("biaslab-unpacked bbq")), None)
    uc = next((p for p in phases if p["phase"].startswith("biaslab-unpacked crows")), None)
    if ub:
        out["bbq_packing_speedup"] = {"value": round(ub["wall_s"] / bbq_def["wall_s"], 3)}
        if lb:
            out["bbq_speedup_unpacked_vs_lmeval"] = {"value": round(lb["wall_s"] / ub["wall_s"], 3)}
    if uc:
        out["crows_packing_speedup"] = {"value": round(uc["wall_s"] / crows["wall_s"], 3)}
        if lc:
            out["crows_speedup_unpacked_vs_lmeval"] = {"value": round(lc["wall_s"] / uc["wall_s"], 3)}
    return out


# printed columns: (label, [(name, scale), ...]) — biaslab's name first, lm-eval's equivalent after
METRIC_COLUMNS = {
    "bbq": [("accuracy", [("accuracy", 1), ("acc", 1)]),
            ("acc. ambig", [("accuracy_ambig", 1), ("accuracy_amb", 1)]),
            ("acc. disambig", [("accuracy_disambig", 1), ("accuracy_disamb", 1)]),
            ("s_AMB ×100", [("bias_score_ambig", 1), ("amb_bias_score", 100)]),
            ("s_DIS ×100", [("bias_score_disambig", 1), ("disamb_bias_score", 100)])],
    "crows": [("stereotype %", [("stereotype_score", 1), ("pct_stereotype", 100)]),
              ("ties %", [("tie_rate", 1)]),
              ("mean |Δ loglik|", [("likelihood_diff", 1)])],
}


def _norm_metric(vals: dict, names) -> float | None:
    for name, scale in names:
        if vals.get(name) is not None:
            return vals[name] * scale
    return None


def _target(value, target, text, higher=True):
    if value is None:
        return {"value": None, "target": target, "target_text": text, "ok": None}
    return {"value": round(value, 3), "target": target, "target_text": text,
            "ok": value >= target if higher else value <= target}


def _argmax(xs):
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


def _nan_none(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _close(a, b, tol):
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= tol


def _f(v, fmt):
    return "–" if v is None else fmt.format(v)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
