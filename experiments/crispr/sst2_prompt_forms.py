"""How SmolLM2-135M-Instruct answers SST-2 under different prompt forms — the measurement behind the ``cloze``
protocol (biaslab/tasks.py). Uses 120 items (shuffled, seed 0) of the vendored SST-2 *dev* file, which the
``sst2`` task never uses (its dev/test split is cut from the SST-2 test file), × instructions 0-2. For each form:
accuracy, share of "positive" answers, accuracy per instruction.

Writes experiments/crispr/sst2_cloze/prompt_forms.json. Run: ``.venv/bin/python experiments/crispr/sst2_prompt_forms.py``"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

FORMS = {  # name -> (user text, chat template?, candidates)
    "cloze (item, instruction, cue) = tasks.cloze.v1": ("Review: {c}\n{i}\nSentiment:", False),
    "cloze, instruction first": ("{i}\nReview: {c}\nSentiment:", False),
    "cloze, no instruction": ("Review: {c}\nSentiment:", False),
    "cloze, options listed": ("{i}\nReview: {c}\nAnswer options: negative, positive\nSentiment:", False),
    "cloze, question + options, instruction last": (
        "Context: {c}\nQuestion: {q}\nAnswer options: negative, positive\n{i}\nSentiment:", False),
    "paper layout, plain text": ("{i} Context: {c} Question: {q} Answer options: negative, positive Your answer:", False),
}


def main() -> None:
    os.environ.setdefault("BIASLAB_PROGRESS", "0")
    from biaslab.models import load_model
    from biaslab.runs import atomic_write_json
    from biaslab.tasks import INSTRUCTIONS, load_sst2, score_mc

    lm = load_model("smollm2-135m-instruct")
    lm.progress = False
    items = load_sst2("dev")
    random.Random(0).shuffle(items)
    items = items[:120]
    instr = [0, 1, 2]
    golds = [it.gold for it in items for _ in instr]
    out = {"items": len(items), "gold_positive_share": sum(it.gold for it in items) / len(items),
           "instructions": instr, "forms": {}}

    def summarise(preds):
        acc = sum(p == g for p, g in zip(preds, golds)) / len(golds)
        per = [sum(p == g for p, g in zip(preds[k::3], golds[k::3])) / len(items) for k in range(3)]
        return {"accuracy": round(acc, 4), "positive_rate": round(sum(preds) / len(preds), 4),
                "accuracy_per_instruction": [round(a, 4) for a in per]}

    for proto in ("letter", "option-loglik"):  # the chat-formatted task protocols (layout v2)
        recs = score_mc(lm, items, instr, protocol=proto)
        out["forms"][f"tasks.{proto}.v2 (chat template)"] = summarise([r["pred"] for r in recs])
    with lm.plain_text():
        for name, (fmt, _) in FORMS.items():
            prompts = [fmt.format(c=it.context, q=it.question, i=INSTRUCTIONS[i]) for it in items for i in instr]
            sc = lm.next_token_logprobs(prompts, [" negative", " positive"])
            out["forms"][name] = summarise([int(s[1] > s[0]) for s in sc])
    for k, v in out["forms"].items():
        print(f"{k:55s} {v}")
    atomic_write_json(Path(__file__).resolve().parent / "sst2_cloze" / "prompt_forms.json", out)


if __name__ == "__main__":
    import argparse   # takes no options: --help prints what it does and writes; anything else is refused, not run

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
