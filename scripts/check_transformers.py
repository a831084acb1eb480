#!/usr/bin/env python3
"""Check that model folders written by `sft` and `rm-train` load in transformers and compute
what lathe computes.

    python scripts/check_transformers.py demo-out/sft demo-out/rm demo-out/guard

For each folder: load it with AutoModelForCausalLM or AutoModelForSequenceClassification (as its
config.json says) and AutoTokenizer, tokenize a few texts (classifiers: + EOS, as lathe's
`lathe_scoring` says), run transformers, run lathe's `model_outputs` example on the same ids,
and compare. Causal LMs: every position's logits; classifiers: the scores, with the rows
right-padded into one batch on both sides (so the pad handling is compared too). Chat models
also render a conversation with the folder's template on both sides' tokenizers.

Needs torch, transformers and pyarrow (../shared/bench's venv has them).
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TEXTS = [
    "Human: how do I bake bread?\n\nAssistant: Mix flour, water, salt and yeast, then let it rise.",
    "ROMEO:\nBut soft! What light through yonder window breaks?",
    "I will find you and hurt you.",
]
TOLERANCE = 1e-4


def lathe_outputs(folder, rows):
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(rows, f)
    cmd = ["cargo", "run", "--quiet", "--release", "--example", "model_outputs", "--", folder, f.name]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    os.unlink(f.name)
    return json.loads(out)


def load(folder, config, cls):
    """The model transformers builds from the folder; a LoRA adapter folder through PEFT, on
    the base its adapter_config.json names, as a PEFT user loads it."""
    adapter_config = os.path.join(folder, "adapter_config.json")
    if not os.path.exists(adapter_config):
        return cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval(), ""
    from peft import PeftModel

    base = json.load(open(adapter_config))["base_model_name_or_path"]
    kwargs = {"num_labels": config.num_labels} if cls is AutoModelForSequenceClassification else {}
    model = cls.from_pretrained(base, dtype=torch.float32, attn_implementation="eager", **kwargs)
    return PeftModel.from_pretrained(model, folder).eval(), f" (PEFT adapter on {base})"


def check(folder):
    # An adapter folder lathe wrote holds the tuned model's config beside the adapter.
    tuned = os.path.join(folder, "tuned_config.json")
    config = AutoConfig.from_pretrained(tuned if os.path.exists(tuned) else folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    classifier = config.architectures[0].endswith("ForSequenceClassification")
    cls = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    model, how = load(folder, config, cls)
    rows = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in TEXTS]
    if classifier and getattr(config, "lathe_scoring", {}).get("append_eos"):
        rows = [r + [tokenizer.eos_token_id] for r in rows]
    ours = lathe_outputs(folder, rows)
    worst = 0.0
    with torch.no_grad():
        if classifier:
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), config.pad_token_id)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
            theirs = model(input_ids=ids, attention_mask=mask).logits
            worst = (theirs - torch.tensor(ours["scores"])).abs().max().item()
            detail = f"scores {[[round(v, 4) for v in row] for row in theirs.tolist()][:3]}"
        else:
            for r, logits in zip(rows, ours["logits"]):
                theirs = model(input_ids=torch.tensor([r])).logits[0]
                worst = max(worst, (theirs - torch.tensor(logits)).abs().max().item())
            detail = f"{sum(len(r) for r in rows)} positions x {config.vocab_size} logits"
            if tokenizer.chat_template:
                rendered = tokenizer.apply_chat_template(
                    [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}], tokenize=False
                )
                detail += f"; chat template renders {rendered!r}"
    verdict = "OK" if worst <= TOLERANCE else "MISMATCH"
    print(f"{verdict} {folder}: {cls.__name__}{how}, max |lathe - transformers| = {worst:.2e}; {detail}")
    return worst <= TOLERANCE


if __name__ == "__main__":
    folders = sys.argv[1:] or ["demo-out/sft", "demo-out/rm", "demo-out/guard"]
    results = [check(f) for f in folders]
    sys.exit(0 if all(results) else 1)
