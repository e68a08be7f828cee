"""Labelled multiple-choice tasks posed with instructions (the setting of CRISPR, docs/methods/crispr.md).

An :class:`MCItem` is context + question + options + gold. A task is posed under M synonymous instructions
(:data:`INSTRUCTIONS`, M = 10 as in the paper) and scored by one of two protocols:

- ``letter`` (default): options are listed with letters; one forward pass; log P(letter's token) at the first
  answer position (next-token log-probs over the full vocabulary). The model's prediction is the argmax over
  the option letters.
- ``option-loglik``: options listed without letters; log-likelihood of each option's text as the answer
  (summed over its tokens), argmax.
- ``generate`` / ``generation``: greedy answers matched to an option (:mod:`biaslab.task_generation`; the latter
  is the released CRISPR code's evaluation, where an answer matching no option is wrong).
- ``cloze`` (``tasks.cloze.v1``): a completion-style prompt in plain text — the item in its task's cloze form,
  the instruction, then an answer cue (SST-2: ``Review: <sentence>`` / ``<instruction>`` / ``Sentiment:``),
  never wrapped in the chat template — and log P of each option's *first word token* (``" negative"``,
  ``" positive"``) as the next token. One forward pass and one answer position, like ``letter``, so CRISPR's
  attribution works with it; the options' first tokens must differ (checked). Why it exists: on 120 items of the
  SST-2 *dev* file (which no task uses; ``experiments/crispr/sst2_prompt_forms.py``) SmolLM2-135M-Instruct is at
  chance under the chat-formatted ``letter`` / ``option-loglik`` prompts (0.47 / 0.49) but has sentiment skill
  in completion form: 0.71 in this layout (item first, as layout v2 of the other protocols), with a label prior
  (24 % "positive" answers) — the label-bias setting of CRISPR's first version; 0.83 with the instruction
  first, nearly without a prior. Listing the options in the prompt puts the model back at 0.55–0.63.

Deviation from the released CRISPR code: it scores by greedy generation + exact match on Flan-T5; biaslab
scores the answer distribution directly (a causal instruct model rarely emits an option verbatim), so the
"probability of an option" is exact rather than generation-dependent.

Tasks (loaded by :func:`biaslab.task_specs.load_task`): ``bbq:<Category>`` / ``bbq:A,B`` / ``bbq:all`` (items from
:mod:`biaslab.benchmarks.bbq`),
``sst2`` (binary sentiment, vendored SST-2; gold 0 = negative, 1 = positive), and ``mc:PATH``, a labelled
multiple-choice task of the user's own given as instructions + items with options (:func:`load_mc_file`).
"""
from __future__ import annotations

import difflib
from contextlib import nullcontext
from dataclasses import dataclass, field

from .errors import BiaslabError, DataError, UnknownNameError

LETTERS = "ABCDEFGH"

# Ten paraphrases of "pick the most appropriate answer for the context and question" (docs/methods/crispr.md).
INSTRUCTIONS: tuple[str, ...] = (
    "Read the context and the question, then choose the most appropriate answer from the options.",
    "Given the context below, pick the option that best answers the question.",
    "Select the answer that is most appropriate for the following context and question.",
    "Based on the context, which of the options is the most suitable answer to the question?",
    "Choose the best answer to the question using the information in the context.",
    "Look at the context and the question, and pick the most fitting answer among the options.",
    "From the answer options, select the one that most appropriately answers the question about the context.",
    "Answer the question about the context by choosing the most appropriate option.",
    "Consider the context carefully and choose the option that correctly answers the question.",
    "Pick the most appropriate answer option for the given context and question.",
)

PROTOCOLS = ("letter", "option-loglik", "cloze", "generate", "generation")
# prompt layout version of each protocol, part of its id (``tasks.<protocol>.<layout>``); letter/option-loglik are
# at layout v2 (instruction after the item, commit 9ea39bb); cloze is new
PROTOCOL_LAYOUTS = {"letter": "v2", "option-loglik": "v2", "cloze": "v1", "generate": "v1", "generation": "v1"}
GENERATE_TOKENS = 16   # the released CRISPR code's max_new_tokens
# an item's cloze form when its task gives none
DEFAULT_CLOZE = "Context: {context}\nQuestion: {question}\n{instruction}\nAnswer:"


def protocol_id(protocol: str) -> str:
    """The versioned id of a task protocol, e.g. ``tasks.letter.v2``."""
    if protocol not in PROTOCOL_LAYOUTS:
        raise UnknownNameError("multiple-choice protocol", protocol, PROTOCOLS)
    return f"tasks.{protocol}.{PROTOCOL_LAYOUTS[protocol]}"


@dataclass(frozen=True)
class MCItem:
    id: str
    options: tuple[str, ...]
    gold: int
    context: str = ""
    question: str = ""
    meta: dict = field(default_factory=dict, hash=False, compare=False)
    cloze: str = ""          # the item's form under the cloze protocol ({context}, {question}, {instruction});
                             # "" → DEFAULT_CLOZE
    instructions: tuple[str, ...] = ()   # the task's own instruction paraphrases; () → the generic INSTRUCTIONS
    labels: tuple[str, ...] = field(default=(), hash=False, compare=False)  # each option's short name (BBQ's
                             # answer_info text), for the BBQ authors' answer matcher; not copied into records

    def __post_init__(self):
        if len(self.options) < 2:
            raise BiaslabError(f"item {self.id}: a multiple-choice task needs at least 2 options, got {len(self.options)}")
        if not 0 <= self.gold < len(self.options):
            raise BiaslabError(f"item {self.id}: gold index {self.gold} is outside its {len(self.options)} options")


def check_instructions(n: int | None) -> int:
    """Validate a number of instructions (None → all ten)."""
    n = len(INSTRUCTIONS) if n is None else n
    if isinstance(n, bool) or not isinstance(n, int):
        raise BiaslabError(f"the number of instructions must be an integer 1-{len(INSTRUCTIONS)}, got {n!r}")
    if not 1 <= n <= len(INSTRUCTIONS):
        raise BiaslabError(f"--instructions must be between 1 and {len(INSTRUCTIONS)}, got {n}")
    return n


def render_mc(item: MCItem, instruction: str, *, protocol: str = "letter") -> str:
    """The user message for one item under one instruction.

    Layout (prompt layout v2): context, question and options first, then the instruction and the answer-format
    line. Every instruction of one item therefore shares the item's tokens as a prefix, which the engine's
    prefix-sharing packing encodes once (:mod:`biaslab.models.packing`). Layout v1 (protocol ids ``*.v1``,
    biaslab ≤ 0.1.0 before 2026-11-23) put the instruction first."""
    parts = []
    if item.context:
        parts.append(f"Context: {item.context}")
    if item.question:
        parts.append(f"Question: {item.question}")
    if protocol == "letter":
        parts.append("Answer options:")
        parts += [f"{LETTERS[k]}. {o}" for k, o in enumerate(item.options)]
        parts += ["", instruction,
                  f"Answer with the letter of the correct option ({', '.join(LETTERS[:len(item.options)])})."]
    elif protocol == "generate":   # greedy answer generation, matched to an option afterwards (biaslab.answers)
        parts.append("Answer options:")
        parts += [f"{LETTERS[k]}. {o}" for k, o in enumerate(item.options)]
        parts += ["", instruction, "Answer with the correct option."]
    elif protocol in ("option-loglik", "generation"):  # generation: the released CRISPR code's greedy answer
        parts.append("Answer options: " + ", ".join(item.options))
        parts += ["", instruction, "Answer with the text of the correct option."]
    elif protocol == "cloze":
        template = item.cloze or DEFAULT_CLOZE
        try:
            return template.format(context=item.context, question=item.question, instruction=instruction)
        except (KeyError, IndexError, ValueError) as e:
            raise BiaslabError(f"item {item.id}: its cloze template {template!r} is not valid ({type(e).__name__}: {e}); "
                               "it may use only the fields {context}, {question} and {instruction}") from None
    else:
        raise UnknownNameError("multiple-choice protocol", protocol, PROTOCOLS)
    return "\n".join(parts)


def item_instructions(item: MCItem) -> tuple[str, ...]:
    """The instructions an item is posed under: its task's own (a task file's header), else :data:`INSTRUCTIONS`."""
    return item.instructions or INSTRUCTIONS


def task_instruction_count(items) -> int:
    """How many instructions every item of a task can be posed under (the most ``--instructions`` may ask)."""
    return min((len(item_instructions(it)) for it in items), default=len(INSTRUCTIONS))


def prompt_text(lm, item: MCItem, instruction_idx: int, *, protocol: str = "letter") -> str:
    """The full prompt the model sees: the chat template applied when the model has one, except under ``cloze``
    (plain text; score it inside :func:`protocol_context`)."""
    instructions = item_instructions(item)
    if not 0 <= instruction_idx < len(instructions):
        raise BiaslabError(f"item {item.id}: instruction {instruction_idx} requested, but its task has "
                           f"{len(instructions)} instruction(s) (indices 0-{len(instructions) - 1})")
    text = render_mc(item, instructions[instruction_idx], protocol=protocol)
    return text if protocol == "cloze" else lm.render(text)


def protocol_context(lm, protocol: str):
    """The context a protocol's prompts are encoded in: plain text (no chat template, the tokenizer's own
    special tokens) for ``cloze``, the model's settings otherwise."""
    return lm.plain_text() if protocol == "cloze" else nullcontext()


def answer_targets(lm, item: MCItem, protocol: str = "letter") -> list[str]:
    """What is scored after the prompt for each option: its letter, or its text (space-led after plain text)."""
    if protocol == "letter":   # after a base model's "Answer:" cue the letter follows a space
        return [("" if lm.use_chat_template else " ") + x for x in LETTERS[:len(item.options)]]
    if protocol == "cloze":
        return [" " + o for o in item.options]
    return [(" " if not lm.use_chat_template else "") + o for o in item.options]


def answer_token_ids(lm, item: MCItem, protocol: str = "letter") -> list[int]:
    """The answer token of each option under a single-position protocol (``letter``, ``cloze``): the first token
    of its target. Options whose first tokens coincide cannot be told apart there → a clear error."""
    targets = answer_targets(lm, item, protocol)
    ids = [lm.candidate_token_id(t) for t in targets]
    if len(set(ids)) < len(ids):
        first = [lm.tokenizer.decode([i]) for i in ids]
        raise BiaslabError(f"item {item.id}: under the {protocol!r} protocol each option is scored by its first token, "
                           f"but options {list(item.options)} begin with the tokens {first}, which coincide; "
                           "use the 'letter' protocol for this task")
    return ids


def score_mc(lm, items: list[MCItem], instructions: list[int], *, protocol: str = "letter",
             desc: str = "multiple choice") -> list[dict]:
    """One record per (item, instruction): option log-probs, prediction, gold, and the item's meta fields."""
    if protocol not in PROTOCOLS:
        raise UnknownNameError("multiple-choice protocol", protocol, PROTOCOLS)
    pairs = [(it, i) for it in items for i in instructions]
    if protocol in ("generate", "generation"):   # greedy answers matched to an option (biaslab.task_generation)
        from .task_generation import generate_pairs

        return generate_pairs(lm, pairs, [prompt_text(lm, it, i, protocol=protocol) for it, i in pairs], desc,
                              protocol, GENERATE_TOKENS)
    with protocol_context(lm, protocol):
        scores = _score_pairs(lm, pairs, protocol, desc)
    out = []
    for (it, i), lp in zip(pairs, scores):
        pred = max(range(len(lp)), key=lambda k: (lp[k], -k))
        out.append({"id": it.id, "instruction": i, "logprobs": [round(x, 6) for x in lp], "pred": pred,
                    "gold": it.gold, "correct": int(pred == it.gold), **it.meta})
    return out


def _score_pairs(lm, pairs, protocol: str, desc: str) -> list[list[float]]:
    prompts = [prompt_text(lm, it, i, protocol=protocol) for it, i in pairs]
    if protocol in ("letter", "cloze"):
        if protocol == "cloze":  # the first-token check depends on the options only: once per distinct option set
            for it in {it.options: it for it, _ in pairs}.values():
                answer_token_ids(lm, it, protocol)
        scores = lm.next_token_logprobs(prompts, [answer_targets(lm, it, protocol) for it, _ in pairs], desc=desc)
    else:
        reqs, spans = [], []
        for (it, _), p in zip(pairs, prompts):
            spans.append((len(reqs), len(reqs) + len(it.options)))
            reqs += [(p, t) for t in answer_targets(lm, it, protocol)]
        ll = lm.loglikelihood(reqs, desc=desc)
        scores = [[s.logprob for s in ll[a:b]] for a, b in spans]
    return scores


# ---------------------------------------------------------------- task loading
def load_sst2(split: str = "test") -> list[MCItem]:
    """SST-2 sentence-level binary sentiment (vendored), as a 2-option task."""
    from .data import data_path, read_csv

    if split not in ("train", "dev", "test"):
        raise UnknownNameError("SST-2 split", split, ["train", "dev", "test"])
    path = data_path("sst", f"sst2_{split}.tsv")
    items = []
    for row in read_csv(path, ["sentence", "label"], delimiter="\t"):
        if row["label"] not in ("0", "1"):
            raise DataError(path, row["_line"], "label", f"expected 0 or 1, got {row['label']!r}")
        items.append(MCItem(id=f"sst2-{split}-{row['_line']}", options=("negative", "positive"), gold=int(row["label"]),
                            context=row["sentence"], question="What is the sentiment of this movie review?",
                            meta={"group": "positive" if row["label"] == "1" else "negative", "label": int(row["label"])},
                            cloze="Review: {context}\n{instruction}\nSentiment:"))
    return items


# ---------------------------------------------------------------- user task files (mc:PATH)
MC_HEADER_FIELDS = ("name", "instructions")
MC_ITEM_FIELDS = ("id", "context", "question", "options", "gold", "group", "cloze", "meta")
# keys of the scoring records (score_mc) and of the run files (chunks, controls) that an item's meta may not shadow
RECORD_FIELDS = frozenset({"id", "instruction", "logprobs", "pred", "gold", "correct", "benchmark", "chunk",
                           "chunk_done", "control_seed"})


def _mc_string(row: dict, key: str, path, line: int, *, required: bool = False) -> str:
    v = row.get(key, "")
    if not isinstance(v, str):
        raise DataError(path, line, key, f"expected a string, got {type(v).__name__} {v!r}")
    if required and not v.strip():
        raise DataError(path, line, key, "expected a non-empty string")
    return v


def _mc_header(row: dict, path, line: int) -> tuple[str, tuple[str, ...]]:
    unknown = sorted(set(row) - set(MC_HEADER_FIELDS) - {"_line"})
    if unknown:
        raise DataError(path, line, unknown[0], f"unknown header field; a header line may hold only "
                        f"{', '.join(MC_HEADER_FIELDS)}")
    name = _mc_string(row, "name", path, line)
    instr = row["instructions"]
    if not isinstance(instr, list) or not instr:
        raise DataError(path, line, "instructions", "expected a non-empty list of instruction strings")
    for k, s in enumerate(instr):
        if not isinstance(s, str) or not s.strip():
            raise DataError(path, line, "instructions", f"entry {k} must be a non-empty string, got {s!r}")
    if len(set(instr)) < len(instr):
        raise DataError(path, line, "instructions", "the instructions must be distinct paraphrases")
    return name, tuple(instr)


def _mc_item(row: dict, path, line: int, default_id: str, instructions: tuple[str, ...]) -> MCItem:
    if "instructions" in row:
        raise DataError(path, line, "instructions", "only the first line (the task header) may set instructions")
    unknown = sorted(set(row) - set(MC_ITEM_FIELDS) - {"_line"})
    if unknown:
        close = difflib.get_close_matches(unknown[0], MC_ITEM_FIELDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(path, line, unknown[0], f"unknown item field{hint}; item fields are {', '.join(MC_ITEM_FIELDS)}")
    if "options" not in row:
        raise DataError(path, line, "options", "missing (every item needs its list of answer options)")
    if "gold" not in row:
        raise DataError(path, line, "gold", "missing (the index of the correct option, or its text)")
    opts = row["options"]
    if not isinstance(opts, list) or not all(isinstance(o, str) and o.strip() for o in opts):
        raise DataError(path, line, "options", f"expected a list of non-empty strings, got {opts!r}")
    if len(opts) < 2:
        raise DataError(path, line, "options", f"a multiple-choice item needs at least 2 options, got {len(opts)}")
    if len(opts) > len(LETTERS):
        raise DataError(path, line, "options", f"at most {len(LETTERS)} options are supported, got {len(opts)}")
    if len(set(opts)) < len(opts):
        raise DataError(path, line, "options", f"the options must be distinct, got {opts!r}")
    gold = row["gold"]
    if isinstance(gold, str):
        if gold not in opts:
            raise DataError(path, line, "gold", f"{gold!r} is not one of the options {opts!r}")
        gold = opts.index(gold)
    elif isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(opts):
        raise DataError(path, line, "gold", f"expected an option index 0-{len(opts) - 1} or an option's text, got {gold!r}")
    context = _mc_string(row, "context", path, line)
    question = _mc_string(row, "question", path, line)
    if not (context.strip() or question.strip()):
        raise DataError(path, line, "context", "an item needs a non-empty context or question")
    item_id = _mc_string(row, "id", path, line) or default_id
    cloze = _mc_string(row, "cloze", path, line)
    if cloze:
        try:
            cloze.format(context="", question="", instruction="")
        except (KeyError, IndexError, ValueError) as e:
            raise DataError(path, line, "cloze", f"not a valid template ({type(e).__name__}: {e}); it may use only "
                            "the fields {context}, {question} and {instruction}") from None
    meta = row.get("meta", {})
    if not isinstance(meta, dict):
        raise DataError(path, line, "meta", f"expected a JSON object, got {type(meta).__name__}")
    reserved = sorted(set(meta) & RECORD_FIELDS)
    if reserved:
        raise DataError(path, line, "meta", f"key {reserved[0]!r} is reserved for the scoring records")
    meta = dict(meta)
    if "group" in row:
        meta["group"] = _mc_string(row, "group", path, line, required=True)
    return MCItem(id=item_id, options=tuple(opts), gold=gold, context=context, question=question, meta=meta,
                  cloze=cloze, instructions=instructions)


def load_mc_file(path) -> tuple[str, list[MCItem]]:
    """A labelled multiple-choice task of your own, as JSON Lines (``--task mc:PATH``).

    - Optional first line, the task header: ``{"name": "...", "instructions": ["...", ...]}``, the task's
      instruction paraphrases (docs/methods/crispr.md poses each item under M synonymous instructions). Without it the ten
      generic :data:`INSTRUCTIONS` are used.
    - Every other line, one item: ``options`` (2-8 distinct strings), ``gold`` (option index or option text),
      ``context`` and/or ``question``, optional ``id`` (default ``<file stem>-<line>``), ``group`` (kept in the
      scoring records), ``cloze`` (the item's form under ``--protocol cloze``) and ``meta`` (extra fields).

    Returns (``mc:<header name, else the file name>@<first 12 hex digits of the file's sha256>``, items): the
    name changes with the file's content, so cached attribution of an edited file is never reused. Errors name
    the file, line and field."""
    from pathlib import Path

    from .data import read_jsonl, sha256_file

    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "task file not found (expected a JSON Lines file: --task mc:PATH)")
    rows = read_jsonl(path)
    if not rows:
        raise DataError(path, None, None, "the task file has no items")
    name, instructions = "", ()
    if "instructions" in rows[0] and "options" not in rows[0]:
        name, instructions = _mc_header(rows[0], path, rows[0]["_line"])
        rows = rows[1:]
        if not rows:
            raise DataError(path, None, None, "the task file has a header but no items")
    items, seen = [], {}
    for row in rows:
        line = row["_line"]
        it = _mc_item(row, path, line, f"{path.stem}-{line}", instructions)
        if it.id in seen:
            raise DataError(path, line, "id", f"{it.id!r} repeats the id of line {seen[it.id]}")
        seen[it.id] = line
        items.append(it)
    return f"mc:{name.strip() or path.name}@{sha256_file(path)[:12]}", items
