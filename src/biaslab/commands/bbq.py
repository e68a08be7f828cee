"""``biaslab bbq-generate``: BBQ categories regenerated from the authors' templates, and the generator's check
against the upstream files that are present."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import typer

from ..errors import BiaslabError
from ._app import app, console


@app.command("bbq-generate")
def bbq_generate(
    category: list[str] = typer.Option(None, "--category", "-c", help="a BBQ category (repeatable), or 'all'; "
                                       "default: the four that are not vendored upstream (SES, Race_ethnicity, "
                                       "Race_x_SES, Race_x_gender)"),
    out: Optional[Path] = typer.Option(None, "--out", help="directory for <Category>.jsonl, "
                                       "target_loc_regenerated.csv and PROVENANCE.json"),
    seed: int = typer.Option(0, "--seed", help="seed of the filler draws, answer order and UNKNOWN paraphrase"),
    templates: Optional[Path] = typer.Option(None, "--templates", help="a directory of template files "
                                             "(<Category>.csv, vocabulary.csv, vocabulary_proper_names.csv) to use "
                                             "instead of the vendored authors' templates"),
    validate: bool = typer.Option(False, "--validate", help="instead: compare the generator with the upstream "
                                  "files of the 7 vendored categories (counts per template cell, identical items, "
                                  "target_loc) and print the table"),
    gzip: bool = typer.Option(False, "--gzip", help="write <Category>.jsonl.gz (as biaslab vendors them)"),
    check: bool = typer.Option(False, "--check", help="instead: regenerate the vendored regenerated files in memory "
                               "and confirm they are reproduced byte for byte"),
):
    """Regenerate BBQ categories from the authors' templates (Parrish et al. 2022) in the upstream schema."""
    from ..benchmarks import bbq_generate as G
    from ..benchmarks.bbq import REGENERATED_CATEGORIES, UPSTREAM_CATEGORIES, regenerated_dir

    if validate:
        from ..benchmarks.bbq_generate.validate import table, validate_category
        from ..data import DATA_ROOT

        results = [validate_category(c, DATA_ROOT / "bbq" / f"{c}.jsonl", seed) for c in UPSTREAM_CATEGORIES]
        console.print(table(results), markup=False, highlight=False, soft_wrap=True)
        bad = [r["category"] for r in results if r["cells_differing"] or r["target_port_disagree"]]
        if bad:
            raise BiaslabError(f"the generator departs from upstream for {', '.join(bad)}")
        return
    if check:
        prov = json.loads((regenerated_dir() / G.PROVENANCE).read_text())
        targets = []
        for c in REGENERATED_CATEGORIES:
            rows, trows = G.generate(c, seed=prov["seed"])
            targets += trows
            _check_reproduced(G.jsonl_name(c, True), G.rows_text(rows), prov)
        _check_reproduced("target_loc_regenerated.csv", G.targets_text(targets), prov)
        return
    if out is None:
        raise BiaslabError("--out DIR is required (or use --validate / --check)")
    if not category:
        cats = list(REGENERATED_CATEGORIES)
    elif category == ["all"]:
        cats = list(G.CATEGORIES)
    else:
        cats = category
    if templates is not None and not templates.is_dir():
        raise BiaslabError(f"--templates {templates} is not a directory")
    prov = G.write(cats, out, seed=seed, root=templates, compress=gzip)
    for name, f in prov["files"].items():
        console.print(f"{Path(out) / name}: {f['rows']:,} rows, sha256 {f['sha256'][:16]}…", markup=False,
                      highlight=False, soft_wrap=True)


def _check_reproduced(name: str, text: str, prov: dict) -> None:
    """The vendored file ``name`` holds exactly ``text`` (what the generator makes now), as PROVENANCE.json says."""
    from ..benchmarks.bbq import regenerated_dir
    from ..data import sha256_file

    got = hashlib.sha256(text.encode("utf-8")).hexdigest()
    vendored = sha256_file(regenerated_dir() / name, content=True)
    if not got == vendored == prov["files"][name]["sha256"]:
        raise BiaslabError(f"{regenerated_dir() / name}: regenerated sha256 {got}, vendored {vendored}, recorded "
                           f"{prov['files'][name]['sha256']} — they must be equal")
    console.print(f"{name}: reproduced byte for byte (sha256 {got[:16]}…)", markup=False, highlight=False)
