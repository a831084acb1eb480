#!/usr/bin/env python3
"""A scripted pair of annotators for `make demo`: each asks `annotate`'s JSON API for its next
item and scores it, until it has answered `--items` or nothing is left. Standard library only.

The scores follow a plain rule (an answer that ends its sentence and says more scores higher;
the two annotators weigh length differently), so the demo shows overlap, agreement and the
export without a person at the keyboard. It stands in for people; it is not a judge of quality.

    python3 scripts/annotate_demo.py http://127.0.0.1:8090 KEY_A KEY_B --items 12
"""

import argparse
import json
import sys
import urllib.request


def call(url, key, method="GET", body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Authorization": f"Bearer {key}"})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read().decode()
        return response.status, (json.loads(text) if text else None)


def score(item, weight, low, high):
    text = item["response"].strip()
    points = low + min(len(text.split()) / weight, (high - low) * 0.7)
    if text.endswith((".", "!", "?")):
        points += (high - low) * 0.3
    return max(low, min(high, round(points)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("keys", nargs=2, metavar="KEY")
    parser.add_argument("--items", type=int, default=12, help="answers per annotator at most")
    args = parser.parse_args()
    for who, (key, weight) in enumerate(zip(args.keys, (6.0, 9.0))):
        answered = 0
        while answered < args.items:
            status, body = call(f"{args.url}/api/next", key)
            if status == 204:
                break
            item = body["item"]
            scale = item["scale"]
            value = score(item, weight, scale["low"], scale["high"])
            status, done = call(f"{args.url}/api/items/{item['id']}/answer", key, "POST", {"score": value})
            if status != 200 or not done.get("ok"):
                sys.exit(f"annotator {who}: item {item['id']}: {status} {done}")
            answered += 1
        print(f"   annotator {who + 1}: {answered} answers", flush=True)


if __name__ == "__main__":
    main()
