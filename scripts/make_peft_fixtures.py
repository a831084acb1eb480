#!/usr/bin/env python3
"""Write testdata/peft/: LoRA adapters saved by PEFT on testdata/hf-tiny's models, with what
PEFT + transformers + torch compute on them. The expectations come from PEFT, never from lathe.

    /work/bench-ref/venv/bin/python scripts/make_peft_fixtures.py   # ../shared/bench/setup.sh's venv

- causal-adapter/: r 4, alpha 8, all-linear, on hf-tiny/causal-lm, with random A *and* B (so the
  adapter changes the logits); expected.safetensors holds `input_ids`, the PEFT model's `logits`,
  and `merged.*`: layer 0's weights after `merge_and_unload()`.
- cls-adapter/: a SEQ_CLS adapter (rsLoRA, r 4, alpha 6, q_proj/v_proj by name) on hf-tiny/causal-lm
  read as a 1-label classifier, its `score` head saved in full (`modules_to_save`); expected
  `cls_input_ids`, `cls_attention_mask`, `cls_scores`.
- train-init/: a PEFT-initialised adapter (A Kaiming-uniform, B zero), r 4, alpha 8, all-linear;
  training.json and weights_after_10_steps.safetensors: ten AdamW steps on
  hf-tiny/train_batches.safetensors (lr 1e-3, betas 0.9/0.95, eps 1e-8, decay 0.1 on >= 2-dim
  tensors, clip 1.0, mean next-token cross-entropy), only the adapter training.
"""
import json
import os
import shutil

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_TINY = os.path.join(ROOT, "testdata", "hf-tiny")
BASE = os.path.join(HF_TINY, "causal-lm")
OUT = os.path.join(ROOT, "testdata", "peft")
# Adapters name their base relative to themselves, as lathe resolves it.
BASE_FROM_ADAPTER = "../../hf-tiny/causal-lm"


def base_model(cls=AutoModelForCausalLM, **kwargs):
    return cls.from_pretrained(BASE, dtype=torch.float32, attn_implementation="eager", **kwargs).eval()


def randomise_adapter(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def point_at_base(dest):
    path = os.path.join(dest, "adapter_config.json")
    config = json.load(open(path))
    config["base_model_name_or_path"] = BASE_FROM_ADAPTER
    json.dump(config, open(path, "w"), indent=2)
    readme = os.path.join(dest, "README.md")
    if os.path.exists(readme):
        os.remove(readme)


def probe_ids():
    tokenizer = AutoTokenizer.from_pretrained(BASE)
    text = "ROMEO:\nBut soft! What light through yonder window breaks? It is the east."
    return tokenizer(text, add_special_tokens=False)["input_ids"][:24]


def causal_adapter(tensors):
    dest = os.path.join(OUT, "causal-adapter")
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(base_model(), config)
    randomise_adapter(model, 1)
    model.save_pretrained(dest)
    point_at_base(dest)
    # What a user gets loading the folder back.
    model = PeftModel.from_pretrained(base_model(), dest).eval()
    ids = probe_ids()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        base_logits = base_model()(input_ids=torch.tensor([ids])).logits[0]
    assert (logits - base_logits).abs().max() > 0.1, "the adapter must change the logits"
    tensors["input_ids"] = torch.tensor(ids, dtype=torch.int64)
    tensors["logits"] = logits.contiguous()
    merged = model.merge_and_unload()
    for name, value in merged.state_dict().items():
        if name.startswith("model.layers.0."):
            tensors[f"merged.{name}"] = value.detach().contiguous()
    print(f"causal-adapter: logits moved by {(logits - base_logits).abs().max():.3f} from the base")


def cls_adapter(tensors):
    dest = os.path.join(OUT, "cls-adapter")
    config = LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj"], use_rslora=True, task_type="SEQ_CLS")
    model = base_model(AutoModelForSequenceClassification, num_labels=1)
    with torch.no_grad():
        model.score.weight.copy_(0.3 * torch.randn(model.score.weight.shape, generator=torch.Generator().manual_seed(3)))
    model = get_peft_model(model, config)
    randomise_adapter(model, 2)
    model.save_pretrained(dest)
    point_at_base(dest)
    model = PeftModel.from_pretrained(base_model(AutoModelForSequenceClassification, num_labels=1), dest).eval()
    tokenizer = AutoTokenizer.from_pretrained(BASE)
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] + [0] for t in ["I will find you.", "ROMEO:\nBut soft! What light?"]]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), 3, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
    with torch.no_grad():
        scores = model(input_ids=ids, attention_mask=mask).logits
    tensors["cls_input_ids"] = ids
    tensors["cls_attention_mask"] = mask
    tensors["cls_scores"] = scores.contiguous()
    print(f"cls-adapter: scores {scores.flatten().tolist()}")


def train_ten_steps():
    dest = os.path.join(OUT, "train-init")
    torch.manual_seed(4)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(base_model(), config)
    model.save_pretrained(dest)
    point_at_base(dest)
    batches = load_file(os.path.join(HF_TINY, "train_batches.safetensors"))["batches"].long()
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
    )
    model.train()
    losses, norms = [], []
    for batch in batches:
        x, y = batch[:, :-1], batch[:, 1:]
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(trainable, 1.0)))
        losses.append(float(loss.detach()))
        opt.step()
    after = os.path.join(OUT, "after")
    model.save_pretrained(after)
    shutil.move(os.path.join(after, "adapter_model.safetensors"), os.path.join(OUT, "weights_after_10_steps.safetensors"))
    shutil.rmtree(after)
    json.dump({"losses": losses, "grad_norms_before_clip": norms, "optimizer": "AdamW lr 1e-3 betas (0.9, 0.95) eps 1e-8 decay 0.1 (dim >= 2), clip 1.0"},
              open(os.path.join(OUT, "training.json"), "w"), indent=2)
    print(f"train: loss {losses[0]:.4f} -> {losses[-1]:.4f}")


def main():
    print(f"peft {peft.__version__}, transformers {transformers.__version__}, torch {torch.__version__}")
    torch.set_num_threads(2)
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    tensors = {}
    causal_adapter(tensors)
    cls_adapter(tensors)
    save_file(tensors, os.path.join(OUT, "expected.safetensors"), metadata={"format": "pt"})
    train_ten_steps()
    json.dump({"peft": peft.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
               "script": "scripts/make_peft_fixtures.py"}, open(os.path.join(OUT, "made_by.json"), "w"), indent=2)


if __name__ == "__main__":
    main()
