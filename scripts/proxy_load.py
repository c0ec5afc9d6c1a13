#!/usr/bin/env python3
"""Chat requests from threads of the official `openai` package, as a Python program sends them.

  proxy_load.py BASE_URL --key KEY --requests 2000 --threads 16 --retries 0

Prints one JSON line: requests answered, failed (by the package's exception name), the
package's own retries, and the seconds the run took.
"""

import argparse
import collections
import concurrent.futures
import json
import logging
import time

import openai

CHAT_MODEL = "meta-llama/Llama-3.3-70B-Instruct-Turbo"


class Retries(logging.Handler):
    """Counts the package's retries, from its log. `Handler.handle` holds the handler's own
    lock around `emit`, so threads count one at a time."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record):
        if record.getMessage().startswith("Retrying request"):
            self.count += 1


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("base_url")
    parser.add_argument("--key", required=True)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--retries", type=int, default=0)
    args = parser.parse_args()
    retries = Retries()
    logging.getLogger("openai").addHandler(retries)
    logging.getLogger("openai").setLevel(logging.INFO)
    client = openai.OpenAI(base_url=f"{args.base_url}/v1", api_key=args.key,
                           max_retries=args.retries, timeout=600)

    def one(index):
        try:
            client.chat.completions.create(
                model=CHAT_MODEL, max_tokens=8,
                messages=[{"role": "user", "content": f"Request {index}: say hello."}])
            return "answered"
        except openai.OpenAIError as error:
            return type(error).__name__

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(args.threads) as pool:
        outcomes = collections.Counter(pool.map(one, range(args.requests)))
    seconds = time.monotonic() - started
    answered = outcomes.pop("answered", 0)
    print(json.dumps({"requests": args.requests, "answered": answered, "failed": dict(outcomes),
                      "retries": retries.count, "seconds": round(seconds, 2)}))


if __name__ == "__main__":
    main()
