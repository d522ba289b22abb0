"""A stand-in engine: a small, fast imitation of vLLM's OpenAI server, for unit-level tests and the proxy-cost
benchmark only. The gateway's end-to-end tests run against the real vLLM and tritonserver processes.

It counts whitespace-separated words as tokens, always generates exactly the output length asked for, read
from the fields vLLM reads (``output_tokens``; like vLLM with ignore_eos), streams in vLLM's event format
(continuous usage and the final usage event when asked), records what it received (parsed and as raw
bytes), and counts requests whose client went away before the end. Each generated token is one word:
" tok" by default, or the words of a given text in turn, starting over at its end — a short text makes it
loop like a degenerate model, a long one gives clean prose. Run it alone with
``python -m tests.engines.standin --port 18081 [--loop "I am sorry ."]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

from aiohttp import web

FINGERPRINT = "standin-1"


class StandinEngine:
    def __init__(self, token_delay: float = 0.0, healthy: bool = True, model: str = "tiny",
                 stamp: bool = False, words: Sequence[str] | None = None) -> None:
        self.token_delay = token_delay
        self.words = tuple(words) if words else ("tok",)  # generated tokens, in turn
        self.stamp = stamp  # put the send time (ns) into every streamed chunk, for forwarding-delay benchmarks
        self.healthy = healthy
        self.model = model
        self.received: list[dict[str, Any]] = []
        self.raw: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        self.active = 0
        self.aborted = 0
        self.completed = 0
        self.waiting_metric = 0.0
        self.kv_metric = 0.0
        self.fail_status: int | None = None
        self.break_after: int | None = None  # streams: drop the connection after this many events

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/v1/completions", self.generate)
        app.router.add_post("/v1/chat/completions", self.generate)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        labels = f'{{engine="0",model_name="{self.model}"}}'
        text = (f"# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{labels} {self.waiting_metric}\n"
                f'vllm:num_requests_waiting_by_reason{{reason="capacity"}} 99.0\n'
                f"vllm:kv_cache_usage_perc{labels} {self.kv_metric}\n")
        return web.Response(text=text)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model",
                                                              "max_model_len": 1024}]})

    @staticmethod
    def count(body: dict[str, Any]) -> int:
        if "messages" in body:
            return sum(len(str(m.get("content", "")).split()) + 2 for m in body["messages"]) + 1
        prompt = body.get("prompt", "")
        if isinstance(prompt, list):
            return len(prompt) if prompt and isinstance(prompt[0], int) else sum(len(p.split()) for p in prompt)
        return len(str(prompt).split())

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        count = self.count(body)
        return web.json_response({"count": count, "max_model_len": 1024, "tokens": list(range(count))})

    @staticmethod
    def output_tokens(path: str, body: dict[str, Any]) -> int:
        """How many tokens to generate, read as vLLM reads it: on chat ``max_completion_tokens`` when set, else
        ``max_tokens``; on completions ``max_tokens`` only (vLLM's CompletionRequest has no
        ``max_completion_tokens`` and ignores it); 16 when none is set."""
        keys = ("max_completion_tokens", "max_tokens") if path == "/v1/chat/completions" else ("max_tokens",)
        return next((int(body[key]) for key in keys if body.get(key) is not None), 16)

    def token(self, index: int) -> str:
        return " " + self.words[index % len(self.words)]

    async def generate(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw)
        self.raw.append(raw)
        self.received.append(body)
        self.headers.append(dict(request.headers))
        if self.fail_status is not None:
            return web.json_response({"error": {"message": "engine failure", "code": self.fail_status}},
                                     status=self.fail_status)
        if body.get("model") != self.model:
            return web.json_response({"error": {"message": "no such model", "code": 404}}, status=404)
        self.active += 1
        finished = False
        try:
            if body.get("stream"):
                response = await self._stream(request, body)
            else:
                response = await self._plain(request, body)
            finished = True
            return response
        finally:
            self.active -= 1
            if finished:
                self.completed += 1
            else:
                self.aborted += 1

    def _usage(self, body: dict[str, Any], completion: int) -> dict[str, int]:
        prompt = self.count(body)
        return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion}

    async def _plain(self, request: web.Request, body: dict[str, Any]) -> web.Response:
        n = self.output_tokens(request.path, body)
        if self.token_delay:
            await asyncio.sleep(self.token_delay * n)
        chat = "messages" in body
        text = "".join(self.token(i) for i in range(n))
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return web.json_response({
            "id": f"cmpl-{uuid.uuid4().hex[:16]}", "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": self.model, "choices": [choice],
            "system_fingerprint": FINGERPRINT, "usage": self._usage(body, n)}, dumps=_compact)

    async def _stream(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        n = self.output_tokens(request.path, body)
        options = body.get("stream_options") or {}
        usage, continuous = bool(options.get("include_usage")), bool(options.get("continuous_usage_stats"))
        chat = "messages" in body
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:16]}", "object": "chat.completion.chunk" if chat else
                "text_completion", "created": int(time.time()), "model": self.model}
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        for i in range(1, n + 1):
            if self.token_delay:
                await asyncio.sleep(self.token_delay)
            finish = "length" if i == n else None
            choice: dict[str, Any] = {"index": 0}
            token = self.token(i - 1)
            choice.update({"delta": {"content": token}} if chat else {"text": token})
            choice["finish_reason"] = finish
            chunk: dict[str, Any] = {**head, "choices": [choice]}
            if continuous:
                chunk["usage"] = self._usage(body, i)
            if self.stamp:
                chunk["sent_ns"] = time.time_ns()
            if finish and not usage:
                chunk["system_fingerprint"] = FINGERPRINT
            if self.break_after is not None and i > self.break_after:
                assert request.transport is not None
                request.transport.close()  # a crashed engine: the answer ends mid-stream
                return response
            await response.write(b"data: " + _compact(chunk).encode() + b"\n\n")
        if usage:
            final = {**head, "choices": [], "usage": self._usage(body, n), "system_fingerprint": FINGERPRINT}
            await response.write(b"data: " + _compact(final).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=18081)
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--stamp", action="store_true", help="stamp streamed chunks with their send time")
    parser.add_argument("--loop", help="generate the words of this text over and over (a degenerate loop)")
    parser.add_argument("--text-file", help="generate the words of this file in turn (clean text if it is long)")
    args = parser.parse_args()
    words = args.loop.split() if args.loop else None
    if args.text_file:
        with open(args.text_file, encoding="utf-8") as stream:
            words = stream.read().split()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(StandinEngine(args.token_delay, stamp=args.stamp, words=words).app(), host="127.0.0.1",
                port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
