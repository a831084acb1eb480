#!/usr/bin/env python3
"""`make profile`: where the time of a training step goes, one JSON object per line.

  peak       the sitting's f32 matmul peak (examples/matmul_peak.rs), as `make bench` prints it
  bandwidth  the sitting's memory bandwidth (examples/memory_bandwidth.rs: copy and STREAM triad)
  profile    one per workload: the steps after the warm-up sampled with `perf record` (cpu-clock,
             call stacks unwound with DWARF, both threads), each sample put in the category of the
             first frame from the leaf up that names one; the fraction of the sampled time in each,
             milliseconds per step, and the matmuls' GFLOP/s and the optimizer's GB/s against the
             peaks above.

Workloads:
  pretrain bench-tiny   recipes/bench-tiny.toml on the bench tokens (as `make bench`): 3 warm-up
                        steps, 10 sampled. Its step is 58.2 GFLOP of matmuls.
  sft smollm2-135m      (needs REFERENCE_PYTHON, whose transformers writes the shape once with
                        ../shared/bench/shapes.py) the SmolLM2-135M shape, batch 4, max length 512,
                        the Alpaca prompt/completion rows: 2 warm-up steps, 3 sampled.
  rm-train bench-tiny   `make bench`'s rm-train workload (hh-rlhf pairs, batch 8, max length 256, left
                        truncation): 3 warm-up steps, 10 sampled.
  ppo bench-tiny        `make bench`'s ppo workload (batch 8, 64 prompt and 64 new tokens, 4 PPO
                        epochs): the first update is the warm-up, the next three (12 optimizer steps,
                        with the rollouts between them) are sampled.

Worker threads run the closures of lathe's kernels and of candle's element-wise ops under
symbols that do not say which op they belong to (rayon's job frames hide their callers). Those
samples are shared out over the kernel categories in proportion to the samples whose stacks do
name their op ("shared out" in the output says how much that was).

  python3 bench/profile.py [--reference-python PY] [--threads 2] [--only pretrain|rm-train|ppo|sft]
"""
import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train_generate import (BIN, OUT, REFERENCE, REWARD_DATA, ROOT, bench_peak, bench_tiny_init,  # noqa: E402
                                  bench_tiny_step_gflop, emit, example_figure, logged_steps, prepare, shape_model,
                                  timed_steps)

# First match from the leaf up decides. Kernel categories come first: a sample in the kernel
# names the user frame that faulted further up.
CATEGORIES = [
    ("page faults (first touch of fresh memory)", ["clear_page", "handle_mm_fault", "exc_page_fault", "folio_zero"]),
    ("matmul (gemm)", ["gemm_f32::", "gemm_common::", "gemm::gemm"]),
    ("optimizer (AdamW, gradient norm)", ["lathe::train::optim"]),
    ("attention softmax", ["Softmax", "softmax_row"]),
    ("norms", ["RmsNorm", "inverse_rms", "LayerNorm", "layer_norm"]),
    ("rope", ["Rope", "rope_row"]),
    ("activations (gated MLP)", ["Gated", "lathe::model::fused::sigmoid"]),
    ("loss (log-softmax, cross-entropy)", ["CrossEntropy", "log_sum_exp", "cross_entropy"]),
    ("embedding (gather, scatter-add)", ["index_select", "index_add", "IndexSelect", "IndexAdd", "gather", "scatter"]),
    ("copies and re-layouts", ["copy_strided", "copy2d", "__memmove", "__memcpy", "Contiguous", "transpose"]),
    ("element-wise and reductions (candle)", ["binary_map", "unary_map", "affine", "Affine", "reduce", "ReduceIndex",
                                              "where_cond", "WCond", "to_dtype", "cmp_op"]),
    ("allocation and zero-fill", ["mi_", "_mi_", "mimalloc", "__memset", "alloc::raw_vec", "zeros_impl"]),
]
KERNELS = {"optimizer (AdamW, gradient norm)", "attention softmax", "norms", "rope", "activations (gated MLP)",
           "loss (log-softmax, cross-entropy)", "embedding (gather, scatter-add)", "element-wise and reductions (candle)"}
WAITING = ["rayon_core::sleep", "futex", "sched_yield", "finish_task_switch"]
UNNAMED = "unnamed kernel closures (shared out)"


def category(frames):
    """`frames` from the leaf up, each (symbol, in_kernel)."""
    for symbol, _ in frames:
        for name, patterns in CATEGORIES:
            if any(p in symbol for p in patterns):
                return name
    if any(p in symbol for symbol, _ in frames[:16] for p in WAITING):
        return "threads (wake-ups and waits)"
    if frames and frames[0][1]:
        return "kernel (other)"
    if any(p in symbol for symbol, _ in frames[:12] for p in ("call_mut", "rayon::", "fold", "expf", "xflowf", "for_each")):
        return UNNAMED
    return "other"


def samples(data):
    """Stacks of `perf script`: a header line, then one frame a line, then a blank line."""
    out = subprocess.run(["perf", "script", "-i", data, "-F", "tid,ip,sym,dso"], capture_output=True, text=True, check=True)
    frames = []
    for line in out.stdout.splitlines() + [""]:
        if not line.strip():
            if frames:
                yield frames
            frames = []
        elif line.startswith("\t"):
            parts = line.split(None, 1)
            rest = parts[1] if len(parts) > 1 else ""
            dso = rest[rest.rfind("(") + 1:-1] if rest.endswith(")") else ""
            symbol = rest[:rest.rfind("(")].strip() if rest.endswith(")") else rest
            if "+0x" in symbol:
                symbol = symbol[:symbol.rfind("+0x")]
            frames.append((symbol, "kernel" in dso))


def breakdown(data):
    counts = collections.Counter(category(frames) for frames in samples(data))
    total = sum(counts.values())
    unnamed = counts.pop(UNNAMED, 0)
    named_kernels = sum(v for k, v in counts.items() if k in KERNELS)
    shares = {k: float(v) for k, v in counts.items()}
    for k in KERNELS:
        if k in shares and named_kernels:
            shares[k] += unnamed * counts[k] / named_kernels
    if not named_kernels and unnamed:
        shares["other"] = shares.get("other", 0) + unnamed
    fractions = {k: round(v / total, 4) for k, v in sorted(shares.items(), key=lambda kv: -kv[1])}
    return total, fractions, round(unnamed / max(total, 1), 4)


def sampled(command, run_dir, warmup, steps, frequency, scratch):
    """Run `command` (a training run writing `run_dir`) under perf, sampling only the steps
    warmup+1 ..= warmup+steps; returns (perf data path, milliseconds per sampled step)."""
    data = os.path.join(scratch, "perf.data")
    ctl, ack = os.path.join(scratch, "ctl"), os.path.join(scratch, "ack")
    for fifo in (ctl, ack):
        if os.path.exists(fifo):
            os.remove(fifo)
        os.mkfifo(fifo)
    perf = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", str(frequency), "--call-graph", "dwarf,16384",
                             "-D", "-1", "--control", f"fifo:{ctl},{ack}", "-o", data, "--"] + command,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    control, acks = open(ctl, "w"), open(ack, "r")

    def say(word):
        control.write(word + "\n")
        control.flush()
        acks.readline()

    state = "warm-up"
    while perf.poll() is None and state != "done":
        done = len(logged_steps(run_dir))
        if state == "warm-up" and done >= warmup:
            say("enable")
            state = "sampling"
        elif state == "sampling" and done >= warmup + steps:
            say("disable")
            state = "done"
        time.sleep(0.005)
    _, stderr = perf.communicate()
    if perf.returncode != 0 or state != "done":
        sys.exit(f"profile: {' '.join(command)} ended before its sampled steps (perf exit {perf.returncode})\n{stderr.decode()[-2000:]}")
    _, timed, seconds, _ = timed_steps(run_dir, warmup, until=warmup + steps)
    return data, 1000 * seconds / timed


def report(workload, data, ms_per_step, steps, extra):
    total, fractions, unnamed = breakdown(data)
    record = {"bench": "profile", "workload": workload, "sampled_steps": steps, "samples": total,
              "ms_per_step": round(ms_per_step, 1), "shared_out": unnamed, "fractions": fractions}
    record.update(extra(fractions))
    emit(record)
    print(f"\n{workload}: {ms_per_step:.0f} ms a step", file=sys.stderr)
    for name, fraction in fractions.items():
        print(f"  {100 * fraction:5.1f}%  {name}", file=sys.stderr)
    return record


def matmul_and_optimizer(ms_per_step, gflop, parameters, peak, bandwidth):
    """GFLOP/s of the matmul share (when the step's FLOPs are known) and GB/s of the optimizer
    share (in-place AdamW reads and writes 40 bytes a parameter) against the sitting's peaks."""
    def extra(fractions):
        out = {}
        matmul_s = fractions.get("matmul (gemm)", 0) * ms_per_step / 1000
        if gflop and matmul_s:
            out["matmul_gflops"] = round(gflop / matmul_s, 1)
            out["matmul_fraction_of_peak"] = round(gflop / matmul_s / peak, 3)
            out["step_gflops"] = round(gflop / (ms_per_step / 1000), 1)
            out["step_fraction_of_peak"] = round(gflop / (ms_per_step / 1000) / peak, 3)
        optimizer_s = fractions.get("optimizer (AdamW, gradient norm)", 0) * ms_per_step / 1000
        if parameters and optimizer_s:
            out["optimizer_gb_per_s"] = round(40 * parameters / optimizer_s / 1e9, 1)
            out["optimizer_fraction_of_bandwidth"] = round(40 * parameters / optimizer_s / 1e9 / bandwidth, 3)
        return out
    return extra


def parameters_of(run_dir):
    evaluation = json.load(open(os.path.join(run_dir, "eval.json")))
    return evaluation.get("trainable_parameters", evaluation.get("parameters"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-python", help="a python with transformers, to write the SmolLM2-135M shape")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["pretrain", "rm-train", "ppo", "sft"], help="one workload")
    args = parser.parse_args()
    if shutil.which("perf") is None:
        print("profile: `perf` is not installed (Debian: apt-get install linux-perf)", file=sys.stderr)
        sys.exit(2)
    os.makedirs(OUT, exist_ok=True)
    peak = bench_peak(args.threads)
    bandwidth = example_figure("memory_bandwidth", args.threads, "gb_per_s")
    threads = ["--threads", str(args.threads), "-q"]

    tokenizer, tokens = prepare(args.threads)
    wanted = lambda name: args.only in (None, name)  # noqa: E731
    with tempfile.TemporaryDirectory() as scratch:
        if wanted("pretrain"):
            run_dir = os.path.join(OUT, "profile_bench_tiny_run")
            shutil.rmtree(run_dir, ignore_errors=True)
            command = [f"{BIN}/pretrain", tokens, "--tokenizer", tokenizer, "--config", os.path.join(ROOT, "recipes", "bench-tiny.toml"),
                       "-o", run_dir, "--steps", "14"] + threads
            data, ms = sampled(command, run_dir, 3, 10, 499, scratch)
            report("pretrain bench-tiny", data, ms, 10,
                   matmul_and_optimizer(ms, bench_tiny_step_gflop(), parameters_of(run_dir), peak, bandwidth))

        if wanted("rm-train") or wanted("ppo"):
            base = bench_tiny_init(tokenizer, tokens)
        if wanted("rm-train"):
            run_dir = os.path.join(OUT, "profile_reward_run")
            shutil.rmtree(run_dir, ignore_errors=True)
            command = [f"{BIN}/rm-train", REWARD_DATA, "--model", base, "-o", run_dir, "--max-length", "256", "--truncation", "left",
                       "--batch-size", "8", "--steps", "14", "--lr", "3e-4", "--schedule", "constant", "--weight-decay", "0.1",
                       "--grad-clip", "1.0", "--val-fraction", "0.0997", "--eval-every", "0", "--checkpoint-every", "0"] + threads
            data, ms = sampled(command, run_dir, 3, 10, 499, scratch)
            report("rm-train bench-tiny", data, ms, 10, matmul_and_optimizer(ms, None, parameters_of(run_dir), peak, bandwidth))

        if wanted("ppo"):
            reward = os.path.join(OUT, "profile_ppo_reward")
            run_dir = os.path.join(OUT, "profile_ppo_run")
            shutil.rmtree(reward, ignore_errors=True)
            shutil.rmtree(run_dir, ignore_errors=True)
            subprocess.run([f"{BIN}/rm-train", REWARD_DATA, "--model", base, "-o", reward, "--steps", "0", "--max-length", "256", "-q"],
                           check=True, stdout=subprocess.DEVNULL)
            command = [f"{BIN}/ppo", REWARD_DATA, "--policy", base, "--reward-model", reward, "-o", run_dir,
                       "--batch-size", "8", "--max-prompt-length", "64", "--max-new-tokens", "64", "--ignore-eos",
                       "--temperature", "0.7", "--ppo-epochs", "4", "--minibatches", "1", "--kl-coef", "0.05",
                       "--lr", "3e-6", "--updates", "5", "--eval-every", "0", "--checkpoint-every", "0"] + threads
            # 4 optimizer steps an update: the first update is the warm-up, the next three are
            # sampled with the rollouts between them (ms_per_step counts optimizer steps only).
            data, ms = sampled(command, run_dir, 4, 12, 499, scratch)
            report("ppo bench-tiny", data, ms, 12, matmul_and_optimizer(ms, None, None, peak, bandwidth))

        if not wanted("sft"):
            return
        if not args.reference_python and not os.path.exists(os.path.join(OUT, "smollm2-135m", "config.json")):
            print("\nsft smollm2-135m: skipped (set REFERENCE_PYTHON to write the shape)", file=sys.stderr)
            return
        model = shape_model(args.reference_python, REFERENCE, "smollm2-135m", "profile sft")
        data_file = os.path.join(REFERENCE, "..", "data", "sft_alpaca_prompt_completion.parquet")
        run_dir = os.path.join(OUT, "profile_sft_135m_run")
        shutil.rmtree(run_dir, ignore_errors=True)
        command = [f"{BIN}/sft", data_file, "--model", model, "-o", run_dir, "--batch-size", "4", "--max-length", "512",
                   "--steps", "6", "--lr", "2e-5", "--schedule", "constant", "--eval-every", "0", "--checkpoint-every", "0"] + threads
        data, ms = sampled(command, run_dir, 2, 3, 99, scratch)
        report("sft smollm2-135m", data, ms, 3, matmul_and_optimizer(ms, None, parameters_of(run_dir), peak, bandwidth))

if __name__ == "__main__":
    main()
