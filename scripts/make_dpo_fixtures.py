#!/usr/bin/env python3
"""Write testdata/hf-tiny/dpo/: what TRL's DPOTrainer and KTOTrainer do on the fixture model.

  /work/bench-ref/venv/bin/python scripts/make_dpo_fixtures.py     # TRL 1.16, transformers 5.24, torch 2.15

From testdata/hf-tiny/causal-lm and short pairs cut from the first rows of
testdata/pref_hh_rlhf_harmless_base.slice.parquet (prompt: its last words, answers: their first
words), it writes

  pairs.parquet        SPEC preferences (prompt, chosen, rejected text), 24 pairs
  chat_pairs.parquet   the same pairs in TRL's conversational form (prompt / chosen / rejected messages)
  kto.parquet          TRL's unpaired form (prompt, completion, label), 24 rows, labels mixed
  expected.json        per loss (sigmoid, ipo, kto): the token ids TRL trains on and, for each of
                       5 optimizer steps at batch 4, the metrics TRL logs (loss, grad_norm,
                       rewards/*, logps/*, logits/*, kl)
  weights.safetensors  per loss, every 16th value of every tensor after the 5 steps
                       (`<loss>/<tensor name>`), to keep the file small

Settings shared by every run (lathe's parity test uses the same): AdamW lr 1e-3 constant,
betas (0.9, 0.999), eps 1e-8, no weight decay, clip 1.0, beta 0.1, max_length 64 (TRL keeps the
start; pairs whose prompt fills it are dropped), batches in file order (sequential sampling),
reference log-probs precomputed, float32 on the CPU; KTO weighs undesirable answers 1.5.
"""
import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "testdata", "hf-tiny", "causal-lm")
SOURCE = os.path.join(ROOT, "testdata", "pref_hh_rlhf_harmless_base.slice.parquet")
OUT = os.path.join(ROOT, "testdata", "hf-tiny", "dpo")
PAIRS = 24
STEPS = 5
BATCH = 4
LR = 1e-3
BETA = 0.1
MAX_LENGTH = 64
STRIDE = 16
UNDESIRABLE_WEIGHT = 1.5


def last_words(text, chars):
    cut = text[-chars:]
    return cut[cut.find(" ") + 1:] if " " in cut else cut


def first_words(text, chars):
    cut = text[:chars]
    return cut[: cut.rfind(" ")] if " " in cut[1:] else cut


def pairs():
    rows = pq.read_table(SOURCE).to_pylist()
    out = []
    for i, r in enumerate(rows[:PAIRS]):
        # Varied lengths, so padding, truncation at max_length and a dropped prompt all occur.
        prompt_chars = 30 + (i * 37) % 70 if i != 5 else 400
        answer_chars = 20 + (i * 53) % 70
        out.append({"prompt": last_words(r["prompt"], prompt_chars),
                    "chosen": first_words(r["chosen"], answer_chars),
                    "rejected": first_words(r["rejected"], answer_chars + 11)})
    return out


def chat(pair):
    return {"prompt": [{"role": "user", "content": pair["prompt"].replace("\n\nHuman: ", "").replace("\n\nAssistant:", "").strip()}],
            "chosen": [{"role": "assistant", "content": pair["chosen"].strip()}],
            "rejected": [{"role": "assistant", "content": pair["rejected"].strip()}]}


def unpaired(rows):
    # Three desirable answers to one undesirable, so batches mix labels and the KL estimate turns
    # positive within the 5 steps (it is clamped at 0).
    out = []
    for i, p in enumerate(rows):
        good = i % 4 != 0
        out.append({"prompt": p["prompt"], "completion": p["chosen"] if good else p["rejected"], "label": good})
    return out


def common_config(cls, **extra):
    return cls(output_dir=os.path.join("/tmp", "lathe_dpo_fixture"), max_steps=STEPS, per_device_train_batch_size=BATCH,
               per_device_eval_batch_size=BATCH, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
               weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
               beta=BETA, max_length=MAX_LENGTH, precompute_ref_log_probs=True, train_sampling_strategy="sequential",
               logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], bf16=False, fp16=False,
               use_cpu=True, gradient_checkpointing=False, dataloader_num_workers=0, seed=1, disable_tqdm=True, **extra)


METRICS = ["loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "kl"]


def run(loss, dataset):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    data = Dataset.from_list(dataset)
    if loss == "kto":
        trainer = KTOTrainer(model=model, args=common_config(KTOConfig, undesirable_weight=UNDESIRABLE_WEIGHT), train_dataset=data,
                             processing_class=tokenizer)
        keys = ["prompt_ids", "completion_ids", "KL_completion_ids", "label", "ref_logps", "ref_KL_logps"]
    else:
        trainer = DPOTrainer(model=model, args=common_config(DPOConfig, loss_type=[loss]), train_dataset=data,
                             processing_class=tokenizer)
        keys = ["prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps"]
    prepared = {k: list(trainer.train_dataset[k]) for k in keys}
    trainer.train()
    steps = [{k: log[k] for k in METRICS if k in log} for log in trainer.state.log_history if "loss" in log]
    assert len(steps) == STEPS, trainer.state.log_history
    weights = {f"{loss}/{name}": t.detach().flatten()[::STRIDE].contiguous().clone()
               for name, t in model.state_dict().items()}
    return {"prepared": prepared, "steps": steps}, weights


def tokenized(dataset):
    """The token ids DPOTrainer trains on for `dataset` (its prepared train set)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    trainer = DPOTrainer(model=model, args=common_config(DPOConfig, loss_type=["sigmoid"]),
                         train_dataset=Dataset.from_list(dataset), processing_class=tokenizer)
    return {k: list(trainer.train_dataset[k]) for k in ["prompt_ids", "chosen_ids", "rejected_ids"]}


def write_parquet(rows, path):
    pq.write_table(pa.Table.from_pylist(rows), path)


def main():
    import trl
    import transformers

    os.makedirs(OUT, exist_ok=True)
    text = pairs()
    conversational = [chat(p) for p in text]
    kto = unpaired(text)
    write_parquet(text, os.path.join(OUT, "pairs.parquet"))
    write_parquet(conversational, os.path.join(OUT, "chat_pairs.parquet"))
    write_parquet(kto, os.path.join(OUT, "kto.parquet"))
    expected = {"versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
                "settings": {"steps": STEPS, "batch": BATCH, "lr": LR, "beta": BETA, "max_length": MAX_LENGTH,
                             "weight_stride": STRIDE, "undesirable_weight": UNDESIRABLE_WEIGHT},
                "chat_tokenized": tokenized(conversational)}
    weights = {}
    for loss, data in (("sigmoid", text), ("ipo", text), ("kto", kto)):
        expected[loss], w = run(loss, data)
        weights.update(w)
        print(loss, json.dumps(expected[loss]["steps"][-1]), file=sys.stderr)
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, separators=(",", ":"))
        f.write("\n")
    from safetensors.torch import save_file
    save_file(weights, os.path.join(OUT, "weights.safetensors"))


if __name__ == "__main__":
    main()
