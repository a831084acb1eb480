#!/usr/bin/env python3
"""Benchmark `pretrain` and `generate` on the shapes of ../shared/bench/; one JSON object per line.

  peak      the sitting's f32 matmul peak through candle/gemm on the bench-tiny step's shapes
            (examples/matmul_peak.rs, best of 20 per shape); the pretrain row gives its GFLOP/s
            (58.2 GFLOP a step) and their fraction of that peak.
  pretrain  recipes/bench-tiny.toml (vocab 4096, hidden 256, intermediate 688, 4 layers, 4 heads,
            tied embeddings, seq 256, batch 8, AdamW lr 3e-4 (0.9, 0.95), wd 0.1, no clipping):
            3 warm-up steps, then tokens/s over 20 timed steps (the reference's workload), and the
            peak RSS of the whole command. The token ids are real text (the 10 MB pydoc corpus
            encoded with a 4096 vocabulary): the compute does not depend on which ids they are.
  rm-train  reward_ref.py's workload: a randomly initialised model of that shape (`pretrain --steps
            0`) as LlamaForSequenceClassification on testdata/pref_hh_rlhf_harmless_base.parquet
            (first 1,038 pairs train, last 115 held out), prompt + answer + EOS cut to 256 tokens
            keeping the end, batch 8 pairs, AdamW lr 3e-4 constant, wd 0.1, clip 1.0, one epoch
            (130 steps); pairs/s after 3 warm-up steps, held-out accuracy. The reference runs
            with the same tokenizer (`--impl torch`: TRL's RewardTrainer gives the same figures).
  ppo       ppo_ref.py's workload (TRL 1.12 PPOTrainer): bench-tiny policy, reward and value models
            (random init, as the reference without checkpoints), prompts = the `prompt` column of
            testdata/pref_hh_rlhf_harmless_base.parquet cut to their last 64 tokens, batch 8, 64 new
            tokens always (EOS ignored, as TRL without a stop token), temperature 0.7, 4 PPO epochs,
            1 minibatch, kl 0.05 (k1), AdamW lr 3e-6 linear, 5 updates; episodes/s = 8 / mean
            update time over updates 2-5 (rollout + scoring + 4 epochs), as the reference times it.
  dpo       dpo_ref.py's workload (TRL DPOTrainer, sigmoid, beta 0.1): the random bench-tiny model of
            rm-train (policy and reference start equal) on the same hh-rlhf pairs (first 1,038 train,
            last 115 held out: cut with REFERENCE_PYTHON's pyarrow when given, else --val-fraction),
            max length 256 (the start kept; pairs whose prompt fills it left out, as TRL), batch 8
            pairs, AdamW lr 1e-4 constant, betas (0.9, 0.999), no weight decay, clip 1.0, reference
            log-probabilities precomputed, 40 steps; pairs/s after 3 warm-up steps (the reference
            pass not counted, as the reference times it), held-out rewards/accuracies, peak RSS.
            The reference runs on the same model folder (same tokenizer and initial weights).
  sft       (only with --only sft: ~8 minutes with the reference, which writes the shape) full fine-tuning
            on the SmolLM2-135M shape (`shapes.py smollm2-135m`), the Alpaca prompt/completion rows, batch 4,
            max length 512, AdamW lr 2e-5 constant, 8 steps, without and with --gradient-checkpointing;
            tokens/s over steps 3-8 and peak RSS, beside sft_ref.py (TRL SFTTrainer, f32).
  sft-lora  (only with --only sft-lora: ~25 minutes with the reference) sft_ref.py --lora-r 16's workload:
            the Qwen2.5-0.5B shape (random weights, `shapes.py qwen2.5-0.5b`, made once with
            REFERENCE_PYTHON under bench-out/), the Alpaca prompt/completion rows of ../shared/data,
            batch 4, max length 512, no packing, LoRA r 16 (alpha 32) on all linear layers, AdamW
            lr 2e-4 constant, 8 steps, with --gradient-checkpointing; tokens/s over steps 3-8 (as
            the reference times them), peak RSS.
  generate  the model that run wrote: 16-ish-token prompts, 128 new tokens each (EOS ignored, as the
            reference sets min_new_tokens), batch 1 (64 prompts one at a time) and batch 8 (64
            prompts, 8 at a time), greedy and plain sampling (temperature 1, no top-k/top-p).

  python3 bench/bench_train_generate.py                        # lathe only
  python3 bench/bench_train_generate.py --reference-python PY  # also ../shared/bench's PyTorch scripts
"""
import argparse
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench-out")
BIN = os.path.join(ROOT, "target", "release")
REFERENCE = os.path.join(ROOT, "..", "shared", "bench")
sys.path.insert(0, os.path.join(ROOT, "bench"))
from bench_tokenize import make_synthetic, timed as run  # noqa: E402


def emit(record):
    print(json.dumps(record), flush=True)


def prepare(threads):
    synthetic = os.path.join(OUT, "synthetic_pydoc_10MB.txt")
    if not os.path.exists(synthetic):
        make_synthetic(synthetic, 10.0)
    tokenizer = os.path.join(OUT, "tok_bench_4096.json")
    tokens = os.path.join(OUT, "bench_tokens.parquet")
    if not os.path.exists(tokens):
        run([f"{BIN}/tokenize", "train", synthetic, "--vocab-size", "4096", "-o", tokenizer, "-q"])
        run([f"{BIN}/tokenize", "encode", synthetic, "--tokenizer", tokenizer, "-o", tokens, "-q", "--threads", str(threads)])
    return tokenizer, tokens


def example_figure(name, threads, key, **extra):
    """Run examples/NAME.rs (one JSON line), print its line (with `extra`) and return its `key`."""
    out = subprocess.run([os.path.join(ROOT, "target", "release", "examples", name), str(threads)],
                         capture_output=True, check=True, text=True)
    record = json.loads(out.stdout)
    record.update(extra)
    emit(record)
    return record[key]


def cpu_model():
    """The CPU as /proc/cpuinfo names it ("AMD EPYC family 25 model 17"), so that sittings on
    different hosts can be told apart: on family 25 (Zen 4, whose AVX-512 runs on 256-bit units)
    gemm's peak was 197 GFLOP/s on 2 cores, about MKL's; other sittings, whose CPU was not
    recorded, reached 405-441."""
    fields = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return None
    return f"{fields.get('model name', '?')} family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"


def bench_peak(threads):
    """The sitting's f32 matmul peak on the bench-tiny step's shapes (examples/matmul_peak.rs)."""
    return example_figure("matmul_peak", threads, "gflops", cpu=cpu_model())


def bench_tiny_step_gflop():
    """FLOPs of one bench-tiny training step: 6 × matmul parameters × tokens (forward and
    backward), plus attention scores and values counted in full (not halved for the causal
    mask), 3 × 4·b·s²·h per layer: 58.2 GFLOP."""
    hidden, inter, layers, vocab, seq, batch = 256, 688, 4, 4096, 256, 8
    params = layers * (4 * hidden * hidden + 3 * hidden * inter) + vocab * hidden
    attention = layers * 3 * 4 * batch * seq * seq * hidden
    return (6 * params * batch * seq + attention) / 1e9


def bench_pretrain(tokenizer, tokens, threads, peak=None):
    run_dir = os.path.join(OUT, "bench_tiny_run")
    subprocess.run(["rm", "-rf", run_dir], check=True)
    _, rss, _ = run([f"{BIN}/pretrain", tokens, "--tokenizer", tokenizer, "--config", os.path.join(ROOT, "recipes", "bench-tiny.toml"),
                     "-o", run_dir, "--threads", str(threads), "-q"])
    timed = logged_steps(run_dir)[3:23]
    tokens_total = 8 * 256 * len(timed)
    seconds = sum(8 * 256 / s["tokens_per_second"] for s in timed)
    gflops = bench_tiny_step_gflop() * len(timed) / seconds
    record = {"bench": "pretrain", "recipe": "bench-tiny", "threads": threads, "timed_steps": len(timed),
              "tokens_per_s": round(tokens_total / seconds, 1), "ms_per_step": round(1000 * seconds / len(timed), 1),
              "gflops": round(gflops, 1), "peak_rss_mb": round(rss, 1)}
    if peak:
        record["fraction_of_peak"] = round(gflops / peak, 3)
    emit(record)
    return run_dir


def bench_generate(model, threads):
    prompts = os.path.join(OUT, "bench_prompts.jsonl")
    base = "The quick brown fox jumps over the lazy dog while the cat sleeps near"
    with open(prompts, "w") as f:
        for i in range(64):
            f.write(json.dumps({"prompt": f"{base} {i}"}) + "\n")
    for batch in (1, 8):
        for mode, temperature in (("greedy", "0"), ("sample", "1")):
            rates = []
            for _ in range(3):
                _, _, stderr = run([f"{BIN}/generate", prompts, "--model", model, "--max-new-tokens", "128", "--ignore-eos",
                                    "--temperature", temperature, "--top-p", "1", "--top-k", "0", "--batch-size", str(batch),
                                    "-o", os.path.join(OUT, "bench_responses.parquet"), "--threads", str(threads)])
                rates.append(float(re.search(r"tokens/s ([0-9.]+)", stderr).group(1)))
            emit({"bench": "generate", "batch": batch, "mode": mode, "new_tokens": 128, "threads": threads,
                  "tokens_per_s": sorted(rates)[1]})


REWARD_DATA = os.path.join(ROOT, "testdata", "pref_hh_rlhf_harmless_base.parquet")


def bench_tiny_init(tokenizer, tokens):
    base = os.path.join(OUT, "bench_tiny_init")
    subprocess.run(["rm", "-rf", base], check=True)
    run([f"{BIN}/pretrain", tokens, "--tokenizer", tokenizer, "--config", os.path.join(ROOT, "recipes", "bench-tiny.toml"),
         "-o", base, "--steps", "0", "-q"])
    return base


def logged_steps(run_dir):
    """The optimizer steps a run has logged so far in its metrics.jsonl."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if '"loss"' in line]


def timed_steps(run_dir, skip, until=None):
    """Optimizer steps logged in a run's metrics.jsonl, and the steps after the first `skip`
    (up to step `until`, when given): how many, their seconds and their tokens."""
    steps = logged_steps(run_dir)
    timed, seconds, tokens, previous = 0, 0.0, 0, 0
    for step in steps:
        if step["step"] > skip and (until is None or step["step"] <= until):
            timed += 1
            seconds += (step["tokens_seen"] - previous) / step["tokens_per_second"]
            tokens += step["tokens_seen"] - previous
        previous = step["tokens_seen"]
    return len(steps), timed, seconds, tokens


def pairs_per_second(run_dir, batch):
    """Optimizer steps logged in a run's metrics.jsonl, and pairs/s over the steps after the first 3."""
    steps, timed, seconds, _ = timed_steps(run_dir, 3)
    return steps, batch * timed / seconds


def tokens_per_second(run_dir, skip):
    """Optimizer steps logged, and non-padding tokens per second over the steps after the first `skip`."""
    steps, _, seconds, tokens = timed_steps(run_dir, skip)
    return steps, tokens / seconds


def shape_model(python, reference, shape, who):
    """A random model folder of a real checkpoint's shape, written once under bench-out/ by
    ../shared/bench/shapes.py (which needs REFERENCE_PYTHON's transformers)."""
    model = os.path.join(OUT, shape)
    if not os.path.exists(os.path.join(model, "config.json")):
        if not python:
            sys.exit(f"{who}: set REFERENCE_PYTHON (it writes the {shape} shape with shapes.py)")
        subprocess.run([python, os.path.join(reference, "shapes.py"), shape, model], check=True, stdout=subprocess.DEVNULL)
    return model


def bench_sft_lora(python, reference, threads):
    model = shape_model(python, reference, "qwen2.5-0.5b", "bench sft-lora")
    data = os.path.join(reference, "..", "data", "sft_alpaca_prompt_completion.parquet")
    run_dir = os.path.join(OUT, "bench_sft_lora_run")
    subprocess.run(["rm", "-rf", run_dir], check=True)
    _, rss, _ = run([f"{BIN}/sft", data, "--model", model, "-o", run_dir, "--lora-r", "16", "--batch-size", "4",
                     "--max-length", "512", "--steps", "8", "--lr", "2e-4", "--schedule", "constant",
                     "--gradient-checkpointing", "--eval-every", "0", "--checkpoint-every", "0", "--threads", str(threads), "-q"])
    steps, per_s = tokens_per_second(run_dir, 2)
    emit({"bench": "sft", "model": "qwen2.5-0.5b", "lora_r": 16, "batch": 4, "max_length": 512, "gradient_checkpointing": True,
          "threads": threads, "steps": steps, "tokens_per_s": round(per_s, 1), "peak_rss_mb": round(rss, 1)})
    if python:
        out = os.path.join(OUT, "reference_sft_lora.json")
        subprocess.run([python, os.path.join(reference, "sft_ref.py"), "--model", model, "--data", data, "--lora-r", "16",
                        "--threads", str(threads), "--json", out], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        result = json.load(open(out))
        emit({"bench": "reference_sft", "impl": result["impl"], "model": "qwen2.5-0.5b", "lora_r": 16, "threads": threads,
              "steps": result["steps"], "tokens_per_s": result["tokens_per_s"], "peak_rss_mb": result["peak_rss_mb"]})


def bench_sft_135m(python, reference, threads):
    """Full fine-tuning on the SmolLM2-135M shape, without and with checkpointing, beside
    sft_ref.py (TRL SFTTrainer, f32)."""
    model = shape_model(python, reference, "smollm2-135m", "bench sft")
    data = os.path.join(reference, "..", "data", "sft_alpaca_prompt_completion.parquet")
    run_dir = os.path.join(OUT, "bench_sft_135m_run")
    for checkpointing in (False, True):
        subprocess.run(["rm", "-rf", run_dir], check=True)
        _, rss, _ = run([f"{BIN}/sft", data, "--model", model, "-o", run_dir, "--batch-size", "4", "--max-length", "512",
                         "--steps", "8", "--lr", "2e-5", "--schedule", "constant", "--eval-every", "0", "--checkpoint-every", "0",
                         "--threads", str(threads), "-q"] + (["--gradient-checkpointing"] if checkpointing else []))
        steps, per_s = tokens_per_second(run_dir, 2)
        emit({"bench": "sft", "model": "smollm2-135m", "batch": 4, "max_length": 512, "gradient_checkpointing": checkpointing,
              "threads": threads, "steps": steps, "tokens_per_s": round(per_s, 1), "peak_rss_mb": round(rss, 1)})
    if python:
        out = os.path.join(OUT, "reference_sft_135m.json")
        subprocess.run([python, os.path.join(reference, "sft_ref.py"), "--model", model, "--data", data,
                        "--threads", str(threads), "--json", out], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        result = json.load(open(out))
        emit({"bench": "reference_sft", "impl": result["impl"], "model": "smollm2-135m", "threads": threads,
              "steps": result["steps"], "tokens_per_s": result["tokens_per_s"], "peak_rss_mb": result["peak_rss_mb"]})


def bench_reward(tokenizer, tokens, threads):
    base = bench_tiny_init(tokenizer, tokens)
    run_dir = os.path.join(OUT, "bench_reward_run")
    subprocess.run(["rm", "-rf", run_dir], check=True)
    # 0.0997 of 1,153 pairs rounds up to the reference's 115 held-out pairs.
    _, rss, _ = run([f"{BIN}/rm-train", REWARD_DATA, "--model", base, "-o", run_dir, "--max-length", "256",
                     "--truncation", "left", "--batch-size", "8", "--steps", "130", "--lr", "3e-4", "--schedule", "constant",
                     "--weight-decay", "0.1", "--grad-clip", "1.0", "--val-fraction", "0.0997", "--eval-every", "0",
                     "--checkpoint-every", "0", "--threads", str(threads), "-q"])
    _, pairs_per_s = pairs_per_second(run_dir, 8)
    evaluation = json.load(open(os.path.join(run_dir, "eval.json")))
    emit({"bench": "rm-train", "task": "preference", "threads": threads, "train_pairs": evaluation["examples"],
          "eval_pairs": evaluation["held_out"], "pairs_per_s": round(pairs_per_s, 2),
          "eval_accuracy": round(evaluation["eval_accuracy"], 4), "peak_rss_mb": round(rss, 1)})


def bench_reference_reward(python, tokenizer, threads):
    out = os.path.join(OUT, "reference_reward.json")
    subprocess.run([python, os.path.join(REFERENCE, "reward_ref.py"), "--impl", "torch", "--data", REWARD_DATA,
                    "--tokenizer", tokenizer, "--threads", str(threads), "--out-dir", "", "--json", out],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = json.load(open(out))
    emit({"bench": "reference_rm-train", "impl": "pytorch-loop", "threads": threads, "train_pairs": result["train_pairs"],
          "eval_pairs": result["eval_pairs"], "pairs_per_s": round(result["pairs_per_s"], 2),
          "eval_accuracy": round(result["eval_acc_after"], 4), "peak_rss_mb": round(result["peak_rss_mib"] * 1.048576, 1)})


def bench_ppo(tokenizer, tokens, threads):
    base = os.path.join(OUT, "bench_ppo_policy")
    reward = os.path.join(OUT, "bench_ppo_reward")
    run_dir = os.path.join(OUT, "bench_ppo_run")
    subprocess.run(["rm", "-rf", base, reward, run_dir], check=True)
    run([f"{BIN}/pretrain", tokens, "--tokenizer", tokenizer, "--config", os.path.join(ROOT, "recipes", "bench-tiny.toml"),
         "-o", base, "--steps", "0", "-q"])
    run([f"{BIN}/rm-train", REWARD_DATA, "--model", base, "-o", reward, "--steps", "0", "--max-length", "256", "-q"])
    _, rss, _ = run([f"{BIN}/ppo", REWARD_DATA, "--policy", base, "--reward-model", reward, "-o", run_dir,
                     "--batch-size", "8", "--max-prompt-length", "64", "--max-new-tokens", "64", "--ignore-eos",
                     "--temperature", "0.7", "--ppo-epochs", "4", "--minibatches", "1", "--kl-coef", "0.05",
                     "--lr", "3e-6", "--updates", "5", "--eval-every", "0", "--checkpoint-every", "0",
                     "--threads", str(threads), "-q"])
    updates = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"time/update_seconds"' in line]
    timed = [u["time/update_seconds"] for u in updates[1:]]
    emit({"bench": "ppo", "threads": threads, "updates": len(updates), "batch": 8, "prompt_len": 64, "response_len": 64,
          "ppo_epochs": 4, "episodes_per_s": round(8 * len(timed) / sum(timed), 2),
          "rollout_share": round(sum(u["time/rollout_seconds"] for u in updates[1:]) / sum(timed), 3),
          "peak_rss_mb": round(rss, 1)})


def bench_reference_ppo(python, reference, tokenizer, threads):
    out = os.path.join(OUT, "reference_ppo.json")
    missing = os.path.join(OUT, "no_checkpoint")  # random init of policy and reward, as ours
    subprocess.run([python, os.path.join(reference, "ppo_ref.py"), "--policy", missing, "--reward", missing,
                    "--tokenizer", tokenizer, "--data", REWARD_DATA, "--threads", str(threads), "--json", out],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = json.load(open(out))
    emit({"bench": "reference_ppo", "impl": f"trl-{result['trl']}", "threads": threads, "updates": result["updates"],
          "batch": result["batch"], "episodes_per_s": round(result["episodes_per_s"], 2),
          "peak_rss_mb": round(result["peak_rss_mib"] * 1.048576, 1)})


def dpo_split(python):
    """The reference's split of REWARD_DATA as two files (needs pyarrow), else None."""
    if not python:
        return None
    train, held = os.path.join(OUT, "dpo_train.parquet"), os.path.join(OUT, "dpo_held.parquet")
    code = ("import pyarrow.parquet as pq, sys; t = pq.read_table(sys.argv[1]); "
            "pq.write_table(t.slice(0, 1038), sys.argv[2]); pq.write_table(t.slice(1038), sys.argv[3])")
    subprocess.run([python, "-c", code, REWARD_DATA, train, held], check=True)
    return train, held


def bench_dpo(tokenizer, tokens, threads, python):
    base = bench_tiny_init(tokenizer, tokens)
    run_dir = os.path.join(OUT, "bench_dpo_run")
    subprocess.run(["rm", "-rf", run_dir], check=True)
    split = dpo_split(python)
    data = [split[0], "--val", split[1]] if split else [REWARD_DATA, "--val-fraction", "0.0997"]
    _, rss, _ = run([f"{BIN}/dpo", *data, "--model", base, "-o", run_dir, "--loss", "sigmoid", "--beta", "0.1",
                     "--max-length", "256", "--batch-size", "8", "--steps", "40", "--lr", "1e-4", "--schedule", "constant",
                     "--beta1", "0.9", "--beta2", "0.999", "--weight-decay", "0", "--grad-clip", "1.0", "--eval-every", "0",
                     "--checkpoint-every", "0", "--threads", str(threads), "-q"])
    steps, pairs_per_s = pairs_per_second(run_dir, 8)
    evaluation = json.load(open(os.path.join(run_dir, "eval.json")))
    emit({"bench": "dpo", "loss": "sigmoid", "threads": threads, "train_pairs": evaluation["examples"],
          "eval_pairs": evaluation["held_out"], "steps": steps, "pairs_per_s": round(pairs_per_s, 2),
          "eval_rewards_accuracies": round(evaluation["eval_rewards/accuracies"], 4), "peak_rss_mb": round(rss, 1)})
    return base


def bench_reference_dpo(python, reference, base, threads):
    out = os.path.join(OUT, "reference_dpo.json")
    # dpo_ref.py cuts the same 1,038 / 115 pairs itself.
    subprocess.run([python, os.path.join(reference, "dpo_ref.py"), "--model", base, "--data", REWARD_DATA,
                    "--threads", str(threads), "--json", out], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = json.load(open(out))
    emit({"bench": "reference_dpo", "impl": "trl-dpo", "threads": threads, "steps": result["steps"],
          "pairs_per_s": result["pairs_per_s"], "eval_rewards_accuracies": result["eval_rewards_accuracies"],
          "peak_rss_mb": result["peak_rss_mb"]})


def bench_reference(python, threads):
    train_json = os.path.join(OUT, "reference_train.json")
    ckpt = os.path.join(OUT, "reference_tiny_llama")
    subprocess.run([python, os.path.join(REFERENCE, "train_tiny_llama.py"), "--threads", str(threads), "--save-dir", ckpt,
                    "--json", train_json], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    train = json.load(open(train_json))
    emit({"bench": "reference_pretrain", "impl": "pytorch-eager", "threads": threads,
          "tokens_per_s": round(train["tokens_per_s"], 1), "ms_per_step": round(train["ms_per_step_mean"], 1),
          "peak_rss_mb": round(train["peak_rss_mib"] * 1.048576, 1)})
    gen_json = os.path.join(OUT, "reference_generate.json")
    subprocess.run([python, os.path.join(REFERENCE, "generate_ref.py"), "--threads", str(threads), "--model-dir", ckpt,
                    "--json", gen_json], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for result in json.load(open(gen_json))["results"]:
        emit({"bench": "reference_generate", "impl": "hf-generate", "batch": result["batch"], "mode": result["mode"],
              "new_tokens": 128, "threads": threads, "tokens_per_s": round(result["tokens_per_s"], 1)})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reference-python", default=None, help="python with torch + transformers for ../shared/bench")
    ap.add_argument("--only", choices=["pretrain", "generate", "rm-train", "ppo", "dpo", "sft", "sft-lora"], default=None, help="one workload (and its reference)")
    ap.add_argument("--reference-dir", default=REFERENCE, help="../shared/bench, or a writable copy of it with its venv")
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    if args.only == "sft-lora":
        bench_sft_lora(args.reference_python, args.reference_dir, args.threads)
        return
    if args.only == "sft":
        bench_sft_135m(args.reference_python, args.reference_dir, args.threads)
        return
    tokenizer, tokens = prepare(args.threads)
    if args.only in (None, "pretrain", "generate"):
        peak = bench_peak(args.threads)
        model = bench_pretrain(tokenizer, tokens, args.threads, peak)
        bench_generate(model, args.threads)
        if args.reference_python:
            bench_reference(args.reference_python, args.threads)
    if args.only in (None, "rm-train"):
        bench_reward(tokenizer, tokens, args.threads)
        if args.reference_python:
            bench_reference_reward(args.reference_python, tokenizer, args.threads)
    if args.only in (None, "ppo"):
        bench_ppo(tokenizer, tokens, args.threads)
        if args.reference_python:
            bench_reference_ppo(args.reference_python, args.reference_dir, tokenizer, args.threads)
    if args.only in (None, "dpo"):
        base = bench_dpo(tokenizer, tokens, args.threads, args.reference_python)
        if args.reference_python:
            bench_reference_dpo(args.reference_python, args.reference_dir, base, args.threads)


if __name__ == "__main__":
    main()
