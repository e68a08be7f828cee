"""Retention: what a mitigation must not break — held-out perplexity and factual knowledge.

Two parts (``group_field`` = ``part``; every metric ignores the other part's records):

- ``wikitext``: WikiText-2 raw test split (Merity et al. 2016). The file (CRLF, read with universal newlines,
  i.e. ``open(...).read()`` style, not HF's blank-line-dropping join) is cut into its 62 articles at the
  top-level `` = Title = `` headings. Each article is split into words (``\\s*\\S+``, whitespace kept with the
  following word) and into consecutive, non-overlapping windows of ``window_words`` words (default 128); a
  window's words are scored conditioned on up to ``context_words`` (default 64) preceding words of the same
  article (the article's first window on the BOS prefix alone). Items are windows, defined in words so that
  they do not depend on a tokenizer and ``--limit`` samples windows. ``perplexity`` = exp(Σ NLL / Σ tokens)
  over the scored tokens of the windows (also ``word_perplexity`` per word, comparable across tokenizers).
  Deviation from the usual token-stride recipe: windows and context are counted in words, not tokens.
- ``knowledge``: ROME's known facts (Meng et al. 2022, ``known_1000.json``, 1,209 facts). A fact is correct when
  every token of ``" " + attribute`` is the argmax continuation of the raw ``prompt`` (no chat template),
  i.e. greedy decoding would start with the attribute: ``loglikelihood(prompt, " " + attribute).greedy``.
"""
from __future__ import annotations

import json
import re

from ..data import data_path
from ..errors import BiaslabError, DataError
from ..metrics import retention as M
from .base import Benchmark, MetricDef, Protocol

WIKI = "wikitext2/test.raw.txt"
KNOWN = "knowledge/known_1000.json"
TITLE = re.compile(r"^ = (?!=)(.+?) = $")

PROTOCOL = Protocol(
    "default", "retention.wikitext2-wordwin-ppl+known-greedy.v1",
    "wikitext: WikiText-2 raw test, per article, non-overlapping windows of window_words words scored given up to "
    "context_words preceding words (first window: BOS only), perplexity = exp(total NLL / total tokens); "
    "knowledge: ROME known_1000, correct iff loglikelihood(prompt, ' ' + attribute).greedy (every attribute "
    "token is the argmax), raw prompt without chat template.")


def wikitext_windows(path, *, window_words: int = 128, context_words: int = 64) -> list[dict]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, raw[:e.start].count(b"\n") + 1, None, "not valid UTF-8") from None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    docs: list[list[str]] = []
    for n, ln in enumerate(lines, 1):
        if TITLE.match(ln):
            docs.append([])
        if docs:
            docs[-1].append(ln)
        elif ln.strip():
            raise DataError(path, n, None, "text before the first ' = Title = ' heading; is this the raw WikiText file?")
    if not docs:
        raise DataError(path, None, None, "no ' = Title = ' article headings found")
    items = []
    for d, doc in enumerate(docs):
        words = re.findall(r"\s*\S+", "\n".join(doc))
        for w, start in enumerate(range(0, len(words), window_words)):
            chunk = words[start:start + window_words]
            items.append({"id": f"wiki-{d:02d}-{w:03d}", "part": "wikitext",
                          "context": "".join(words[max(0, start - context_words):start]),
                          "text": "".join(chunk), "n_words": len(chunk)})
    return items


def _json_array_with_lines(path) -> list[tuple[int, object]]:
    """Elements of a top-level JSON array with the line each starts on (for row-level errors)."""
    text = path.read_text(encoding="utf-8")
    dec = json.JSONDecoder()
    i = len(text) - len(text.lstrip())
    if not text[i:i + 1] == "[":
        raise DataError(path, 1, None, "expected a JSON array")
    i += 1
    out = []
    ws = re.compile(r"[\s,]*")
    while True:
        i = ws.match(text, i).end()
        if i >= len(text):
            raise DataError(path, text.count("\n") + 1, None, "unterminated JSON array")
        if text[i] == "]":
            return out
        line = text.count("\n", 0, i) + 1
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(path, e.lineno, None, f"not valid JSON ({e.msg} at column {e.colno})") from None
        out.append((line, obj))


def known_facts(path) -> list[dict]:
    items, seen = [], set()
    for line, r in _json_array_with_lines(path):
        if not isinstance(r, dict):
            raise DataError(path, line, None, "expected a JSON object")
        kid = r.get("known_id")
        if not isinstance(kid, int) or isinstance(kid, bool):
            raise DataError(path, line, "known_id", f"expected an integer, got {kid!r}")
        if kid in seen:
            raise DataError(path, line, "known_id", f"duplicate id {kid}")
        seen.add(kid)
        for f in ("prompt", "attribute"):
            if not isinstance(r.get(f), str) or not r[f].strip():
                raise DataError(path, line, f, "missing, empty or not a string")
        items.append({"id": f"known-{kid:04d}", "part": "knowledge", "prompt": r["prompt"].rstrip(),
                      "attribute": r["attribute"].strip(), "relation": str(r.get("relation_id", ""))})
    if not items:
        raise DataError(path, None, None, "no facts found")
    return items


class Retention(Benchmark):
    name = "retention"
    description = ("Ability kept after mitigation: WikiText-2 test perplexity (word windows) and ROME known-fact "
                   "accuracy (greedy attribute).")
    protocols = (PROTOCOL,)
    default_protocol = "default"
    group_field = "part"
    coverage = "WikiText-2 test only (no train split); ROME known facts only (no CounterFact or PopQA)"
    strata = ("part",)
    data_files = (WIKI, KNOWN)
    options = {"window_words": 128, "context_words": 64}
    chunk_size = 64

    def __init__(self, **options):
        super().__init__(**options)
        for k in ("window_words", "context_words"):
            v = self.opts[k]
            if not isinstance(v, int) or isinstance(v, bool) or v < (1 if k == "window_words" else 0):
                raise BiaslabError(f"retention option {k}: expected a {'positive' if k == 'window_words' else 'non-negative'} "
                                   f"integer, got {v!r}")

    def load_items(self) -> list[dict]:
        return (wikitext_windows(data_path(WIKI), window_words=self.opts["window_words"],
                                 context_words=self.opts["context_words"])
                + known_facts(data_path(KNOWN)))

    def score(self, lm, items: list[dict], *, protocol: Protocol) -> list[dict]:
        wiki = [it for it in items if it["part"] == "wikitext"]
        know = [it for it in items if it["part"] == "knowledge"]
        records = {}
        if wiki:
            for it, s in zip(wiki, lm.loglikelihood([(it["context"], it["text"]) for it in wiki], desc="wikitext")):
                records[it["id"]] = {"id": it["id"], "part": "wikitext", "nll": -s.logprob, "n_tokens": s.n_tokens,
                                     "n_words": it["n_words"]}
        if know:
            reqs = [(it["prompt"], " " + it["attribute"]) for it in know]
            for it, s in zip(know, lm.loglikelihood(reqs, desc="knowledge")):
                records[it["id"]] = {"id": it["id"], "part": "knowledge", "relation": it["relation"],
                                     "correct": bool(s.greedy), "logprob": s.logprob, "n_tokens": s.n_tokens}
        return [records[it["id"]] for it in items]

    def metric_defs(self, protocol: Protocol) -> list[MetricDef]:
        return [
            MetricDef("perplexity", M.perplexity, "WikiText-2 test token-level perplexity exp(ΣNLL/Σtokens) over the "
                      "sampled windows (lower is better).", scale="perplexity (≥1)"),
            MetricDef("knowledge_accuracy", M.knowledge_accuracy, "Fraction of ROME known facts whose attribute is "
                      "the greedy continuation of the prompt.", ideal=1.0),
            MetricDef("word_perplexity", M.word_perplexity, "WikiText-2 test word-level perplexity "
                      "exp(ΣNLL/Σwords) (tokenizer-independent).", scale="perplexity (≥1)", headline=False),
        ]

    def extra_results(self, records: list[dict], protocol: Protocol) -> dict:
        w = [r for r in records if r["part"] == "wikitext"]
        k = [r for r in records if r["part"] == "knowledge"]
        return {"wikitext_windows": len(w), "wikitext_tokens": sum(r["n_tokens"] for r in w),
                "wikitext_words": sum(r["n_words"] for r in w),
                "knowledge_facts": len(k), "knowledge_correct": sum(r["correct"] for r in k)}
