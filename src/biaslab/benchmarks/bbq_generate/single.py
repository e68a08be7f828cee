"""The nine single-attribute BBQ categories from their templates (Parrish et al. 2022, §3; the authors'
``generate_from_template_all_categories.py`` read for its rules, reimplemented here).

Per template: a list of NAME1 fillers (the template's own ``Names``, else the category's vocabulary — the bias
targets only, for the four categories whose templates name them — else proper names), each paired with every NAME2
filler; each pair gives one example set (4 rows), and for the categories whose order matters the same pair again
with the names swapped. Where the authors sample (5 of the targeted words, 5 or 6 proper names, 5 of the other
group, a last name, a ``WORD`` variant) this generator samples the same number from its own seeded generator, so
counts per template are the authors' and texts differ only where the authors drew at random.
"""
from __future__ import annotations

import random

from .fill import example_set, fill
from .templates import Template, Vocabulary, slot_lists, unique

# categories whose templates list the targeted groups, and whose items are also written with the names swapped
NEED_SUBSET = ("Race_ethnicity", "Religion", "Nationality", "Sexual_orientation")


def lexical_words(rng: random.Random, t: Template, previous: str) -> tuple[tuple[str, str] | None, str]:
    """One draw of WORD1/WORD2 for a pair, or None when the template has no lexical variation. As upstream, a WORD2
    list of a single word is never drawn (WORD2 then keeps its previous value, empty at first)."""
    if len(t["Lexical_diversity"]) <= 1:
        return None, previous
    one, two = slot_lists(t, "Lexical_diversity", "WORD1", "WORD2")
    w1 = rng.choice(one)
    w2 = rng.choice(two) if len(two) > 1 else previous
    return (w1, w2), w2


def _first(rows: list[dict], name: str, t: Template, what: str) -> dict:
    for r in rows:
        if r["Name"] == name:
            return r
    raise t.error("Names", f"{what} {name!r} is not in the vocabulary")


def _names(vocab: Vocabulary, kind: str) -> list[dict]:
    return [n for n in vocab.names if n["First_last"] == kind]


def generate_single(cat: str, templates: list[Template], vocab: Vocabulary, rng: random.Random,
                            order: random.Random) -> list[dict]:
    rows: list[dict] = []
    firsts_all, lasts_all = _names(vocab, "first"), _names(vocab, "last")
    for t in templates:
        words = vocab.category(cat)
        possible = unique(w["Name"] for w in words)
        raw = t["Known_stereotyped_groups"]
        bias_targets = t.literal_list("Known_stereotyped_groups")
        targeted = [x for x in possible if x in bias_targets] if len(raw) > 1 and cat in NEED_SUBSET else possible
        if len(targeted) > 4:
            word_list = rng.sample(targeted, 5)
        elif len(possible) < 2:
            word_list = []
        else:
            word_list = targeted
        proper = t.has("Proper_nouns_only") and t["Proper_nouns_only"] == "TRUE"
        subcat = "None"
        if t.has("Subcategory") and len(t["Subcategory"]) > 1:
            subcat = t["Subcategory"]
            words = [w for w in words if w["SubCat"] == subcat]
            word_list = unique(w["Name"] for w in words)
            if len(word_list) > 5:
                word_list = rng.sample(word_list, 5)
        from_names = t.has("Names") and len(t["Names"]) > 1
        new_list: list[str] = []
        if from_names:
            word_list, new_list = slot_lists(t, "Names", "NAME1", "NAME2")
        first_names: list[dict] = []
        if proper:
            if cat == "Race_ethnicity":
                first_names = [n for n in firsts_all if n["ethnicity"] in bias_targets] if bias_targets else firsts_all
                word_list = rng.sample([n["Name"] for n in first_names], 5)
            elif cat == "Gender_identity":
                first_names = _names(vocab, "first_only")
                word_list = rng.sample([n["Name"] for n in first_names if n["gender"] == "F"], 5)
            else:
                first_names = _names(vocab, "first_only")
                word_list = rng.sample([n["Name"] for n in first_names], 6)
        swap = cat in NEED_SUBSET or proper or (cat == "SES" and subcat == "Occupation")
        for word in word_list:
            info1: str | None = None
            name2_info: dict[str, str] = {}
            w1 = word
            wrd2 = ""
            if not from_names:
                if bias_targets and cat in NEED_SUBSET:
                    new_list = [n for n in possible if n not in bias_targets]
                    if len(new_list) > 4:
                        new_list = rng.sample(new_list, 5)
                else:
                    new_list = [n for n in word_list if n != w1]
                if cat == "SES" and not proper:
                    info1 = _first(words, w1, t, "SES word")["Info"]
                    new_list = unique(w["Name"] for w in words if w["Info"] != info1)
                if cat == "Gender_identity" and proper:
                    info1 = _first(first_names, w1, t, "name")["gender"]
                    new_list = rng.sample(unique(n["Name"] for n in first_names if n["gender"] != info1), 5)
                if cat == "Race_ethnicity" and proper:
                    me = _first(first_names, w1, t, "name")
                    info1 = me["gender"] + "-" + me["ethnicity"]
                    w1 = w1 + " " + rng.choice(unique(n["Name"] for n in lasts_all
                                                      if n["ethnicity"] == me["ethnicity"]))
                    others = rng.sample([n for n in firsts_all if n["ethnicity"] not in bias_targets
                                         and n["gender"] == me["gender"]], 5)
                    lasts = [n for n in lasts_all if n["ethnicity"] not in bias_targets]
                    new_list = []
                    for o in others:
                        full = o["Name"] + " " + rng.choice(unique(n["Name"] for n in lasts
                                                                   if n["ethnicity"] == o["ethnicity"]))
                        new_list.append(full)
                        name2_info[full] = o["gender"] + "-" + o["ethnicity"]
            for k, w2 in enumerate(new_list):
                lex, wrd2 = lexical_words(rng, t, wrd2)
                if info1 is not None and cat == "Race_ethnicity" and proper:
                    info2 = name2_info[w2]
                elif cat == "Gender_identity" and proper:
                    found = [n["gender"] for n in first_names if n["Name"] == w2]
                    info2 = found[0] if found else w2
                    if t["NAME1_info"] != "":
                        if info1 is None:
                            raise t.error("Names", "a proper-name template with NAME1_info must not list Names")
                        if k == 0:
                            info1 = t["NAME1_info"] + "_" + info1
                        info2 = t["NAME2_info"] + "_" + info2
                elif cat == "Nationality" or (cat == "SES" and subcat == "Occupation"):
                    try:
                        info1, info2 = vocab.info(w1), vocab.info(w2)
                    except KeyError as e:
                        raise t.error("Names", f"{e.args[0]!r} is not in the vocabulary") from None
                elif t.has("NAME1_info") and t["NAME1_info"] != "":
                    info1, info2 = t["NAME1_info"], t["NAME2_info"]
                else:
                    info1, info2 = w1, w2
                rows += example_set(order, cat, t, fill(t, w1, w2, words=lex), subcat, bias_targets,
                                    w1, w2, info1, info2, len(rows))
                if swap:
                    rows += example_set(order, cat, t, fill(t, w2, w1, words=lex), subcat, bias_targets,
                                        w2, w1, info2, info1, len(rows))
    return rows
