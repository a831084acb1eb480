#!/usr/bin/env python3
"""Benchmark `tokenize train` and `tokenize encode`; one JSON object per line on stdout.

Workloads mirror ../shared/bench/tokenize_ref.py so the figures compare with the Hugging Face
`tokenizers` reference run in the same sitting:
  shakespeare  testdata/pretrain_tinyshakespeare.parquet, one paragraph per row
  synthetic    ~10 MB of pydoc text of the Python stdlib (the reference's generator), one document
               per non-empty line
Each figure is the whole command, reading and writing files included; peak RSS is the child's.

  python3 bench/bench_tokenize.py                        # lathe only
  python3 bench/bench_tokenize.py --large-mb 1000        # also encode a ~1 GB text (memory stays bounded)
  python3 bench/bench_tokenize.py --reference-python PY  # also run ../shared/bench/tokenize_ref.py with PY
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench-out")
BIN = os.path.join(ROOT, "target", "release", "tokenize")
SHAKESPEARE = os.path.join(ROOT, "testdata", "pretrain_tinyshakespeare.parquet")
REFERENCE = os.path.join(ROOT, "..", "shared", "bench", "tokenize_ref.py")


def make_synthetic(path, mb):
    """The reference's corpus: pydoc of the stdlib modules, repeated to `mb` megabytes."""
    import pydoc
    import warnings

    warnings.filterwarnings("ignore")
    skip = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "__hello__", "__phello__"}
    docs = []
    for name in sorted(sys.stdlib_module_names):
        if name in skip or name.startswith("_"):
            continue
        try:
            docs.append(pydoc.render_doc(__import__(name), renderer=pydoc.plaintext))
        except BaseException:  # noqa: BLE001 - some modules refuse import on this platform
            continue
    base = "\n\n".join(docs)
    target = int(mb * 1e6)
    out, n = [], 0
    while n < target:
        out.append(base)
        n += len(base.encode("utf-8"))
    text = "\n\n".join(out).encode("utf-8")[:target].decode("utf-8", "ignore")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def repeat_to(source, path, mb):
    chunk = open(source, "rb").read()
    written = 0
    with open(path, "wb") as f:
        while written < mb * 1e6:
            f.write(chunk)
            f.write(b"\n")
            written += len(chunk) + 1


def timed(args):
    """Run a command; return (seconds, peak RSS of that child in MB, its stderr)."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    stderr = proc.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(args)}\n{stderr}")
    return seconds, usage.ru_maxrss / 1024.0, stderr


def text_bytes(corpus):
    """UTF-8 bytes of the documents the encoder sees (the reference's units: rows or non-empty lines)."""
    if corpus.endswith(".parquet"):
        out = subprocess.run([BIN, "inspect", corpus, "--json"], capture_output=True, check=True)
        return json.loads(out.stdout)["text"]["bytes"]
    text = open(corpus, encoding="utf-8").read()
    units = text.split("\n\n") if corpus.endswith("_paragraphs.txt") else text.split("\n")
    return sum(len(u.encode("utf-8")) for u in units if u.strip())


def shakespeare_as_text(python, path):
    """The Parquet's rows joined by blank lines (the reference trains on text files only)."""
    code = ("import sys, pyarrow.parquet as pq; t = pq.read_table(sys.argv[1], columns=['text']);"
            "open(sys.argv[2], 'w', encoding='utf-8').write('\\n\\n'.join(t.column('text').to_pylist()))")
    subprocess.run([python, "-c", code, SHAKESPEARE, path], check=True)


def emit(record):
    print(json.dumps(record), flush=True)


def bench_corpus(name, corpus, vocab, threads, repeats):
    paragraphs = ["--paragraphs"] if corpus.endswith("_paragraphs.txt") else []
    tokenizer = os.path.join(OUT, f"tok_{name}_{vocab}.json")
    tokens = os.path.join(OUT, f"tokens_{name}.parquet")
    common = ["--threads", str(threads), "-q"]
    seconds, rss, _ = timed([BIN, "train", corpus, "--vocab-size", str(vocab), "-o", tokenizer] + paragraphs + common)
    emit({"bench": "tokenize_train", "corpus": name, "vocab": vocab, "threads": threads,
          "seconds": round(seconds, 3), "peak_rss_mb": round(rss, 1)})
    # Without -q the stage reports its own MB/s, timed after loading (as the reference times
    # encode_batch in memory); the whole command adds process start and the tokenizer load.
    runs = [timed([BIN, "encode", corpus, "--tokenizer", tokenizer, "--no-eos", "-o", tokens, "--threads", str(threads)] + paragraphs)
            for _ in range(repeats)]
    seconds = sorted(r[0] for r in runs)[len(runs) // 2]
    rss = max(r[1] for r in runs)
    in_stage = sorted(float(re.search(r"MB/s ([0-9.]+)", r[2]).group(1)) for r in runs)[len(runs) // 2]
    size = text_bytes(corpus)
    summary = json.loads(subprocess.run([BIN, "inspect", tokens, "--json"], capture_output=True, check=True).stdout)
    n_tokens = summary["tokens"]["total"]
    emit({"bench": "tokenize_encode", "corpus": name, "vocab": vocab, "threads": threads,
          "text_mb": round(size / 1e6, 3), "seconds": round(seconds, 3),
          "mb_per_s": round(size / 1e6 / seconds, 2), "mb_per_s_in_stage": in_stage, "tokens_per_s": round(n_tokens / seconds),
          "tokens": n_tokens, "peak_rss_mb": round(rss, 1)})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--synthetic-mb", type=float, default=10.0)
    ap.add_argument("--large-mb", type=float, default=0.0, help="also encode a text of this size")
    ap.add_argument("--reference-python", default=None, help="python with `tokenizers` to run the reference")
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)

    synthetic = os.path.join(OUT, f"synthetic_pydoc_{int(args.synthetic_mb)}MB.txt")
    if not os.path.exists(synthetic):
        make_synthetic(synthetic, args.synthetic_mb)
    shakespeare = SHAKESPEARE
    if args.reference_python:
        shakespeare = os.path.join(OUT, "shakespeare_paragraphs.txt")
        shakespeare_as_text(args.reference_python, shakespeare)
    bench_corpus("shakespeare", shakespeare, args.vocab, args.threads, args.repeats)
    bench_corpus("synthetic10MB_lines", synthetic, args.vocab, args.threads, args.repeats)

    if args.large_mb > 0:
        large = os.path.join(OUT, f"large_{int(args.large_mb)}MB.txt")
        if not os.path.exists(large):
            repeat_to(synthetic, large, args.large_mb)
        tokenizer = os.path.join(OUT, f"tok_synthetic10MB_lines_{args.vocab}.json")
        tokens = os.path.join(OUT, "tokens_large.parquet")
        seconds, rss, _ = timed([BIN, "encode", large, "--tokenizer", tokenizer, "--no-eos", "-o", tokens,
                              "--threads", str(args.threads), "-q"])
        size = os.path.getsize(large)
        emit({"bench": "tokenize_encode", "corpus": f"large{int(args.large_mb)}MB_lines", "threads": args.threads,
              "input_mb": round(size / 1e6, 1), "seconds": round(seconds, 2), "mb_per_s": round(size / 1e6 / seconds, 2),
              "peak_rss_mb": round(rss, 1)})
        os.remove(tokens)

    if args.reference_python:
        for name, corpus, extra in [("shakespeare", shakespeare, []),
                                    ("synthetic10MB_lines", synthetic, ["--units", "lines", "--encode-repeats", "3"])]:
            result = os.path.join(OUT, f"reference_{name}.json")
            subprocess.run([args.reference_python, REFERENCE, "--input", corpus, "--vocab", str(args.vocab),
                            "--threads", str(args.threads), "--out-dir", os.path.join(OUT, "reference"),
                            "--json", result] + extra, check=True, stdout=subprocess.DEVNULL)
            ref = json.load(open(result))["results"][0]
            emit({"bench": "reference_tokenizers", "corpus": name, "vocab": args.vocab, "threads": args.threads,
                  "train_seconds": round(ref["train_s"], 3), "encode_mb_per_s": round(ref["encode_MB_per_s"], 2),
                  "encode_tokens_per_s": round(ref["encode_tokens_per_s"])})


if __name__ == "__main__":
    main()
