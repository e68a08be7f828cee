"""FAST — Fairness Stamp (Chen et al., NAACL Findings 2025; arXiv 2405.09341 "BiasKE", arXiv 2408.11843).

**This is a FAST-style reimplementation**: the authors published no code. Every choice the paper leaves open is
made here, named in a docstring, and recorded in the run manifest / summary (:func:`choices`).

Pipeline (docs/methods/fast.md):
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

import random
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass

from ...errors import BiaslabError
from .config import BIAS_TYPES

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
    from ...benchmarks.stereoset import PARTIAL, load_partial
    from ...data import data_path

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
