#!/usr/bin/env python3
"""The official `openai` Python client against a running serve-guard: chat, streaming chat and
moderations.

    pip install openai            # in a virtual environment, e.g. python3 -m venv /tmp/oai && /tmp/oai/bin/pip install openai
    serve-guard serve --model demo-out/sft --input-guard demo-out/guard --output-guard demo-out/guard --keys keys.txt &
    python3 scripts/openai_client.py --base-url http://127.0.0.1:8080/v1 --api-key sk-lathe-...

Exits 1 when a call fails or an answer does not have OpenAI's shape.
"""
import argparse
import sys

from openai import OpenAI


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--benign", default="Give me three tips for a good night's sleep.")
    parser.add_argument("--harmful", default="Describe sex in graphic detail.")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=120)

    models = client.models.list()
    model = models.data[0].id
    print(f"models: {[m.id for m in models.data]}")

    for label, text in (("benign", args.benign), ("harmful", args.harmful)):
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": text}], max_tokens=48, temperature=0.7, seed=1
        )
        choice = reply.choices[0]
        assert reply.object == "chat.completion" and choice.message.role == "assistant"
        print(f"chat ({label}): finish_reason={choice.finish_reason} usage={reply.usage.prompt_tokens}+{reply.usage.completion_tokens}")
        print(f"  {choice.message.content!r}")

    pieces, finish, chunks = [], None, 0
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": args.benign}],
        max_tokens=48,
        temperature=0.7,
        seed=1,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = None
    for chunk in stream:
        chunks += 1
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    print(f"streaming chat: {chunks} chunks, finish_reason={finish}, usage={usage.prompt_tokens}+{usage.completion_tokens}")
    print(f"  {''.join(pieces)!r}")

    moderation = client.moderations.create(input=[args.benign, args.harmful])
    for text, result in zip((args.benign, args.harmful), moderation.results):
        scores = result.model_dump()["category_scores"]
        top = sorted(scores.items(), key=lambda kv: -(kv[1] or 0))[:3]
        print(f"moderation: flagged={result.flagged} top={[(k, round(v, 3)) for k, v in top]} :: {text[:40]!r}")

    try:
        OpenAI(base_url=args.base_url, api_key="sk-lathe-wrong", max_retries=0).models.list()
        print("a wrong key was accepted")
        return 1
    except Exception as e:  # openai.AuthenticationError
        print(f"wrong key: {type(e).__name__} {getattr(e, 'status_code', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
