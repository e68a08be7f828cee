"""Race_x_SES and Race_x_gender from their templates (Parrish et al. 2022, §3 "intersectional"; the authors'
``generate_from_template_intersectional_cats.py`` read for its rules, reimplemented here).

Each template pairs a target person (a targeted race and the targeted gender/SES) with three contrasts — (a) same
race, other gender/SES; (b) other race, same gender/SES; (c) both differ — written in both name orders: 6 example
sets (24 rows) per pair, tagged ``intersectional_a/b/c`` in ``additional_metadata.subcategory``. Labels come from
the race vocabulary and the template's ``Names``/SES vocabulary; proper-name templates draw first names of the
targeted race (and gender) and contrast names from the proper-name vocabulary.

Kept from upstream, as it decides what the published files hold: in Race_x_SES proper-name templates contrast (c)
reuses contrast (b)'s name (so (c) differs from the target in SES and in race through (b)'s person).
"""
from __future__ import annotations

import random

from .fill import example_set, fill
from .single import lexical_words
from .templates import Template, Vocabulary, unique

_OTHER = {"M": "F", "F": "M", "lowSES": "highSES", "highSES": "lowSES"}


def _other(t: Template, value: str) -> str:
    if value not in _OTHER:
        raise t.error("Known_stereotyped_var2", f"expected one of {', '.join(_OTHER)}, got {value!r}")
    return _OTHER[value]


def generate_intersectional(cat: str, templates: list[Template], vocab: Vocabulary, rng: random.Random,
                            order: random.Random) -> list[dict]:
    rows: list[dict] = []
    possible = unique(w["Name"] for w in vocab.category("Race_ethnicity"))
    ses = vocab.category("SES")
    firsts_all = [n for n in vocab.names if n["First_last"] == "first"]
    lasts_all = [n for n in vocab.names if n["First_last"] == "last"]

    def full_name(person: dict) -> str:
        return person["Name"] + " " + rng.choice(unique(n["Name"] for n in lasts_all
                                                        if n["ethnicity"] == person["ethnicity"]))

    for t in templates:
        bias_targets = t.literal_list("Known_stereotyped_race") if t["Known_stereotyped_race"] else []
        targeted = [x for x in possible if x in bias_targets] if t["Known_stereotyped_race"] else possible
        word_list = rng.sample(targeted, 5) if len(targeted) > 4 else targeted
        proper = t["Proper_nouns_only"] == "TRUE"
        target_var2 = t["Known_stereotyped_var2"]
        non_target_var2 = _other(t, target_var2)
        labels_given = t["Names"] != ""
        if (cat == "Race_x_gender" and not proper) or labels_given:
            labels, labels_info = t.literal_list("Names", nested=True), t.literal_list("Var2_info")
            if target_var2 not in labels_info or len(labels) != 2 or len(labels_info) != 2:
                raise t.error("Var2_info", f"expected two labels in Names and their two tags in Var2_info, one of "
                              f"them {target_var2!r} (Known_stereotyped_var2)")
            where = labels_info.index(target_var2)
            fixed_gs = (labels[where], labels[1 - where])
        else:
            fixed_gs = None
        if proper:
            first_names = [n for n in firsts_all if n["ethnicity"] in bias_targets]
            if cat == "Race_x_gender":
                first_names = [n for n in first_names if n["gender"] == target_var2]
            if cat == "Race_x_SES" and t["Stated_gender_info"] != "":
                first_names = [n for n in first_names if n["gender"] == t["Stated_gender_info"]]
            word_list = rng.sample([n["Name"] for n in first_names], 5)
        for first in word_list:
            t_word, wrd2, tag1 = first, "", None
            name2_info: dict[str, str] = {}
            if not proper:
                contrasts = rng.sample([n for n in possible if n not in word_list], 5)
            else:
                me = next(n for n in first_names if n["Name"] == first)
                tag1 = me["gender"] + "-" + me["ethnicity"]
                t_word = first + " " + rng.choice(unique(n["Name"] for n in lasts_all
                                                         if n["ethnicity"] == me["ethnicity"]))
                if cat == "Race_x_SES":  # (same race, other race), same gender throughout
                    groups = [[n for n in firsts_all if n["ethnicity"] == me["ethnicity"] and n["gender"] == me["gender"]
                               and n["Name"] != first],
                              [n for n in firsts_all if n["ethnicity"] not in bias_targets and n["gender"] == me["gender"]]]
                else:  # (same race, other gender), (other race, same gender), (both other)
                    groups = [[n for n in firsts_all if (n["ethnicity"] == me["ethnicity"]) == same_race
                               and (n["gender"] == me["gender"]) == same_gender]
                              for same_race, same_gender in ((True, False), (False, True), (False, False))]
                picks = [rng.sample(g, 5) for g in groups]
                contrasts = []
                for k in range(5):
                    names = []
                    for g in picks:
                        nm = full_name(g[k])
                        names.append(nm)
                        name2_info[nm] = g[k]["gender"] + "-" + g[k]["ethnicity"]
                    contrasts.append(names)
            for other in contrasts:
                if fixed_gs is not None:
                    if isinstance(fixed_gs[0], list):  # word variants: drawn once, then kept (as upstream)
                        fixed_gs = (rng.choice(fixed_gs[0]),
                                    rng.choice(fixed_gs[1]) if isinstance(fixed_gs[1], list) else fixed_gs[1])
                    t_gs, non_t_gs = fixed_gs
                elif cat == "Race_x_gender":  # proper names carry the gender
                    t_gs = non_t_gs = None
                else:  # an SES word of the targeted / the other level, drawn for each pair
                    t_gs = rng.choice(unique(w["Name"] for w in ses if w["Info"] == target_var2))
                    non_t_gs = rng.choice(unique(w["Name"] for w in ses if w["Info"] != target_var2))
                lex, wrd2 = lexical_words(rng, t, wrd2)
                if proper and cat == "Race_x_gender":
                    sets = [(other[0], None, name2_info[other[0]]), (other[1], None, name2_info[other[1]]),
                            (other[2], None, name2_info[other[2]])]
                    me_set = (t_word, None, tag1)
                elif proper:  # Race_x_SES with names
                    sets = [(other[0], non_t_gs, non_target_var2 + "-" + name2_info[other[0]]),
                            (other[1], t_gs, target_var2 + "-" + name2_info[other[1]]),
                            (other[1], non_t_gs, non_target_var2 + "-" + name2_info[other[1]])]
                    me_set = (t_word, t_gs, target_var2 + "-" + tag1)
                else:
                    if cat == "Race_x_gender" and t["Var2_info"] == "":
                        raise t.error("Var2_info", "a label template needs the gender tags of its Names")
                    sets = [(t_word, non_t_gs, non_target_var2 + "-" + t_word),
                            (other, t_gs, target_var2 + "-" + other),
                            (other, non_t_gs, non_target_var2 + "-" + other)]
                    me_set = (t_word, t_gs, target_var2 + "-" + t_word)
                ordered = [(me_set, s) for s in sets] + [(s, me_set) for s in sets]
                for n, ((w1, g1, i1), (w2, g2, i2)) in enumerate(ordered):
                    subcat = "intersectional_" + "abc"[n % 3]
                    p1 = w1 if g1 is None else [w1, g1]
                    p2 = w2 if g2 is None else [w2, g2]
                    filled = fill(t, w1, w2, g1, g2 if g1 is not None else None, lex)
                    rows += example_set(order, cat, t, filled, subcat, bias_targets, p1, p2, i1, i2, len(rows))
    return rows
