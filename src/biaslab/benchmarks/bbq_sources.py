"""Where each BBQ category comes from: the vendored upstream files (7 of the 11, byte for byte), the 4 regenerated
from the authors' templates (:mod:`biaslab.benchmarks.bbq_generate`), or a user's own full copy of the upstream
``data/`` folder (``--bbq-dir`` / ``--data-dir`` / ``BIASLAB_BBQ_DIR``), every file checked against the upstream
sha256 (``data/bbq/README.md``) before it is used and labelled ``upstream`` in the results; a user's file replaces
the vendored or regenerated one. A file whose hash differs is refused, naming the file and both hashes. The four
categories biaslab does not vendor upstream need their bias targets too: the upstream ``additional_metadata.csv``
(``analysis_scripts/`` in nyu-mll/BBQ) in the same directory supplies ``target_loc`` for them."""
from __future__ import annotations

import os
from pathlib import Path

from ..data import DATA_ROOT, sha256_file
from ..errors import BiaslabError

ENV = "BIASLAB_BBQ_DIR"
METADATA = "additional_metadata.csv"
# upstream nyu-mll/BBQ data/*.jsonl (the 7 vendored ones match these; see data/bbq/README.md)
UPSTREAM_SHA256 = {
    "Age": "46e805b3fc2d8cbd26eeb8e8430d98cf7b2dc9c83574ff3674e8ce4f0fca2a60",
    "Disability_status": "375d40d9b71f056150264445ec189b13934998f3f49a1e311aa7578eb3b45e5f",
    "Gender_identity": "8b5adbb368510a97d5775dc43e1c719e0249fe2da33f13c83e3e29edafec7a00",
    "Nationality": "a583e74666aec0341ded8aa3983e7cad694eb24de72c254d28b2df3035720090",
    "Physical_appearance": "e48d7e13508565f4801574e611043470c25c95a0a62af3699cb5ee7cb02608fb",
    "Religion": "cb9555f9f3454a52cd2df85956b59bd7fcca5aa922c8527693b1164d08417616",
    "Sexual_orientation": "2c71036b9e7584fe589c42aef32c1a42bc01b9a5e9b1b8704342630cdb08cefd",
    "Race_ethnicity": "4a9f1214cfaa115ce7f0bdb40609122e431f5152c71b8ca64d665e483b946ae6",
    "Race_x_SES": "af8e2ae3d0e5be9ebcbfe7149e591d47ff649e263307f4548f7fb12f6a6d83e8",
    "Race_x_gender": "e5dbba782f8c4e25b99dd5470b5136e2db73dbf401cf6d4a5a3ed31b02f95696",
    "SES": "9f92754bb037b0982604b9112705fb81d60a19d9e759c67e4a85e484a070f528",
}
ALL_CATEGORIES = tuple(UPSTREAM_SHA256)


def user_dir(option=None) -> Path | None:
    d = option if option is not None else os.environ.get(ENV) or None
    if d is None:
        return None
    p = Path(d).expanduser()
    if not p.is_dir():
        raise BiaslabError(f"the BBQ data directory {p} (from {'--bbq-dir' if option else ENV}) is not a directory")
    return p


def sources(option=None, vendored=()) -> dict[str, dict]:
    """{category: {"path", "label", "sha256"}} for every category available: the user's verified files first,
    then the vendored ones."""
    out = {}
    d = user_dir(option)
    if d is not None:
        found = False
        for cat, want in UPSTREAM_SHA256.items():
            f = d / f"{cat}.jsonl"
            if not f.is_file():
                continue
            found = True
            got = sha256_file(f)
            if got != want:
                raise BiaslabError(f"{f} is not the upstream BBQ file: sha256 {got}, upstream {want}; biaslab uses "
                                   "only byte-identical upstream copies (re-download it, or remove it from the directory)")
            out[cat] = {"path": f, "label": "upstream (user copy, sha256 verified)", "sha256": got}
        if not found:
            raise BiaslabError(f"{d} holds none of the upstream BBQ files (<Category>.jsonl, e.g. SES.jsonl)")
    for cat in vendored:
        out.setdefault(cat, {"path": DATA_ROOT / "bbq" / f"{cat}.jsonl", "label": "upstream (vendored, sha256 verified)",
                             "sha256": UPSTREAM_SHA256[cat]})
    return {c: out[c] for c in ALL_CATEGORIES if c in out}


def metadata_file(option=None) -> Path | None:
    d = user_dir(option)
    return d / METADATA if d is not None and (d / METADATA).is_file() else None
