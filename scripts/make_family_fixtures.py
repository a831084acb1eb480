#!/usr/bin/env python3
"""Write testdata/families/: tiny random-weight models of every family lathe supports besides
Llama (whose fixture is testdata/hf-tiny), saved by transformers, with what transformers
computes on them. The expectations come from transformers + torch only, never from lathe.

    /work/bench-ref/venv/bin/python scripts/make_family_fixtures.py   # ../shared/bench/setup.sh's venv

For each family F, testdata/families/F/ holds:
- causal-lm/: `<F>ForCausalLM` as save_pretrained writes it (float32; Mistral's sharded with an
  index, to test shards), with hf-tiny's tokenizer and chat template;
- seq-cls/: `<F>ForSequenceClassification` (2 labels) on the same backbone, saved in bfloat16
  (real checkpoints ship bf16) — transformers reads it back as float32 for the expectations;
- expected.safetensors: for probe i, `input_ids.i`, `logits.i` [seq, vocab] (cache-free forward),
  `greedy.i` (16 greedy tokens, each from a cache-free forward of the whole sequence) and
  `greedy_logprob.i`; `cls_input_ids`, `cls_attention_mask` (right-padded with the pad id) and
  `cls_scores` [rows, 2] (transformers reads the last non-pad token);
- for qwen2 and gemma2, training.json and weights_after_10_steps.safetensors: ten AdamW steps on
  testdata/hf-tiny/train_batches.safetensors, exactly as testdata/hf-tiny's training record.

Every weight — norms and biases included — is drawn at random so that loading each one matters,
and the sequences are longer than every sliding window.
"""
import json
import math
import os
import shutil

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_TINY = os.path.join(ROOT, "testdata", "hf-tiny")
OUT = os.path.join(ROOT, "testdata", "families")

COMMON = dict(
    vocab_size=512,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    bos_token_id=None,
    eos_token_id=0,
    pad_token_id=3,
    attention_dropout=0.0,
)

FAMILIES = {
    # q/k/v biases (not o), Qwen's rope base, sliding window from layer max_window_layers on.
    "qwen2": dict(
        config=dict(
            model_type="qwen2",
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=1,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
        norm_offset=1.0,
    ),
    # per-head q/k RMSNorm, head_dim 16 != 32/4, yarn rope scaling, sliding layers as Qwen2.
    "qwen3": dict(
        config=dict(
            model_type="qwen3",
            head_dim=16,
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=1,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 1000000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
        norm_offset=1.0,
    ),
    # every layer sliding.
    "mistral": dict(
        config=dict(model_type="mistral", sliding_window=8, tie_word_embeddings=False),
        norm_offset=1.0,
        shard="120KB",
    ),
    # (1 + w) norms, embeddings scaled by sqrt(hidden), GeGLU (tanh GELU), explicit head_dim.
    "gemma": dict(
        config=dict(model_type="gemma", head_dim=16, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True),
        norm_offset=0.0,
    ),
    # Gemma + sandwich norms, query_pre_attn_scalar, both soft-caps, alternating sliding layers.
    "gemma2": dict(
        config=dict(
            model_type="gemma2",
            head_dim=16,
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=12,
            sliding_window=8,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
            tie_word_embeddings=True,
        ),
        norm_offset=0.0,
    ),
    # fused qkv_proj and gate_up_proj, partial rotary, longrope scaling, sliding window.
    "phi3": dict(
        config=dict(
            model_type="phi3",
            sliding_window=8,
            tie_word_embeddings=False,
            original_max_position_embeddings=32,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "short_factor": [1.0, 1.5],
                "long_factor": [2.0, 5.0],
            },
        ),
        norm_offset=1.0,
    ),
}

PROBE_TEXTS = [
    "ROMEO:\nBut soft! What light through yonder window breaks? It is the east, and Juliet is the sun.",
    "KING HENRY:\nOnce more unto the breach.",
]
CLS_TEXTS = [
    "Human: how do I bake bread?\n\nAssistant: Mix flour, water and yeast.",
    "I will find you.",
    "ROMEO:\nBut soft!",
]
PROBE_LENGTHS = [40, 13]
GREEDY_STEPS = 16


def make_config(family, spec):
    fields = dict(COMMON)
    fields.update(spec["config"])
    model_type = fields.pop("model_type")
    return transformers.AutoConfig.for_model(model_type, **fields)


def perturb(model, norm_offset, seed):
    """Random values in every tensor, so that a weight lathe failed to load would show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(norm_offset + 0.3 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.3 * noise)
            elif "embed_tokens" in name:
                p.copy_(0.05 * noise if norm_offset == 0.0 else 0.5 * noise)
            else:
                # Gemma's embeddings are scaled up by sqrt(hidden): larger layers keep greedy
                # decoding from just repeating the input.
                p.copy_((0.4 if norm_offset == 0.0 else 0.2) * noise)


def copy_tokenizer(dest):
    for name in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]:
        shutil.copy(os.path.join(HF_TINY, "causal-lm", name), os.path.join(dest, name))


def probe_ids(tokenizer):
    rows = []
    for text, length in zip(PROBE_TEXTS, PROBE_LENGTHS):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) >= length, (text, len(ids))
        rows.append(ids[:length])
    return rows


@torch.no_grad()
def greedy(model, ids):
    """Greedy tokens, each from a forward of the whole sequence (no cache)."""
    seq = list(ids)
    total = 0.0
    for _ in range(GREEDY_STEPS):
        logits = model(input_ids=torch.tensor([seq])).logits[0, -1]
        logp = torch.log_softmax(logits.double(), -1)
        nxt = int(torch.argmax(logits))
        total += float(logp[nxt])
        seq.append(nxt)
    return seq[len(ids):], total


@torch.no_grad()
def check_cached_generate(model, ids, expected):
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=GREEDY_STEPS, do_sample=False, eos_token_id=None, pad_token_id=3
    )
    got = out[0, len(ids):].tolist()
    if got != expected:
        print(f"   note: transformers' cached generate gives {got}, cache-free {expected}")


def train_ten_steps(model, dest):
    """As testdata/hf-tiny's training record: AdamW lr 1e-3, betas (0.9, 0.95), eps 1e-8, decay
    0.1 on tensors with >= 2 dims, clip 1.0, mean next-token cross-entropy."""
    batches = load_file(os.path.join(HF_TINY, "train_batches.safetensors"))["batches"].long()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
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
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        losses.append(float(loss.detach()))
        opt.step()
    model.eval()
    # Tied weights are stored once, under the embedding's name, as save_pretrained does.
    weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    save_file(weights, os.path.join(dest, "weights_after_10_steps.safetensors"), metadata={"format": "pt"})
    record = {
        "batches": "testdata/hf-tiny/train_batches.safetensors",
        "optimizer": {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "decay_on": "dim >= 2"},
        "clip_grad_norm": 1.0,
        "loss": "mean next-token cross-entropy",
        "losses": losses,
        "grad_norms_before_clip": norms,
    }
    with open(os.path.join(dest, "training.json"), "w") as f:
        json.dump(record, f, indent=2)
    print(f"   training: loss {losses[0]:.4f} -> {losses[-1]:.4f}")


def build(family, spec, seed):
    dest = os.path.join(OUT, family)
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(HF_TINY, "causal-lm"))
    config = make_config(family, spec)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    perturb(model, spec["norm_offset"], seed)
    causal_dir = os.path.join(dest, "causal-lm")
    model.save_pretrained(causal_dir, max_shard_size=spec.get("shard", "50GB"))
    copy_tokenizer(causal_dir)
    # What transformers computes on the folder as saved, read back as a user would.
    model = AutoModelForCausalLM.from_pretrained(causal_dir, dtype=torch.float32, attn_implementation="eager").eval()

    tensors = {}
    with torch.no_grad():
        for i, ids in enumerate(probe_ids(tokenizer)):
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            tokens, logprob = greedy(model, ids)
            check_cached_generate(model, ids, tokens)
            tensors[f"input_ids.{i}"] = torch.tensor(ids, dtype=torch.int64)
            tensors[f"logits.{i}"] = logits.float().contiguous()
            tensors[f"greedy.{i}"] = torch.tensor(tokens, dtype=torch.int64)
            tensors[f"greedy_logprob.{i}"] = torch.tensor([logprob], dtype=torch.float32)
            print(f"   probe {i}: {len(ids)} tokens, |logits| max {logits.abs().max():.2f}, greedy {tokens[:6]}...")

    cls_dir = os.path.join(dest, "seq-cls")
    cls_config = make_config(family, spec)
    cls_config.num_labels = 2
    classifier = AutoModelForSequenceClassification.from_config(cls_config, attn_implementation="eager")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("lm_head")}
    missing = classifier.load_state_dict(state, strict=False)
    assert missing.missing_keys == ["score.weight"], missing
    with torch.no_grad():
        classifier.score.weight.copy_(0.3 * torch.randn(classifier.score.weight.shape, generator=torch.Generator().manual_seed(seed + 1)))
    classifier.to(torch.bfloat16).save_pretrained(cls_dir)
    copy_tokenizer(cls_dir)
    classifier = AutoModelForSequenceClassification.from_pretrained(
        cls_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] + [0] for t in CLS_TEXTS]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), COMMON["pad_token_id"], dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
    with torch.no_grad():
        scores = classifier(input_ids=ids, attention_mask=mask).logits
    tensors["cls_input_ids"] = ids
    tensors["cls_attention_mask"] = mask
    tensors["cls_scores"] = scores.float().contiguous()
    save_file(tensors, os.path.join(dest, "expected.safetensors"), metadata={"format": "pt"})
    print(f"   classifier scores {[[round(v, 4) for v in row] for row in scores.tolist()]}")

    if family in ("qwen2", "gemma2"):
        train_ten_steps(model, dest)


def softcap_matters():
    """The Gemma 2 fixture is only a test of soft-capping if capping changes its logits."""
    folder = os.path.join(OUT, "gemma2", "causal-lm")
    capped = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    config = transformers.AutoConfig.from_pretrained(folder)
    config.attn_logit_softcapping = None
    config.final_logit_softcapping = None
    plain = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.tensor([list(range(4, 44))])
    with torch.no_grad():
        diff = (capped(input_ids=ids).logits - plain(input_ids=ids).logits).abs().max().item()
    print(f"gemma2: soft-capping moves logits by up to {diff:.3f}")
    assert diff > 0.1


def main():
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    torch.set_num_threads(2)
    for seed, (family, spec) in enumerate(FAMILIES.items(), start=10):
        print(f"== {family}")
        build(family, spec, seed)
    softcap_matters()
    with open(os.path.join(OUT, "made_by.json"), "w") as f:
        json.dump({"transformers": transformers.__version__, "torch": torch.__version__,
                   "script": "scripts/make_family_fixtures.py"}, f, indent=2)


if __name__ == "__main__":
    main()
