"""BBQ regenerated from the authors' templates (Parrish et al. 2022; templates and vocabularies from nyu-mll/BBQ
``templates/``, CC BY 4.0, vendored in ``biaslab/data/bbq/templates``).

:func:`generate` makes one category's rows in the upstream JSON Lines schema, with their ``target_loc`` metadata
(:mod:`.targets`). The authors drew their random fillers with an unseeded generator, so a regenerated file has the
upstream file's structure and counts but not its random draws; here every draw comes from ``random.Random`` seeded by
the category and ``seed``, and the file is reproducible byte for byte (``biaslab bbq-generate``).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
from pathlib import Path

from ...data import DATA_ROOT, sha256_file
from ...errors import BiaslabError
from .intersectional import generate_intersectional
from .single import generate_single
from .targets import target_rows
from .templates import CATEGORIES, INTERSECTIONAL, SINGLE, read_templates, read_vocabulary

TEMPLATES = DATA_ROOT / "bbq" / "templates"
GENERATOR_VERSION = "bbq-generate.v1"
PROVENANCE = "PROVENANCE.json"
TARGET_COLUMNS = ("category", "question_index", "example_id", "target_loc", "label_type", "Known_stereotyped_groups",
                  "Relevant_social_values")
__all__ = ["CATEGORIES", "SINGLE", "INTERSECTIONAL", "generate", "write", "TEMPLATES", "GENERATOR_VERSION"]


class FillerRandom(random.Random):
    """The generator of filler draws (names, words); counts them, so a template that drew none is known to be
    fully determined by the templates (its texts must equal upstream's)."""

    def __init__(self, seed):
        self.draws = 0
        super().__init__(seed)

    def choice(self, seq):
        self.draws += 1
        return super().choice(seq)

    def sample(self, population, k, **kw):
        self.draws += 1
        return super().sample(population, k, **kw)


def _seed(category: str, seed: int, stream: str) -> str:
    return f"{GENERATOR_VERSION}:{category}:{seed}:{stream}"  # str seeds are hashed with sha512: stable


def generate(category: str, *, seed: int = 0, root: Path | None = None,
             sampled: dict | None = None) -> tuple[list[dict], list[dict]]:
    """(rows, target rows) of one category, from ``root`` (default: the vendored templates). Two seeded streams:
    filler draws, and answer order + UNKNOWN paraphrase. ``sampled`` (optional) receives, per (Q_id, version),
    whether the template drew any filler at random."""
    if category not in CATEGORIES:
        from ...errors import UnknownNameError
        raise UnknownNameError("BBQ category", category, CATEGORIES)
    root = Path(root) if root is not None else TEMPLATES
    vocab = read_vocabulary(root)
    kind = "intersectional" if category in INTERSECTIONAL else "single"
    templates = read_templates(root / f"{category}.csv", kind)
    fillers, order = FillerRandom(_seed(category, seed, "fillers")), random.Random(_seed(category, seed, "order"))
    fn = generate_intersectional if kind == "intersectional" else generate_single
    rows, targets = [], []
    for t in templates:  # one template at a time: its rows' targets come from it
        before = fillers.draws
        part = fn(category, [t], vocab, fillers, order)
        if sampled is not None:
            key = (t["Q_id"], t["version"] if t.has("version") else "None")
            sampled[key] = sampled.get(key, False) or fillers.draws > before
        for r in part:
            r["example_id"] += len(rows)
        rows += part
        targets += target_rows(part, t)
    return rows, targets


def rows_text(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def targets_text(targets: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, TARGET_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(targets)
    return buf.getvalue()


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    data = text.encode("utf-8")
    if path.name.endswith(".gz"):   # mtime 0: the same text gives the same file
        import gzip

        data = gzip.compress(data, compresslevel=9, mtime=0)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _content_sha(path: Path) -> str | None:
    try:
        return sha256_file(path, content=True)
    except (OSError, EOFError):   # e.g. a file named .gz that is not gzip: not one of ours
        return None


def jsonl_name(category: str, compress: bool) -> str:
    return f"{category}.jsonl" + (".gz" if compress else "")


def write(categories, out: Path, *, seed: int = 0, root: Path | None = None, compress: bool = False) -> dict:
    """Write ``<Category>.jsonl`` (``.jsonl.gz`` with ``compress``, as biaslab vendors them) and
    ``target_loc_regenerated.csv`` (all categories written) into ``out``, with a ``PROVENANCE.json`` that records
    the generator, the seed, the template hashes and each file's sha256 — of its content, decompressed. A file in
    ``out`` that this command did not write is never replaced."""
    out = Path(out)
    texts, targets = {}, []
    for cat in categories:   # everything is generated (and every template checked) before anything is written
        rows, trows = generate(cat, seed=seed, root=root)
        texts[jsonl_name(cat, compress)] = rows_text(rows)
        targets += trows
    texts["target_loc_regenerated.csv"] = targets_text(targets)
    if out.exists() and not out.is_dir():
        raise BiaslabError(f"--out {out} is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    prov_path = out / PROVENANCE
    previous = json.loads(prov_path.read_text()) if prov_path.is_file() else {"files": {}}
    for name in texts:  # check everything before writing anything
        p = out / name
        if p.exists() and previous.get("files", {}).get(name, {}).get("sha256") != _content_sha(p):
            raise BiaslabError(f"{p} exists and was not written by biaslab bbq-generate (it is not in {prov_path}); "
                               "choose another --out directory or move the file away")
    for name, text in texts.items():
        _atomic_write(out / name, text)
    prov = {
        "generator": GENERATOR_VERSION, "seed": seed, "label": "regenerated from templates",
        "templates": ("nyu-mll/BBQ templates/ @ bea11bd97d79217245b5871acd247b9d6eb24598 (CC BY 4.0)"
                      if root is None else str(root)),
        "template_sha256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                            for p in sorted(Path(root or TEMPLATES).glob("*.csv"))},
        "files": {**previous.get("files", {}),
                  **{name: {"sha256": _sha(text), "seed": seed,
                            "rows": text.count("\n") - (1 if name.endswith(".csv") else 0)}
                     for name, text in texts.items()}},
    }
    _atomic_write(prov_path, json.dumps(prov, indent=1) + "\n")
    return prov
