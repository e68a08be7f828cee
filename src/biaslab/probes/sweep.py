"""The soft-prompt sweep (docs/methods/softprompt.md): seeded data subsets, seeds × learning rates, the top R runs
by validation accuracy kept, each trained prompt cached as one small file and never retrained when present."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import BiaslabError
from .data import Sentence
from .prompt_training import train_soft_prompt
from .softprompt import SoftPrompt, SoftPromptConfig

# ---------------------------------------------------------------- data subsets and the sweep
def _sample(items: list, limit: int | None, seed: int) -> list:
    if limit is None or limit >= len(items):
        return list(items)
    idx = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in idx]


def training_data(cfg: SoftPromptConfig) -> tuple[list[Sentence], list[Sentence]]:
    """Seeded subsamples of SST-5→3 train (``train_limit``) and dev (``val_limit``). Never the test split."""
    from .data import load_sst3

    return (_sample(load_sst3("train"), cfg.train_limit, cfg.data_seed),
            _sample(load_sst3("dev"), cfg.val_limit, cfg.data_seed + 1))


def data_sha() -> str:
    from ..data import data_path, sha256_file

    return sha256_file(data_path("sst", "sst5_train.tsv"))[:16] + sha256_file(data_path("sst", "sst5_dev.tsv"))[:16]


def default_cache_dir() -> Path:
    from ..models.loading import cache_dir

    return cache_dir() / "softprompts"


@dataclass
class Sweep:
    runs: list[SoftPrompt]     # every run of the sweep
    kept: list[SoftPrompt]     # top R by validation accuracy
    trained: list[str]         # ids trained now (the others came from the cache)
    files: dict[str, str]      # id -> cache file


def sweep(lm, base: SoftPromptConfig, *, seeds=(0, 1, 2), lrs=(5e-3, 1e-2), keep: int = 5,
          cache_dir: Path | str | None = None, progress: bool | None = None,
          micro_batch_size: int | None = None, log=None) -> Sweep:
    """Train (or load from the cache) one prompt per (lr, seed); keep the ``keep`` best by validation accuracy.
    Under torch.distributed the prompts to train are shared out across ranks (each is trained whole, on one rank,
    exactly as alone), then gathered on every rank. With ``micro_batch_size`` every rank trains every prompt
    together instead, each batch cut into parts shared across ranks (for sweeps with fewer prompts than ranks)."""
    if keep < 1:
        raise BiaslabError(f"--runs must be ≥ 1, got {keep}")
    if micro_batch_size is not None and not 1 <= micro_batch_size <= base.batch_size:
        raise BiaslabError(f"--micro-batch-size must be between 1 and the batch size ({base.batch_size}), "
                           f"got {micro_batch_size}")
    configs = [replace(base, lr=float(lr), seed=int(s)) for lr in lrs for s in seeds]
    if len(configs) < keep:
        raise BiaslabError(f"the sweep has {len(configs)} runs (seeds × learning rates) but --runs asks to keep {keep}")
    from .. import distributed as D

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dsha = data_sha()
    data = None
    dtype = lm.identity().get("dtype")
    paths = [cache / f"softprompt-{cfg.key(lm.fingerprint, dsha, micro_batch_size, dtype)}.safetensors" for cfg in configs]
    got: dict[int, SoftPrompt] = {}
    for k, path in enumerate(paths):
        if path.is_file():
            got[k] = SoftPrompt.load(path)
            got[k].check_base(lm)
    todo = [k for k in range(len(configs)) if k not in got]
    W, me = D.world_size(), D.rank()
    together = bool(micro_batch_size)   # every rank takes part in every prompt's batches
    if W > 1 and not together and 0 < len(todo) < W and log and D.is_main():
        log(f"{W} processes but {len(todo)} prompt(s) to train: {W - len(todo)} rank(s) idle while prompts train "
            f"(--micro-batch-size {max(1, base.batch_size // W)} shares each prompt's batches instead)")
    mine = {}
    for j, k in enumerate(todo):   # otherwise each rank trains every W-th missing prompt
        if not together and j % W != me:
            continue
        if data is None:
            data = training_data(base)
        mine[k] = train_soft_prompt(lm, configs[k], *data, progress=progress, micro_batch_size=micro_batch_size)
        mine[k].info["cache_key"] = paths[k].stem
    if W > 1 and not together:   # every rank ends with every prompt; rank 0 alone writes the cache
        for part in D.all_gather(mine):
            got.update(part)
    else:
        got.update(mine)
    runs, trained, files = [], [], {}
    for k, path in enumerate(paths):
        sp = got[k]
        if k in todo:
            if D.is_main():
                sp.save(path)
            trained.append(sp.id)
        runs.append(sp)
        files[sp.id] = str(path)
    order = sorted(runs, key=lambda r: (-(r.val_accuracy if not math.isnan(r.val_accuracy) else -1), r.config.lr, r.config.seed))
    return Sweep(runs, order[:keep], trained, files)
