"""FAST — Fairness Stamp (Chen et al., NAACL Findings 2025; arXiv 2405.09341 "BiasKE", arXiv 2408.11843).

**This is a FAST-style reimplementation**: the authors published no code. Every choice the paper leaves open is
made here, named in a docstring, and recorded in the run manifest / summary (:func:`choices`).

Pipeline (METHODS.md §2):
1. *Biased knowledge pairs* (s1, r, o) vs (s2, r, o) from StereoSet intrasentence clusters
   (``stereoset_partial``, full sentences): the prompt is the stereotype sentence up to the filler, the object
   o is the stereotype filler, s1 the cluster's target group, s2 a fixed counterpart group
   (:data:`COUNTERPARTS`). Clusters whose filler follows no mention of the group term (the object would come
   before the subject: not a P(o | s, r) for a causal LM), whose target term is not found, or whose filler
   cannot be recovered are **skipped and counted** (never silently dropped).
   CrowS-Pairs is used **only for evaluation** (its authors ask that it never be used for training): its
   pairs become cross-dataset PS pairs (prefix up to the last differing word vs the shared rest).
2. Train / dev / held-out split by *statement* (clusters grouped by their lower-cased context, so the same
   statement is never on two sides), seeded, stratified by bias type.
3. Causal tracing (:mod:`biaslab.tracing`) finds the decisive layer (argmax of the MLP indirect effect).
4. The stamp: ``x ↦ W2·act(W1·x + b1) + b2`` (d → width → d) on the decisive layer's MLP **input**, added to
   that MLP's output at **every position** (the subject position is unknown at inference time), W2 and b2
   zero-initialised so the stamped model is identical at start. Trained alone (all original weights frozen)
   with ``L = L_e + α·L_s1 + β·L_s2``:
   - L_e: mean over biased pairs of (mean log P(o|s1,r) − mean log P(o|s2,r))² (per-token mean over o);
   - L_s1: KL(P_orig ‖ P_stamped) of next-token distributions at every position of knowledge prompts about
     the *same subjects* (fixed lexical/encyclopaedic templates, :data:`SUBJECT_TEMPLATES`, filled with the
     training pairs' s1 and s2 terms);
   - L_s2: the same KL on unrelated text (WikiText-2 *validation* windows; test is kept for perplexity).
   Original distributions are cached once as the LM head's inputs, so no second model copy is needed.
5. Baselines through the same code: FT-L (the decisive layer's MLP weights fine-tuned with the same data and
   losses; the checkpoint whose *dev* SS is closest to FAST's dev SS is kept — SS matched on dev, never on the
   held-out split) and the stamp with α = β = 0.
"""
from __future__ import annotations

import math
import random
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import BiaslabError, DataError, UnknownNameError
from ..patches import Patch
from ..progress import progress_bar

METHOD_VERSION = "fast-style.v1"
BIAS_TYPES = ("gender", "race", "religion")
# StereoSet domain -> CrowS-Pairs bias types of the same kind (cross-dataset PS)
CROWS_TYPES = {"gender": ("gender",), "race": ("race-color", "nationality"), "religion": ("religion",)}
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
# initialisation of the stamp's first layer; the second layer always starts at zero, which is what makes the
# freshly stamped model identical to the original (so the choice changes training, never the starting point)
STAMP_INITS = ("pytorch", "xavier", "normal")   # nn.Linear's own (Kaiming-uniform) | Xavier-uniform, bias 0 |
                                                # N(0, 0.02²), bias 0 (GPT-style)
FAIRNESS_LOSSES = ("gap", "gap+js")  # L_e variants (FastConfig.fairness)

# ---------------------------------------------------------------------------------------------- counterparts
# Race / religion: each StereoSet target -> one fixed contrasting group of the same grammatical form
# (country -> country, demonym -> demonym with the same plural behaviour). A hand-written choice (the paper
# does not publish its counterparts); non-Western targets get a Western-European/Anglophone counterpart and
# Western targets a non-Western one, as in CrowS-Pairs' disadvantaged-vs-advantaged design.
COUNTERPARTS: dict[str, dict[str, str]] = {
    "race": {
        "Afghanistan": "Switzerland", "African": "European", "Arab": "European", "Bangladesh": "Denmark",
        "Bengali": "Austrian", "Britain": "Brazil", "Cameroon": "Canada", "Cape Verde": "New Zealand",
        "Columbian": "Canadian", "Crimean": "Bavarian", "Ecuador": "Finland", "Eriteria": "Sweden",
        "Eritrean": "Austrian", "Ethiopia": "Belgium", "Ethiopian": "Belgian", "Ghanaian": "Canadian",
        "Hispanic": "Caucasian", "Iranian": "Australian", "Iraq": "Ireland", "Italy": "Korea",
        "Japanese": "Portuguese", "Jordan": "Portugal", "Lebanon": "Scotland", "Morocco": "Austria",
        "Norway": "Nigeria", "Norweigan": "Nigerian", "Persian people": "Swiss people", "Russian": "Australian",
        "Saudi Arabian": "Canadian", "Sierra Leon": "Luxembourg", "Somalia": "Germany", "Spain": "Kenya",
        "Syria": "France", "Ukrainian": "Australian", "Vietnam": "England", "Yemen": "Denmark",
    },
    "religion": {"Muslim": "Christian", "Bible": "Quran", "Brahmin": "Catholic"},
}
# extra surface forms of a target (misspellings in the data, plural/alias) -> counterpart form
ALIASES: dict[str, dict[str, str]] = {
    "Eriteria": {"Eritrea": "Sweden"}, "Norweigan": {"Norwegian": "Nigerian", "Norwegians": "Nigerians"},
    "Columbian": {"Colombian": "Canadian", "Colombians": "Canadians"}, "Sierra Leon": {"Sierra Leone": "Luxembourg"},
    "Persian people": {"Persians": "Swiss", "Persian": "Swiss"}, "Arab": {"Arabic": "European"},
}
# Gender: counterfactual swap (CDA) of every gendered word in the prompt, so pronouns stay coherent
_GENDER_PAIRS = [
    ("he", "she"), ("his", "her"), ("himself", "herself"), ("man", "woman"), ("men", "women"), ("boy", "girl"),
    ("boys", "girls"), ("father", "mother"), ("fathers", "mothers"), ("dad", "mom"), ("dads", "moms"),
    ("daddy", "mommy"), ("grandfather", "grandmother"), ("grandfathers", "grandmothers"), ("grandpa", "grandma"),
    ("brother", "sister"), ("brothers", "sisters"), ("son", "daughter"), ("sons", "daughters"),
    ("husband", "wife"), ("husbands", "wives"), ("uncle", "aunt"), ("uncles", "aunts"), ("nephew", "niece"),
    ("king", "queen"), ("gentleman", "lady"), ("gentlemen", "ladies"), ("male", "female"), ("males", "females"),
    ("schoolboy", "schoolgirl"), ("schoolboys", "schoolgirls"), ("boyfriend", "girlfriend"), ("mr", "mrs"),
    ("sir", "madam"), ("guy", "gal"),
]
GENDER_SWAP: dict[str, str] = {}
for _a, _b in _GENDER_PAIRS:
    GENDER_SWAP.setdefault(_a, _b)
    GENDER_SWAP.setdefault(_b, _a)
GENDER_SWAP["him"] = "her"
GENDER_SWAP["hers"] = "his"
_HER_OBJECT_NEXT = {"", "to", "and", "a", "an", "the", "in", "as", "was", "is", "that", "for", "with", "at", "by",
                    "up", "out", "off", "down", "so", "too", "very", "be", "feel", "look", "seem", "when", "because"}

SUBJECT_TEMPLATES = (
    "The word \"{x}\" is defined in the dictionary as",
    "A sentence that uses the word \"{x}\":",
    "In an encyclopedia, the entry for {x} begins with",
    "Translate into French: {x} =>",
    "The word \"{x}\" has this many letters:",
    "Here is a poem that mentions {x}:",
)


def _match_case(src: str, new: str) -> str:
    if src.isupper() and len(src) > 1:
        return new.upper()
    if src[:1].isupper():
        return new[:1].upper() + new[1:]
    return new[:1].lower() + new[1:] if new[:1].isupper() and src[:1].islower() else new


def _fix_articles(text: str, spans: list[tuple[int, int]]) -> str:
    """a/an before each replaced span agrees with the new word."""
    out = text
    for a, _ in sorted(spans, reverse=True):
        m = re.search(r"\b(a|an|A|An)\s+$", out[:a])
        if m:
            w = out[a:a + 4].lower()
            art = "an" if w[:1] in "aeiou" and not w.startswith(("eu", "uni", "use", "usu", "one", "uk")) else "a"
            art = art.capitalize() if m.group(1)[0].isupper() else art
            out = out[:m.start(1)] + art + out[m.end(1):]
    return out


def _term_forms(bias_type: str, target: str) -> dict[str, str]:
    """Surface form -> counterpart form for one race/religion target (plural added where regular)."""
    c = COUNTERPARTS[bias_type].get(target)
    if c is None:
        return {}
    forms = {target: c}
    if not re.search(r"(ese|sh|ch|ss|people)$", c) and not target.endswith("people"):
        forms[target + "s"] = c + "s"
    forms.update(ALIASES.get(target, {}))
    return forms


def swap_group(text: str, bias_type: str, target: str) -> tuple[str, tuple[int, int] | None, tuple[int, int] | None]:
    """Swap the group term(s) in ``text``. Returns (swapped text, span of the last target mention in ``text``,
    span of its counterpart in the swapped text); spans are None when no target mention is found."""
    if bias_type == "gender":
        words = list(re.finditer(r"[A-Za-z]+", text))
        out, pieces, last_src, last_new, pos, spans = [], [], None, None, 0, []
        tgt = target.lower()
        for k, m in enumerate(words):
            w = m.group(0)
            lw = w.lower()
            if lw not in GENDER_SWAP:
                continue
            new = GENDER_SWAP[lw]
            if lw == "her":
                nxt = words[k + 1].group(0).lower() if k + 1 < len(words) else ""
                between = text[m.end():words[k + 1].start()] if k + 1 < len(words) else ""
                new = "him" if (nxt in _HER_OBJECT_NEXT or any(ch in between for ch in ",.;!?")) else "his"
            new = _match_case(w, new)
            pieces.append(text[pos:m.start()])
            start_new = sum(len(p) for p in pieces)
            pieces.append(new)
            spans.append((start_new, start_new + len(new)))
            pos = m.end()
            if lw in (tgt, tgt + "s") or (tgt.endswith("men") and lw == tgt[:-3] + "man"):
                last_src, last_new = (m.start(), m.end()), (start_new, start_new + len(new))
        pieces.append(text[pos:])
        new_text = "".join(pieces)
        if last_src is None:
            return text, None, None
        fixed = _fix_articles(new_text, spans)
        if len(fixed) != len(new_text):  # article length changed: recompute the counterpart span
            shift = len(fixed) - len(new_text)
            last_new = (last_new[0] + shift, last_new[1] + shift) if last_new else None
        return fixed, last_src, last_new
    forms = _term_forms(bias_type, target)
    if not forms:
        return text, None, None
    pattern = re.compile(r"\b(" + "|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True)) + r")\b",
                         re.IGNORECASE)
    lower = {k.lower(): v for k, v in forms.items()}
    pieces, pos, last_src, last_new, spans = [], 0, None, None, []
    for m in pattern.finditer(text):
        new = _match_case(m.group(0), lower[m.group(0).lower()])
        pieces.append(text[pos:m.start()])
        start_new = sum(len(p) for p in pieces)
        pieces.append(new)
        spans.append((start_new, start_new + len(new)))
        last_src, last_new = (m.start(), m.end()), (start_new, start_new + len(new))
        pos = m.end()
    if last_src is None:
        return text, None, None
    pieces.append(text[pos:])
    new_text = "".join(pieces)
    fixed = _fix_articles(new_text, spans)
    # recompute the counterpart's last span after article fixes (they only change a/an lengths before it)
    shift = len(fixed) - len(new_text)
    if shift:
        last_new = (last_new[0] + shift, last_new[1] + shift)
    return fixed, last_src, last_new


# ---------------------------------------------------------------------------------------------- pairs
@dataclass
class KnowledgePair:
    """(s1, r, o) vs (s2, r, o): ``prompt_1`` mentions the stereotyped group s1, ``prompt_2`` the counterpart
    s2; ``object`` is o (scored as the continuation ``" " + object``). Spans are char spans of the (last)
    group mention in each prompt, used by causal tracing."""
    id: str
    bias_type: str
    target: str
    counterpart: str
    prompt_1: str
    prompt_2: str
    object: str
    span_1: tuple[int, int]
    span_2: tuple[int, int]
    statement: str           # normalised statement key (split unit)
    source: str = "stereoset"

    def to_json(self) -> dict:
        return asdict(self)


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s.strip().lower())


def stereoset_clusters(bias_types=BIAS_TYPES) -> list[dict]:
    """StereoSet intrasentence clusters with full sentences (via the StereoSet benchmark's validated loader)."""
    from ..benchmarks.stereoset import PARTIAL, load_partial
    from ..data import data_path

    out = []
    for bt in bias_types:
        if bt not in PARTIAL:
            raise BiaslabError(f"FAST pairs need full StereoSet sentences; no such data for bias type {bt!r} "
                               f"(available: {', '.join(PARTIAL)})")
        out += load_partial(data_path(PARTIAL[bt]), bt)
    return out


def pair_from_cluster(c: dict) -> tuple[KnowledgePair | None, str | None]:
    """One biased knowledge pair from a StereoSet cluster, or (None, skip reason)."""
    ctx, sent = c["context"], c["stereotype"]
    if ctx.count("BLANK") != 1:
        return None, "context has no single BLANK"
    i = ctx.index("BLANK")
    pre, post = ctx[:i], ctx[i + 5:]
    pre_n, post_n = pre.rstrip(), post.strip()
    s = sent.strip()
    if not s.lower().startswith(pre_n.lower()):
        return None, "stereotype sentence does not match the context before BLANK"
    rest = s[len(pre_n):].rstrip(" .!?")
    tail = post_n.rstrip(" .!?")
    if tail:
        if not rest.lower().endswith(tail.lower()):
            return None, "stereotype sentence does not match the context after BLANK"
        rest = rest[:len(rest) - len(tail)]
    filler = rest
    filler = filler.strip(" ,;:")
    if not filler:
        return None, "filler not recoverable"
    prompt_1 = s[:len(pre_n)]
    if not prompt_1.strip():
        return None, "object at the start of the sentence (no subject before it)"
    swapped, span1, span2 = swap_group(prompt_1, c["domain"], c["target"])
    if span1 is None:
        full, sp, _ = swap_group(s, c["domain"], c["target"])
        if sp is not None:
            return None, "group term only after the object (object precedes subject)"
        return None, "group term not found (cannot align)"
    if swapped == prompt_1:
        return None, "counterpart identical to the group term"
    cp = swapped[span2[0]:span2[1]]
    return KnowledgePair(id=c["id"], bias_type=c["domain"], target=c["target"], counterpart=cp,
                         prompt_1=prompt_1, prompt_2=swapped, object=filler, span_1=span1, span_2=span2,
                         statement=_norm(ctx)), None


def build_stereoset_pairs(bias_types=BIAS_TYPES) -> tuple[list[KnowledgePair], dict]:
    """All biased knowledge pairs of ``bias_types`` and the skip counts {bias type: {reason: n}}."""
    pairs, skipped = [], defaultdict(Counter)
    for c in stereoset_clusters(bias_types):
        p, why = pair_from_cluster(c)
        if p is None:
            skipped[c["domain"]][why] += 1
        else:
            pairs.append(p)
    return pairs, {k: dict(v) for k, v in skipped.items()}


def split_pairs(pairs: list[KnowledgePair], *, seed: int = 0, dev: float = 0.1, test: float = 0.3
                ) -> dict[str, list[KnowledgePair]]:
    """Seeded train / dev / test split by statement (never the same statement on two sides), per bias type."""
    out = {"train": [], "dev": [], "test": []}
    by_type = defaultdict(lambda: defaultdict(list))
    for p in pairs:
        by_type[p.bias_type][p.statement].append(p)
    for bt in sorted(by_type):
        stmts = sorted(by_type[bt])
        random.Random(f"{seed}:{bt}").shuffle(stmts)
        n_test, n_dev = round(test * len(stmts)), round(dev * len(stmts))
        for j, st in enumerate(stmts):
            side = "test" if j < n_test else "dev" if j < n_test + n_dev else "train"
            out[side] += by_type[bt][st]
    return out


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
    from ..data import data_path, read_csv

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
    from ..data import data_path, read_jsonl

    path = data_path(PARAPHRASE_FILE)
    out = defaultdict(list)
    for r in read_jsonl(path, ["pair_id", "variant", "bias_type", "prompt_1", "prompt_2", "object"]):
        out[r["pair_id"]].append(r)
    return dict(out)


def load_crows_transfer(bias_types=BIAS_TYPES) -> list[dict]:
    from ..data import data_path, read_jsonl

    rows = read_jsonl(data_path(CROWS_FILE), ["id", "bias_type", "prompt_1", "prompt_2", "object"])
    return [r for r in rows if r["bias_type"] in bias_types]


def load_commonsense(bias_types=None) -> list[dict]:
    """Hand-written commonsense retention pairs: prompt_a / prompt_b differ in the group term, and the object
    legitimately fits group a (``expected`` = "a")."""
    from ..data import data_path, read_jsonl

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


# ---------------------------------------------------------------------------------------------- the stamp
class StampFFN(nn.Module):
    """d → width → d, ``act`` in between; the first layer initialised by ``init`` (:data:`STAMP_INITS`), the
    second layer (weight and bias) at zero, so the stamp's output is 0 until it is trained."""

    def __init__(self, d: int, width: int, activation: str = "relu", init: str = "pytorch"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise UnknownNameError("stamp activation", activation, ACTIVATIONS)
        if init not in STAMP_INITS:
            raise UnknownNameError("stamp initialisation", init, STAMP_INITS)
        if width <= 0:
            raise BiaslabError(f"--stamp-width must be positive, got {width}")
        self.w1 = nn.Linear(d, width)
        if init == "xavier":
            nn.init.xavier_uniform_(self.w1.weight)
            nn.init.zeros_(self.w1.bias)
        elif init == "normal":
            nn.init.normal_(self.w1.weight, std=0.02)
            nn.init.zeros_(self.w1.bias)
        self.act = ACTIVATIONS[activation]()
        self.w2 = nn.Linear(width, d)
        nn.init.zeros_(self.w2.weight)
        nn.init.zeros_(self.w2.bias)

    def forward(self, x):
        return self.w2(self.act(self.w1(x)))


def attach_stamp(lm, layer: int, stamp: StampFFN):
    """Register the stamp on the MLP of ``layer``: MLP(x) + stamp(x). Returns the hook handle."""
    from ..tracing import check_layer, layer_modules

    check_layer(lm.model, layer)
    mlp = layer_modules(lm.model)[1][layer]

    def hook(module, args, output):
        x = args[0]
        if isinstance(output, tuple):
            return (output[0] + stamp(x).to(output[0].dtype),) + tuple(output[1:])
        return output + stamp(x).to(output.dtype)
    return mlp.register_forward_hook(hook)


class StampPatch(Patch):
    """FAST's result: a fairness stamp at one layer. Tensors ``stamp.w1.weight``, ``stamp.w1.bias``,
    ``stamp.w2.weight``, ``stamp.w2.bias``; params ``layer``, ``width``, ``activation``.

    Not exportable: the stamp is an extra non-linear branch, which a plain Hugging Face model of the same
    architecture cannot express (folding it into the MLP weights is impossible in general)."""

    kind = "stamp"
    exportable = False

    @classmethod
    def from_stamp(cls, lm, stamp: StampFFN, *, layer: int, activation: str, params: dict | None = None,
                   provenance: dict | None = None) -> "StampPatch":
        tensors = {f"stamp.{k}": v.detach().cpu().float().clone() for k, v in stamp.state_dict().items()}
        p = {"layer": int(layer), "width": int(stamp.w1.out_features), "activation": activation, **(params or {})}
        return cls(base_fingerprint=lm.fingerprint, base_spec=lm.spec, params=p, provenance=provenance, tensors=tensors)

    def build_stamp(self, lm) -> StampFFN:
        for k in ("layer", "width", "activation"):
            if k not in self.params:
                raise BiaslabError(f"stamp patch lacks the parameter {k!r}")
        d = self.tensors["stamp.w1.weight"].shape[1] if "stamp.w1.weight" in self.tensors else None
        hidden = lm.model.get_input_embeddings().weight.shape[1]
        if d != hidden:
            raise BiaslabError(f"stamp input width {d} does not match the model's hidden size {hidden}")
        st = StampFFN(hidden, int(self.params["width"]), self.params["activation"])
        st.load_state_dict({k[len("stamp."):]: v for k, v in self.tensors.items() if k.startswith("stamp.")})
        return st.to(device=lm.device, dtype=lm.dtype).eval().requires_grad_(False)

    def _apply(self, lm):
        stamp = self.build_stamp(lm)
        handle = attach_stamp(lm, int(self.params["layer"]), stamp)
        return handle.remove


# ---------------------------------------------------------------------------------------------- training
@dataclass
class FastConfig:
    """Hyper-parameters (none published by the paper; these are biaslab's defaults, chosen on the dev split)."""
    layer: int | None = None          # None: decisive layer from causal tracing
    width: int = 64
    activation: str = "relu"
    init: str = "pytorch"             # first-layer initialisation (STAMP_INITS); the second layer starts at 0
    alpha: float = 1.0                # weight of L_s1 (same-subject KL)
    beta: float = 1.0                 # weight of L_s2 (unrelated-text KL)
    steps: int = 60                   # chosen on the gender dev split (experiments/fast/diagnose.md)
    lr: float = 3e-3
    batch_pairs: int = 8
    batch_subject: int = 2
    batch_text: int = 1
    text_tokens: int = 128            # L_s2 window length: 32 left long contexts unconstrained (diagnose.md)
    n_subject_prompts: int = 48
    n_text: int = 32
    fairness: str = "gap"             # gap (the paper's L_e) | gap+js (+ JS of the next-token distributions)
    js_weight: float = 10.0           # weight of the JS part under fairness="gap+js"
    ftl_lr: float = 1e-4              # the learning rate of one FT-L run (train(mode="ftl"))
    ftl_lrs: tuple = (1e-4, 1e-3)     # `biaslab mitigate fast` tries each; the match to FAST on dev picks one
    ftl_eval_every: int = 10
    seed: int = 0

    def __post_init__(self):
        if self.init not in STAMP_INITS:
            raise UnknownNameError("stamp initialisation", self.init, STAMP_INITS)
        if self.fairness not in FAIRNESS_LOSSES:
            raise UnknownNameError("FAST fairness loss", self.fairness, FAIRNESS_LOSSES)
        if self.js_weight < 0:
            raise BiaslabError(f"js_weight must be ≥ 0, got {self.js_weight}")

    def to_json(self) -> dict:
        return asdict(self)


def wiki_windows(lm, *, split: str = "valid", n: int, tokens: int, seed: int) -> list[str]:
    """``n`` WikiText-2 (raw) paragraphs of ≥ ``tokens`` tokens, cut to ``tokens`` tokens, seeded choice."""
    from ..data import data_path

    path = data_path("wikitext2", f"{split}.raw.txt")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("=")]
    rng = random.Random(f"wiki:{seed}")
    rng.shuffle(lines)
    out = []
    for ln in lines:
        ids = lm.tokenizer(ln, add_special_tokens=False).input_ids
        if len(ids) >= tokens:
            out.append(lm.tokenizer.decode(ids[:tokens]))
        if len(out) >= n:
            break
    return out


def subject_prompts(pairs: list[KnowledgePair], *, n: int, seed: int) -> list[str]:
    terms = sorted({p.prompt_1[p.span_1[0]:p.span_1[1]].strip() for p in pairs} |
                   {p.prompt_2[p.span_2[0]:p.span_2[1]].strip() for p in pairs})
    all_ = [t.format(x=term) for term in terms for t in SUBJECT_TEMPLATES]
    random.Random(f"subj:{seed}").shuffle(all_)
    return all_[:n]


class _TextSet:
    """Texts for a KL term, with the original model's LM-head inputs cached at every scored position."""

    def __init__(self, lm, texts: list[str]):
        self.lm = lm
        self.seqs = [lm.tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        self.seqs = [([lm.prefix_id] + s) if lm.prefix_id is not None else s for s in self.seqs]
        self.seqs = [s for s in self.seqs if len(s) >= 2]
        self.cache: list[torch.Tensor] = []
        head = lm.model.get_output_embeddings()
        store = []
        hook = head.register_forward_hook(lambda m, a, o: store.append(a[0].detach()))
        try:
            with torch.no_grad():
                for b in range(0, len(self.seqs), 16):
                    chunk = self.seqs[b:b + 16]
                    store.clear()
                    self._logits(chunk)
                    h = store[-1]
                    if h.dim() == 3:  # the head ran on every position (no head split): keep the scored ones
                        ids, mask, pos, offs = self.lm.pad(chunk, side="right")
                        h = h[[k for k, s in enumerate(chunk) for _ in s], [offs[k] + j for k, s in enumerate(chunk) for j in range(len(s))]]
                    k = 0
                    for s in chunk:  # rows come out text by text, position by position
                        self.cache.append(h[k:k + len(s)].clone())
                        k += len(s)
        finally:
            hook.remove()

    def _logits(self, seqs):
        ids, mask, pos, offs = self.lm.pad(seqs, side="right")
        rows = [k for k, s in enumerate(seqs) for _ in range(len(s))]
        cols = [offs[k] + j for k, s in enumerate(seqs) for j in range(len(s))]
        dev = ids.device
        return self.lm.logits_at(ids, mask, pos, torch.tensor(rows, device=dev), torch.tensor(cols, device=dev))

    def kl(self, idx: list[int]) -> torch.Tensor:
        """Mean over positions of KL(P_orig ‖ P_current) for texts ``idx`` (differentiable)."""
        seqs = [self.seqs[i] for i in idx]
        cur = torch.log_softmax(self._logits(seqs), -1)
        head = self.lm.model.get_output_embeddings()
        with torch.no_grad():
            orig = torch.log_softmax(head(torch.cat([self.cache[i] for i in idx])).float(), -1)
        return (orig.exp() * (orig - cur)).sum(-1).mean()


def pair_logprobs(lm, prompts: list[str], objects: list[str], *, with_first: bool = False):
    """Differentiable mean log P(object tokens | prompt), tokenised exactly as ``lm.loglikelihood`` does.
    ``with_first``: also return the full next-token log-distribution at each prompt's end (the position that
    predicts the object's first token), shape (len(prompts), vocab)."""
    pieces = [lm.split_context(p, " " + o) for p, o in zip(prompts, objects)]
    seqs = [(c + x)[:-1] for c, x in pieces]
    ids, mask, pos, offs = lm.pad(seqs, side="right")
    rows, cols, tgt, owner, first = [], [], [], [], []
    for k, (c, x) in enumerate(pieces):
        end = offs[k] + len(seqs[k])
        first.append(len(rows))  # the row predicting piece k's first object token
        for j in range(len(x)):
            rows.append(k)
            cols.append(end - len(x) + j)
            tgt.append(x[j])
            owner.append(k)
    dev = ids.device
    lp = torch.log_softmax(lm.logits_at(ids, mask, pos, torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)), -1)
    tok = lp.gather(1, torch.tensor(tgt, device=dev)[:, None])[:, 0]
    owner_t = torch.tensor(owner, device=dev)
    sums = torch.zeros(len(pieces), device=dev, dtype=tok.dtype).index_add(0, owner_t, tok)
    counts = torch.zeros(len(pieces), device=dev, dtype=tok.dtype).index_add(0, owner_t, torch.ones_like(tok))
    if not with_first:
        return sums / counts
    return sums / counts, lp[torch.tensor(first, device=dev)]


def js_divergence(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Row-wise Jensen-Shannon divergence (nats, ≤ ln 2) between two batches of log-distributions."""
    lm_ = torch.logsumexp(torch.stack([lp, lq]), 0) - math.log(2.0)
    return 0.5 * ((lp.exp() * (lp - lm_)).sum(-1) + (lq.exp() * (lq - lm_)).sum(-1))


def fairness_loss(lm, pairs: list[KnowledgePair], cfg: "FastConfig") -> tuple[torch.Tensor, torch.Tensor]:
    """L_e of a batch of pairs, and the Jensen-Shannon part alone (0 under ``fairness="gap"``).

    ``gap`` (the paper's L_e): mean over pairs of (mean-token log P(o|s1,r) − mean-token log P(o|s2,r))².
    ``gap+js`` (a named deviation): the same plus ``js_weight`` × the JS divergence between the two prompts' whole
    next-token distributions at the object position — "indifferent between s1 and s2 for this r" for every
    candidate object, not only the stereotype filler o, so the stamp is taught what the group term must not change
    rather than one object's offset."""
    n = len(pairs)
    prompts = [p.prompt_1 for p in pairs] + [p.prompt_2 for p in pairs]
    objects = [p.object for p in pairs] * 2
    if cfg.fairness == "gap":
        lps, js = pair_logprobs(lm, prompts, objects), torch.zeros(())
    else:
        lps, first = pair_logprobs(lm, prompts, objects, with_first=True)
        js = js_divergence(first[:n].float(), first[n:].float()).mean()
    return ((lps[:n] - lps[n:]) ** 2).mean() + cfg.js_weight * js, js


def pair_preference_ss(lm, pairs: list[KnowledgePair]) -> float:
    """Quick SS (0-100) of pairs (no bootstrap; NaN for no pairs): used on the dev split during training."""
    return dev_stats(lm, pairs)["ss"] if pairs else math.nan


def dev_stats(lm, pairs: list[KnowledgePair]) -> dict:
    """Dev-split diagnostics used for model selection: SS and the mean |log P(o|s1,r) − log P(o|s2,r)|."""
    if not pairs:
        return {"ss": None, "mean_abs_gap": None, "n": 0}
    sc = lm.loglikelihood([(p.prompt_1, " " + p.object) for p in pairs] + [(p.prompt_2, " " + p.object) for p in pairs],
                          desc="dev")
    n = len(pairs)
    gaps = [sc[i].logprob - sc[n + i].logprob for i in range(n)]
    ss = 100.0 * sum(1.0 if g > 0 else 0.5 if g == 0 else 0.0 for g in gaps) / n
    return {"ss": ss, "mean_abs_gap": sum(abs(g) for g in gaps) / n, "n": n}


@dataclass
class TrainResult:
    mode: str
    history: list[dict] = field(default_factory=list)
    stamp: StampFFN | None = None
    mlp_state: dict | None = None     # FT-L: the chosen checkpoint's MLP weights
    chosen_step: int | None = None
    dev_ss: float | None = None
    dev_gap: float | None = None      # dev mean |log P(o|s1,r) − log P(o|s2,r)| of the kept state (FT-L)
    match_key: tuple | None = None    # FT-L: (|dev SS − target|, |dev gap − target|, step) of the kept checkpoint
    lr: float | None = None


def make_kl_sets(lm, pairs: list[KnowledgePair], cfg: FastConfig) -> dict:
    """The L_s1 / L_s2 texts with the *original* model's outputs cached: build them before any edit, and share
    them between FAST and its baselines."""
    return {"subject": _TextSet(lm, subject_prompts(pairs, n=cfg.n_subject_prompts, seed=cfg.seed)),
            "text": _TextSet(lm, wiki_windows(lm, n=cfg.n_text, tokens=cfg.text_tokens, seed=cfg.seed))}


def train(lm, pairs: list[KnowledgePair], layer: int, cfg: FastConfig, *, mode: str = "stamp",
          alpha: float | None = None, beta: float | None = None, dev_pairs: list[KnowledgePair] | None = None,
          match_dev_ss: float | None = None, match_dev_gap: float | None = None, desc: str | None = None,
          kl_sets: dict | None = None, on_step=None) -> TrainResult:
    """Train the stamp (``mode="stamp"``) or the layer's MLP weights (``mode="ftl"``, learning rate
    ``cfg.ftl_lr``) with L = L_e + α·L_s1 + β·L_s2. For FT-L with ``match_dev_ss``, checkpoints every
    ``ftl_eval_every`` steps are scored on ``dev_pairs`` and the one whose dev SS is closest to ``match_dev_ss``
    is kept, ties (dev SS moves in steps of 100/n) broken by the dev mean |gap| closest to ``match_dev_gap``, then
    by the earlier step. ``on_step(rec)`` is called after every step with the edit in place (diagnostics)."""
    from ..tracing import check_layer, layer_modules

    if not pairs:
        raise BiaslabError("FAST needs at least one training pair")
    check_layer(lm.model, layer)
    alpha = cfg.alpha if alpha is None else alpha
    beta = cfg.beta if beta is None else beta
    model = lm.model
    torch.manual_seed(cfg.seed)
    rng = random.Random(f"train:{cfg.seed}:{mode}")
    if kl_sets is None and (alpha or beta):
        kl_sets = make_kl_sets(lm, pairs, cfg)
    subj = kl_sets["subject"] if alpha else None
    text = kl_sets["text"] if beta else None

    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    mlp = layer_modules(model)[1][layer]
    handle, stamp, saved = None, None, None
    if mode == "stamp":
        d = model.get_input_embeddings().weight.shape[1]
        stamp = StampFFN(d, cfg.width, cfg.activation, cfg.init).to(device=lm.device, dtype=lm.dtype)
        handle = attach_stamp(lm, layer, stamp)
        params = list(stamp.parameters())
        lr = cfg.lr
    elif mode == "ftl":
        saved = {k: v.detach().clone() for k, v in mlp.state_dict().items()}
        params = list(mlp.parameters())
        for p in params:
            p.requires_grad_(True)
        lr = cfg.ftl_lr
    else:
        raise BiaslabError(f"unknown training mode {mode!r}")
    opt = torch.optim.Adam(params, lr=lr)
    res = TrainResult(mode)
    checkpoints = []
    was_training = model.training
    model.eval()  # dropout off; gradients still flow
    try:
        with progress_bar(cfg.steps, desc or f"training ({mode})", unit="steps", enabled=lm.progress) as advance:
            for step in range(1, cfg.steps + 1):
                with torch.enable_grad():
                    batch = rng.sample(range(len(pairs)), min(cfg.batch_pairs, len(pairs)))
                    bp = [pairs[i] for i in batch]
                    le, js = fairness_loss(lm, bp, cfg)
                    ls1 = subj.kl(rng.sample(range(len(subj.seqs)), min(cfg.batch_subject, len(subj.seqs)))) if subj else torch.zeros(())
                    ls2 = text.kl(rng.sample(range(len(text.seqs)), min(cfg.batch_text, len(text.seqs)))) if text else torch.zeros(())
                    loss = le + alpha * ls1 + beta * ls2
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                rec = {"step": step, "loss": loss.item(), "L_e": le.item(), "L_s1": float(ls1.detach()),
                       "L_s2": float(ls2.detach())}
                if cfg.fairness != "gap":
                    rec["JS"] = float(js.detach())
                if mode == "ftl" and match_dev_ss is not None and dev_pairs and (step % cfg.ftl_eval_every == 0 or step == cfg.steps):
                    st = dev_stats(lm, dev_pairs)
                    rec["dev_ss"], rec["dev_mean_abs_gap"] = st["ss"], st["mean_abs_gap"]
                    key = (abs(st["ss"] - match_dev_ss),
                           0.0 if match_dev_gap is None else abs(st["mean_abs_gap"] - match_dev_gap), step)
                    checkpoints.append((key, st, {k: v.detach().clone() for k, v in mlp.state_dict().items()}))
                res.history.append(rec)
                if on_step is not None:
                    on_step(rec)
                advance(1, loss=rec["loss"], L_e=rec["L_e"])
        if mode == "stamp":
            stamp.eval().requires_grad_(False)
            res.stamp = stamp
            if dev_pairs:
                res.dev_ss = pair_preference_ss(lm, dev_pairs)
        else:
            res.lr = lr
            if checkpoints:
                res.match_key, st, state = min(checkpoints, key=lambda c: c[0])
                res.chosen_step, res.dev_ss, res.dev_gap = res.match_key[2], st["ss"], st["mean_abs_gap"]
            else:
                state = {k: v.detach().clone() for k, v in mlp.state_dict().items()}
                res.chosen_step = cfg.steps
                if dev_pairs:
                    st = dev_stats(lm, dev_pairs)
                    res.dev_ss, res.dev_gap = st["ss"], st["mean_abs_gap"]
            res.mlp_state = state
    finally:
        if handle is not None:
            handle.remove()
        if saved is not None:
            with torch.no_grad():
                mlp.load_state_dict(saved)
        for p, f in flags:
            p.requires_grad_(f)
        model.train(was_training)
    return res


class ftl_applied:
    """Context manager: the FT-L checkpoint's MLP weights swapped in at ``layer``; restored exactly on exit."""

    def __init__(self, lm, layer: int, state: dict):
        from ..tracing import layer_modules

        self.mlp = layer_modules(lm.model)[1][layer]
        self.state = state

    def __enter__(self):
        self.saved = {k: v.detach().clone() for k, v in self.mlp.state_dict().items()}
        with torch.no_grad():
            self.mlp.load_state_dict(self.state)
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            self.mlp.load_state_dict(self.saved)
        return False


def choices(cfg: FastConfig) -> dict:
    """Every choice the paper left open, for the manifest / summary."""
    return {
        "implementation": f"FAST-style reimplementation ({METHOD_VERSION}); the authors published no code",
        "pairs": "StereoSet intrasentence (stereoset_partial): prompt = stereotype sentence up to the filler, "
                 "object = stereotype filler, s2 = fixed counterpart (race/religion: hand-written table; gender: "
                 "CDA swap of all gendered words in the prompt); clusters whose filler precedes the group term "
                 "are skipped and counted",
        "crows_pairs": "evaluation only (authors' request): cross-dataset PS pairs, prompt = sentence up to the "
                       "last differing word, object = shared rest",
        "split": "by statement (lower-cased context), seeded, per bias type: train 60 % / dev 10 % / test 30 %",
        "tracing": "ROME-style Gaussian noise (3 × std of subject-token embeddings) on subject tokens, restore one "
                   "layer at the last subject token, mean log-prob of the whole object (not ROME's first-token "
                   "probability), decisive = argmax of the single-layer MLP curve unless --layer is given",
        "stamp": f"d -> {cfg.width} -> d, {cfg.activation}, input = the MLP's input, output added to the MLP's "
                 f"output at every position; first layer initialised '{cfg.init}', second layer zero-initialised",
        "L_e": "mean over pairs of (mean-token log P(o|s1,r) - mean-token log P(o|s2,r))^2"
               + ("" if cfg.fairness == "gap" else
                  f" + {cfg.js_weight:g} x JS(P(.|s1,r) || P(.|s2,r)) of the whole next-token distribution at the "
                  "object position (a deviation: fairness=gap+js)"),
        "L_s1": f"KL(orig || stamped) at all positions of {len(SUBJECT_TEMPLATES)} lexical templates filled with "
                "the training pairs' group terms",
        "L_s2": "KL(orig || stamped) at all positions of WikiText-2 validation windows",
        "optimizer": f"Adam, lr {cfg.lr} (FT-L: each of {', '.join(f'{x:g}' for x in cfg.ftl_lrs)}), {cfg.steps} steps",
        "ftl_matching": "over FT-L's learning rates and its checkpoints every "
                        f"{cfg.ftl_eval_every} steps, the one whose dev-split SS is closest to FAST's dev SS, ties "
                        "broken by the dev mean |gap| closest to FAST's, then the earlier step",
        "config": cfg.to_json(),
    }


def fit(lm, data: dict, config: FastConfig | dict | None = None) -> StampPatch:
    """Mitigation-registry entry point: ``data = {"train": [KnowledgePair], "layer": int}`` -> StampPatch."""
    cfg = config if isinstance(config, FastConfig) else FastConfig(**(config or {}))
    layer = data.get("layer", cfg.layer)
    if layer is None:
        raise BiaslabError("fast.fit needs a layer (run causal tracing first, or pass one)")
    res = train(lm, data["train"], layer, cfg)
    return StampPatch.from_stamp(lm, res.stamp, layer=layer, activation=cfg.activation,
                                 params={"alpha": cfg.alpha, "beta": cfg.beta, "steps": cfg.steps, "lr": cfg.lr,
                                         "fairness": cfg.fairness, "init": cfg.init,
                                         **({"js_weight": cfg.js_weight} if cfg.fairness != "gap" else {})},
                                 provenance={"method": METHOD_VERSION, "choices": choices(cfg)})
