"""FAST's evaluation pairs (docs/methods/fast.md): rule-based paraphrases of the biased knowledge pairs (BiaScope's
PS), CrowS-Pairs as cross-dataset pairs (evaluation only, at its authors' request) and the vendored BiaScope files
with their readers (paraphrases, CrowS transfer, hand-written commonsense retention pairs). The training pairs are
:mod:`.pairs`'."""
from __future__ import annotations

import re
from collections import Counter, defaultdict

from ...errors import DataError
from .config import BIAS_TYPES, CROWS_TYPES
from .pairs import GENDER_SWAP, KnowledgePair

# ---------------------------------------------------------------------------------------------- paraphrases
WRAPPERS = (("heard", "I heard that {p}"), ("knows", "Everyone knows that {p}"),
            ("friend", "According to my friend, {p}"), ("said", "It is often said that {p}"))
_DECAP = {"the", "a", "an", "my", "our", "this", "that", "these", "those", "many", "most", "every", "all", "some",
          "his", "her", "their", "its", "one", "each", "when", "if", "in", "on", "at", "after", "before", "while"}


_PRONOUNS = {"she", "he", "they", "we", "you", "it", "there", "people", "everyone", "society", "schoolgirls",
             "schoolboys", "mothers", "fathers", "sisters", "brothers", "gentlemen", "ladies", "classmates", "many"}


def _decap(p: str) -> str:
    w = p.split(" ", 1)[0]
    lw = re.sub(r"[^a-z]", "", w.lower())
    return (p[0].lower() + p[1:]) if (lw in _DECAP or lw in GENDER_SWAP or lw in _PRONOUNS) and w != "I" else p


_SUBJECT_PRONOUNS = {"i", "he", "she", "they", "we", "you", "it", "who", "that", "which", "when", "if", "thought",
                     "said", "felt", "knew", "told", "made", "found", "saw", "think", "know", "believe", "say",
                     "says", "thinks", "believes", "feel", "feels", "heard", "met", "became", "got"}


def paraphrase_prompts(prompt: str) -> list[tuple[str, str, int]]:
    """Rule-based meaning-preserving rewrites of a prompt: (variant, text, char offset of the original prompt
    inside the text, or −1 when re-ordered). Wrappers prepend a reporting clause; the re-ordering turns a
    prompt ending in a copula into a yes/no question (\"X are\" -> \"Are X\")."""
    out = []
    for name, tpl in WRAPPERS:
        d = _decap(prompt)
        text = tpl.format(p=d)
        out.append((f"wrap-{name}", text, text.index(d)))
    m = re.match(r"^(.*\S)\s+(is|are|was|were)$", prompt.strip())
    np_words = m.group(1).lower().split() if m else []
    if (m and len(np_words) <= 5 and not re.search(r"[,;:.!?']", m.group(1))
            and not any(w in _SUBJECT_PRONOUNS or w.endswith("ed") for w in np_words)):
        np_ = _decap(m.group(1))
        out.append(("reorder-question", f"{m.group(2).capitalize()} {np_}", -1))
    return out


def paraphrase_pair(p: KnowledgePair) -> list[dict]:
    rows = []
    v1, v2 = paraphrase_prompts(p.prompt_1), paraphrase_prompts(p.prompt_2)
    for (name, t1, _), (name2, t2, _) in zip(v1, v2):
        if name != name2:
            continue
        rows.append({"pair_id": p.id, "variant": name, "bias_type": p.bias_type, "prompt_1": t1, "prompt_2": t2,
                     "object": p.object})
    return rows


def crows_pairs(bias_types=BIAS_TYPES) -> tuple[list[dict], dict]:
    """CrowS-Pairs as cross-dataset pairs (evaluation only): the prompts are each sentence up to and including
    its last word that differs from the other sentence, the object is the shared rest. Pairs whose difference
    reaches the end of the sentence (no shared object) are skipped and counted."""
    from ...data import data_path, read_csv

    path = data_path("crows_pairs", "crows_pairs_anonymized.csv")
    rows = read_csv(path, ["sent_more", "sent_less", "stereo_antistereo", "bias_type"])
    want = {ct: bt for bt in bias_types for ct in CROWS_TYPES[bt]}
    out, skipped = [], defaultdict(Counter)
    for r in rows:
        if r["bias_type"] not in want:
            continue
        bt = want[r["bias_type"]]
        a, b = r["sent_more"].strip(), r["sent_less"].strip()
        wa, wb = re.findall(r"\S+\s*", a), re.findall(r"\S+\s*", b)
        ka, kb = [w.strip() for w in wa], [w.strip() for w in wb]
        n = 0
        while n < min(len(ka), len(kb)) and ka[-1 - n] == kb[-1 - n]:
            n += 1
        if n == 0 or n >= min(len(ka), len(kb)):
            skipped[bt]["difference at the sentence end (no shared object)" if n == 0 else "sentences identical"] += 1
            continue
        pa, pb = "".join(wa[:len(wa) - n]).rstrip(), "".join(wb[:len(wb) - n]).rstrip()
        obj = "".join(wa[len(wa) - n:]).strip()
        if not re.search(r"[A-Za-z0-9]", obj):
            skipped[bt]["shared rest is punctuation only"] += 1
            continue
        out.append({"id": f"crows-{r['']}" if "" in r else f"crows-{r['_line']}", "bias_type": bt,
                    "crows_bias_type": r["bias_type"], "stereo_antistereo": r["stereo_antistereo"],
                    "prompt_1": pa, "prompt_2": pb, "object": obj})
    return out, {k: dict(v) for k, v in skipped.items()}


BIASCOPE_DIR = "biascope"
PARAPHRASE_FILE = "biascope/paraphrases.jsonl"
CROWS_FILE = "biascope/crows_transfer.jsonl"
COMMONSENSE_FILE = "biascope/commonsense_retention.jsonl"


def load_paraphrases() -> dict[str, list[dict]]:
    """Vendored paraphrases, pair id -> rows."""
    from ...data import data_path, read_jsonl

    path = data_path(PARAPHRASE_FILE)
    out = defaultdict(list)
    for r in read_jsonl(path, ["pair_id", "variant", "bias_type", "prompt_1", "prompt_2", "object"]):
        out[r["pair_id"]].append(r)
    return dict(out)


def load_crows_transfer(bias_types=BIAS_TYPES) -> list[dict]:
    from ...data import data_path, read_jsonl

    rows = read_jsonl(data_path(CROWS_FILE), ["id", "bias_type", "prompt_1", "prompt_2", "object"])
    return [r for r in rows if r["bias_type"] in bias_types]


def load_commonsense(bias_types=None) -> list[dict]:
    """Hand-written commonsense retention pairs: prompt_a / prompt_b differ in the group term, and the object
    legitimately fits group a (``expected`` = "a")."""
    from ...data import data_path, read_jsonl

    path = data_path(COMMONSENSE_FILE)
    rows = read_jsonl(path, ["id", "bias_type", "category", "prompt_a", "prompt_b", "object"])
    seen = set()
    for r in rows:
        if r["id"] in seen:
            raise DataError(path, r["_line"], "id", f"duplicate id {r['id']!r}")
        seen.add(r["id"])
        if r["bias_type"] not in ("gender", "race", "religion"):
            raise DataError(path, r["_line"], "bias_type", f"expected gender/race/religion, got {r['bias_type']!r}")
        if r["prompt_a"] == r["prompt_b"]:
            raise DataError(path, r["_line"], "prompt_b", "identical to prompt_a")
    if bias_types:
        rows = [r for r in rows if r["bias_type"] in bias_types]
    return rows
