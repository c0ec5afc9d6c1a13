#!/usr/bin/env python3
"""Real clients against `together-tower proxy`: `curl`, and the official `openai` package.

  proxy_clients.py TOGETHER_TOWER_BINARY TOGETHER_SIM_BINARY

Starts the simulator and three proxies in front of it (pass-through keys; a tight quota that
refuses at once; managed keys with tenants), runs each check, and stops them all with SIGTERM.
Exits non-zero if a check fails, a process does not stop cleanly, or the proxy's own key
appears in anything a process printed. `scripts/proxy-clients` installs the package and runs
this.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time

import openai

from proxy_load import Retries

CHAT_MODEL = "meta-llama/Llama-3.3-70B-Instruct-Turbo"
EMBEDDING_MODEL = "BAAI/bge-large-en-v1.5"
UPSTREAM_KEY = "proxy-own-key-0b7c19e4"
TENANT_KEY = "tenant-key-search-4411"
MAX_BODY = 20_000


class Process:
    """A child process whose first stdout line names its URL."""

    def __init__(self, args, marker):
        self.output = tempfile.TemporaryFile(mode="w+")
        self.child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.output, text=True)
        line = self.child.stdout.readline()
        if marker not in line:
            self.output.seek(0)
            raise SystemExit(f"{args[0]} did not start: {line}{self.output.read()}")
        self.url = line.split(marker, 1)[1].split()[0]

    def stop(self):
        """SIGTERM, then everything it printed; fails if it did not exit cleanly."""
        self.child.send_signal(signal.SIGTERM)
        rest, _ = self.child.communicate(timeout=60)
        self.output.seek(0)
        printed = rest + self.output.read()
        if self.child.returncode not in (0, -signal.SIGTERM):
            raise SystemExit(f"exit {self.child.returncode}:\n{printed}")
        return printed


def proxy(binary, *flags):
    return Process([binary, "proxy", "--listen", "127.0.0.1:0", "--log", "debug", *flags],
                   "listening on ")


def curl(*args):
    """Runs curl; its body and its status."""
    done = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", *args],
                          capture_output=True, text=True, timeout=60, check=True)
    body, _, status = done.stdout.rpartition("\n")
    return body, int(status)


def chat_body(stream=False, text="Say hello."):
    return json.dumps({"model": CHAT_MODEL, "messages": [{"role": "user", "content": text}],
                       "max_tokens": 8, "stream": stream})


def client(url, key="client-key", retries=0):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=retries, timeout=60)


def expect(condition, what):
    if not condition:
        raise AssertionError(what)


def checks(open_url, tight_url, managed_url):
    auth = ["-H", "authorization: Bearer client-key", "-H", "content-type: application/json"]

    def curl_chat():
        body, status = curl(*auth, "-d", chat_body(), f"{open_url}/v1/chat/completions")
        expect(status == 200, f"{status} {body}")
        expect(json.loads(body)["choices"][0]["message"]["content"], body)

    def curl_stream():
        body, status = curl("-N", *auth, "-d", chat_body(stream=True),
                            f"{open_url}/v1/chat/completions")
        events = [line for line in body.splitlines() if line.startswith("data: ")]
        expect(status == 200 and len(events) > 2, f"{status} {body}")
        expect(events[-1] == "data: [DONE]", body)

    def curl_too_large():
        body, status = curl(*auth, "-d", chat_body(text="x" * MAX_BODY),
                            f"{open_url}/v1/chat/completions")
        expect(status == 413, f"{status} {body}")
        expect(json.loads(body)["error"]["code"] == "request_too_large", body)

    def curl_not_forwarded():
        body, status = curl(f"{open_url}/admin")
        expect(status == 404, f"{status} {body}")

    def openai_chat():
        answer = client(open_url).chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8)
        expect(answer.choices[0].message.content, answer)
        expect(answer.usage.total_tokens > 0, answer)

    def openai_stream():
        stream = client(open_url).chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=8, stream=True)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        expect(text, "an empty stream")

    def openai_embeddings():
        answer = client(open_url).embeddings.create(model=EMBEDDING_MODEL, input=["one", "two"])
        expect([item.index for item in answer.data] == [0, 1], answer)
        expect(len(answer.data[0].embedding) > 0, answer)

    def openai_retries_a_refusal():
        # One request a second, refused at once rather than waiting: the second request of a
        # pair meets a 429 and the package retries it after the proxy's `retry-after-ms`.
        retries = Retries()
        logging.getLogger("openai").addHandler(retries)
        logging.getLogger("openai").setLevel(logging.INFO)
        together = client(tight_url, retries=2)
        started = time.monotonic()
        for _ in range(2):
            together.chat.completions.create(
                model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8)
        expect(retries.count >= 1, "the package did not retry")
        expect(time.monotonic() - started < 10, "it waited far longer than the hint")
        try:
            client(tight_url, retries=0).chat.completions.create(
                model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8)
            raise AssertionError("no 429 without retries")
        except openai.RateLimitError as error:
            hint = int(error.response.headers["retry-after-ms"])
            expect(0 < hint <= 1000, hint)
            expect(error.response.headers["retry-after"] == "1", error.response.headers)

    def openai_unknown_model():
        try:
            client(open_url).chat.completions.create(
                model="meta-llama/Llama-3.3-70B-Instruct-Turb",
                messages=[{"role": "user", "content": "hi"}])
            raise AssertionError("an unknown model answered")
        except openai.NotFoundError as error:
            expect(CHAT_MODEL in str(error), str(error))

    def openai_too_large():
        try:
            client(open_url).chat.completions.create(
                model=CHAT_MODEL, messages=[{"role": "user", "content": "x" * MAX_BODY}])
            raise AssertionError("a body over the limit answered")
        except openai.APIStatusError as error:
            expect(error.status_code == 413, error)

    def openai_managed_keys():
        answer = client(managed_url, key=TENANT_KEY).chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8)
        expect(answer.choices, answer)
        for key in ["tenant-key-unknown", UPSTREAM_KEY]:
            try:
                client(managed_url, key=key).chat.completions.create(
                    model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}])
                raise AssertionError("an unknown tenant key answered")
            except openai.AuthenticationError as error:
                expect(UPSTREAM_KEY not in str(error), "the proxy's key in an answer")

    return [curl_chat, curl_stream, curl_too_large, curl_not_forwarded, openai_chat,
            openai_stream, openai_embeddings, openai_retries_a_refusal, openai_unknown_model,
            openai_too_large, openai_managed_keys]


def main():
    binary, sim_binary = sys.argv[1], sys.argv[2]
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as config:
        config.write(f'[tenants.search]\nkeys = ["{TENANT_KEY}"]\npriority = "interactive"\n')
    sim = Process([sim_binary, "--listen", "127.0.0.1:0"], "listening on ")
    processes = [sim]
    failed = []
    try:
        open_proxy = proxy(binary, "--base-url", sim.url, "--max-body", str(MAX_BODY))
        tight = proxy(binary, "--base-url", sim.url, "--rpm", "60", "--max-wait", "0s")
        managed = proxy(binary, "--base-url", sim.url, "--api-key", UPSTREAM_KEY,
                        "--config", config.name)
        processes += [open_proxy, tight, managed]
        for check in checks(open_proxy.url, tight.url, managed.url):
            try:
                check()
                print(f"ok   {check.__name__}")
            except Exception as error:  # noqa: BLE001 - every failure is reported, then all fail
                print(f"FAIL {check.__name__}: {type(error).__name__}: {error}")
                failed.append(check.__name__)
    finally:
        printed = "".join(process.stop() for process in reversed(processes))
        os.unlink(config.name)
    if UPSTREAM_KEY in printed or TENANT_KEY in printed:
        failed.append("a key appeared in a process's output")
    if failed:
        raise SystemExit(f"proxy clients: {len(failed)} failed: {', '.join(failed)}")
    print(f"proxy clients: all passed (openai {openai.__version__})")


if __name__ == "__main__":
    main()
