"""Filling a template's slots and writing one example set: 2 contexts × 2 question polarities = 4 BBQ rows.

Follows the authors' conventions (nyu-mll/BBQ ``utils.py``), reimplemented: every text cell gets ``{{NAME1}}``,
``{{NAME2}}``, ``{{GEN*}}``/``{{OCC*}}`` (intersectional) and ``{{WORD*}}`` (lexical variation) filled; "a" becomes
"an" before a vowel whenever a filler starts with one (but "a European"); two fixed word repairs ("lesbian man",
"Latino woman"); the UNKNOWN answer is one of ten paraphrases, and the three answers are shuffled. The shuffle and
the paraphrase come from the generator's seeded ``random.Random``.
"""
from __future__ import annotations

import random
import re

from .templates import TEXT_FIELDS, UNKNOWN_OPTIONS, Template

_VOWEL = re.compile(r"^[aeiou]")
_A_AN = re.compile(r"(\s[aA])(\s[aAeEiIoOuU])")


def fill_text(text: str, w1: str, w2: str, g1: str | None = None, g2: str | None = None,
              words: tuple[str, str] | None = None) -> str:
    text = text.replace("{{NAME1}}", w1).replace("{{NAME2}}", w2)
    if g1 is not None:
        for a, b in (("GEN1", g1), ("GEN2", g2), ("OCC1", g1), ("OCC2", g2)):
            text = text.replace("{{%s}}" % a, b)
    if words is not None:
        text = text.replace("{{WORD1}}", words[0]).replace("{{WORD2}}", words[1])
    text = text.replace("lesbian man", "lesbian woman").replace("Latino woman", "Latina woman")
    if any(_VOWEL.search(str(s).lower()) for s in (w1, w2, g1, g2)):
        text = _A_AN.sub(r"\1n\2", text).replace(" an European", " a European")
    return text


def fill(t: Template, w1: str, w2: str, g1=None, g2=None, words=None) -> dict[str, str]:
    """The template's text cells with the slots filled (NAME1 ← w1, NAME2 ← w2)."""
    return {c: fill_text(t[c], w1, w2, g1, g2, words) for c in TEXT_FIELDS}


def _contains(person, answer: str) -> bool:
    if isinstance(person, list):  # [race, gender/SES word]: both must appear
        return person[0] in answer and person[1] in answer
    return person in answer


def _shown(person) -> str:
    return person[0] + " " + person[1].lstrip() if isinstance(person, list) else person.lstrip()


def _pad_man(person):
    """' man' so that 'man' is not found inside 'woman' (the authors' fix)."""
    if isinstance(person, list):
        return [person[0], " man" if person[1] == "man" else person[1]]
    return " man" if person == "man" else person


def example_set(rng: random.Random, cat: str, t: Template, filled: dict[str, str], subcat: str,
                bias_targets: list[str], p1, p2, info1, info2, first_id: int) -> list[dict]:
    """Four rows (neg/ambig, neg/disambig, nonneg/ambig, nonneg/disambig) with ids first_id … first_id+3.

    ``p1``/``p2`` are the people in NAME1/NAME2 (a string, or [race, gender/SES] for intersectional labels);
    ``answer_info`` tags each answer with the group info of the person it names. Where one person's text occurs
    inside the other's ("tattoos" in "no tattoos") the longer one wins: that is what the published files hold
    (the authors' script at the vendored commit would let NAME2 win, which reproduces 24 fewer of upstream's
    Physical_appearance rows)."""
    neg, nonneg = filled["Answer_negative"], filled["Answer_non_negative"]
    unknown = rng.choice(UNKNOWN_OPTIONS)
    answers = [neg, nonneg, unknown]
    rng.shuffle(answers)
    where = {"neg": answers.index(neg), "nonneg": answers.index(nonneg), "unknown": answers.index(unknown)}
    info = {f"ans{k}": ["", ""] for k in range(3)}
    for which, text in (("neg", neg), ("nonneg", nonneg)):
        found = [(len(_shown(p)), n, p, tag) for n, (p, tag) in enumerate(((_pad_man(p1), info1), (_pad_man(p2), info2)))
                 if _contains(p, text)]
        if found:  # the longest name found in the answer ("no tattoos" over "tattoos"); a tie goes to NAME2
            _, _, person, tag = max(found)
            info[f"ans{where[which]}"] = [_shown(person), tag]
    info[f"ans{where['unknown']}"] = [unknown, "unknown"]
    ambig = filled["Ambiguous_Context"]
    disambig = "%s %s" % (ambig.strip(), filled["Disambiguating_Context"])
    meta = {"subcategory": subcat, "stereotyped_groups": bias_targets,
            "version": t["version"] if t.has("version") else "None", "source": t["Notes"]}
    rows = []
    for n, (polarity, question, gold) in enumerate(
            (("neg", filled["Question_negative_stereotype"], where["neg"]),
             ("nonneg", filled["Question_non_negative"], where["nonneg"]))):
        for m, (cond, context) in enumerate((("ambig", ambig), ("disambig", disambig))):
            rows.append({
                "example_id": first_id + 2 * n + m, "question_index": t["Q_id"], "question_polarity": polarity,
                "context_condition": cond, "category": cat,
                "answer_info": {k: list(v) for k, v in info.items()},
                "additional_metadata": dict(meta, stereotyped_groups=list(bias_targets)),
                "context": context.strip(), "question": question.strip(),
                "ans0": answers[0], "ans1": answers[1], "ans2": answers[2],
                "label": where["unknown"] if cond == "ambig" else gold,
            })
    return rows
