#!/usr/bin/env python3
"""A small chat server that limits the way other servers do, written apart from the project.

It shares no code with together-tower or its simulator: the benches that use it measure the
stack against rules it was not tuned to. Standard library only.

  peer-server.py --port P --limit 100 [--status 429|503] [--retry-after 1]
                 [--random-503 0.1] [--seed 7] [--earned BASE CAP]

--limit N      at most N requests served in any second ending now (a sliding log), per key
--fixed        count the limit in whole seconds of the clock instead (fixed windows)
--status S     the answer over the limit (default 429)
--retry-after  a whole-second Retry-After on refusals, and nothing more precise
--random-503 P answer 503 to a share P of requests at random, whatever the rate
--seed N       the seed of those random answers (default 7)
--earned B C   Together's earned rate: a key may be served twice its successes of the last
               ten seconds a second, between B and C; over it, a 429 whose body says
               dynamic_request_limited, and no rate-limit headers on any answer
"""

import argparse
import asyncio
import collections
import json
import random
import time

OK = json.dumps({
    "id": "peer", "object": "chat.completion", "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}).encode()


def error(kind, message):
    return json.dumps({"error": {"message": message, "type": kind, "param": None,
                                 "code": None}}).encode()


class Key:
    """What the server remembers of one key."""

    def __init__(self):
        self.last_second = collections.deque()
        self.successes = collections.deque()


class Rules:
    def __init__(self, args):
        self.args = args
        self.keys = collections.defaultdict(Key)
        self.random = random.Random(args.seed)

    def answer(self, key_name):
        """The status, extra headers and body for one request now."""
        args, now = self.args, time.monotonic()
        key = self.keys[key_name]
        while key.last_second and now - key.last_second[0] >= 1.0:
            key.last_second.popleft()
        while key.successes and now - key.successes[0] >= 10.0:
            key.successes.popleft()
        if args.earned:
            base, cap = args.earned
            earned = min(max(2.0 * len(key.successes) / 10.0, base), cap)
            if len(key.last_second) >= max(int(earned), 1):
                return 429, [], error("dynamic_request_limited",
                                      "You have exceeded your dynamic request rate limit.")
        if args.fixed:
            second = int(now)
            used = sum(1 for at in key.last_second if int(at) == second)
        else:
            used = len(key.last_second)
        if args.limit and used >= args.limit:
            headers = [("Retry-After", str(args.retry_after))] if args.retry_after else []
            if args.status == 503:
                return 503, headers, error("server_error", "The server is overloaded.")
            return 429, headers, error("rate_limit_exceeded", "Too many requests.")
        if args.random_503 and self.random.random() < args.random_503:
            return 503, [], error("server_error", "The server is overloaded.")
        key.last_second.append(now)
        key.successes.append(now)
        return 200, [], OK


REASONS = {200: "OK", 404: "Not Found", 429: "Too Many Requests", 503: "Service Unavailable"}


async def serve(reader, writer, rules):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1] if len(lines[0].split(" ")) > 1 else "/"
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0") or 0)
            if length:
                await reader.readexactly(length)
            if path.startswith("/v1/chat/completions"):
                status, extra, body = rules.answer(headers.get("authorization", ""))
            else:
                status, extra, body = 404, [], error("not_found", "unknown path")
            out = [f"HTTP/1.1 {status} {REASONS[status]}",
                   "Content-Type: application/json",
                   f"Content-Length: {len(body)}"]
            out += [f"{name}: {value}" for name, value in extra]
            writer.write(("\r\n".join(out) + "\r\n\r\n").encode() + body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionResetError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--fixed", action="store_true")
    parser.add_argument("--status", type=int, default=429, choices=[429, 503])
    parser.add_argument("--retry-after", type=int, default=0)
    parser.add_argument("--random-503", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--earned", type=float, nargs=2, metavar=("BASE", "CAP"))
    args = parser.parse_args()
    rules = Rules(args)
    server = await asyncio.start_server(lambda r, w: serve(r, w, rules), "127.0.0.1",
                                        args.port, backlog=512)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
