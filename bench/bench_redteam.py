#!/usr/bin/env python3
"""Benchmark `redteam`: the default suite (recipes/redteam/default.toml, 465 attempts) against
the demo's instruction-tuned model (demo-out/sft, from `make demo`), greedy, 64 new tokens,
batch 16; once with the model-free detectors only, once with the demo guard and reward model
judging too. Prints one JSON object per line: attempts/s over the whole run (generation and
judging), and the peak RSS of the command.

  python3 bench/bench_redteam.py [--demo demo-out] [--threads N]
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
OUT = os.path.join(ROOT, "bench-out", "redteam")
sys.path.insert(0, os.path.join(ROOT, "bench"))
from bench_tokenize import timed  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default=os.path.join(ROOT, "demo-out"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    model = os.path.join(args.demo, "sft")
    if not os.path.exists(os.path.join(model, "config.json")):
        print(f"bench_redteam: {model} is missing; run `make demo` first", file=sys.stderr)
        return
    os.makedirs(OUT, exist_ok=True)
    judges = {"model-free": []}
    guard, reward = os.path.join(args.demo, "guard"), os.path.join(args.demo, "rm")
    if os.path.exists(guard) and os.path.exists(reward):
        judges["guard+reward"] = ["--guard", guard, "--reward-model", reward]
    for name, extra in judges.items():
        findings = os.path.join(OUT, f"{name}.parquet")
        cmd = [f"{BIN}/redteam", "--model", model, "--suite", os.path.join(ROOT, "recipes/redteam/default.toml"),
               "-o", findings, "--restart", "-q", "--threads", str(args.threads), *extra]
        seconds, rss, _ = timed(cmd)
        summary = json.load(open(os.path.join(OUT, f"{name}.summary.json")))
        print(json.dumps({
            "bench": "redteam", "suite": "default", "detectors": name, "attempts": summary["attempts"],
            "attempts_per_s": round(summary["attempts"] / seconds, 2), "seconds": round(seconds, 2),
            "peak_rss_mb": round(rss, 1), "threads": args.threads,
        }), flush=True)


if __name__ == "__main__":
    main()
