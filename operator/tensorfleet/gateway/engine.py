"""What differs between engines: routes, request validation, the tokenizer, usage and streams.

``VLLMEngine`` speaks the OpenAI-compatible API and counts tokens with vLLM's ``/tokenize``;
``TritonEngine`` serves Triton's generate extension and counts with TensorRT-LLM's preprocessing model.
Both only describe and transform requests; the proxy does the I/O through ``EngineClient``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import aiohttp

from tensorfleet.gateway.errors import GatewayError, bad_request, engine_unavailable
from tensorfleet.gateway.hooks import ProxyRequest
from tensorfleet.gateway.settings import DEFAULT_MAX_BATCH_PROMPTS
from tensorfleet.gateway.streams import TritonStream, Usage, VLLMStream
from tensorfleet.gateway.upstream import EngineConnections

log = logging.getLogger(__name__)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
TRITON_GENERATE = "/v2/models/{model}/generate"
TRITON_STREAM = "/v2/models/{model}/generate_stream"
TOKENIZE_CONCURRENCY = 8  # /tokenize calls at once for the prompts of one batch request
MAX_REMEMBERED_MODELS = 1024  # Triton models known ready (the repository index, then each one confirmed)
_TOKENIZE_CHAT_KEYS = ("add_generation_prompt", "continue_final_message", "chat_template", "chat_template_kwargs",
                       "tools", "add_special_tokens", "mm_processor_kwargs", "media_io_kwargs")
# Chat request fields vLLM hands to the chat template beside chat_template_kwargs (ChatCompletionRequest.
# build_chat_params); its /tokenize takes none of them, so they are counted inside chat_template_kwargs.
_TEMPLATE_ARGUMENTS = ("documents", "reasoning_effort")
# Plain-request fields vLLM refuses on a stream, or whose plain answer carries what a folded stream cannot give
# back (token ids, the prompt's text, kv-transfer parameters): such requests are not streamed instead.
_NOT_STREAMED_INSTEAD = ("prompt_logprobs", "return_token_ids", "return_prompt_text", "kv_transfer_params")
# The output-length fields vLLM honours per endpoint, the one it uses first when both are set: its chat endpoint
# takes max_completion_tokens over max_tokens (ChatCompletionRequest.build_tok_params, OpenAIServingChat); its
# CompletionRequest has no max_completion_tokens (an extra field, ignored) and reads max_tokens only.
_OUTPUT_BOUNDS = {CHAT: ("max_completion_tokens", "max_tokens"), COMPLETIONS: ("max_tokens",)}
# What vLLM generates at most when the client sets no bound: 16 on completions (CompletionRequest.max_tokens, as
# OpenAI's API); the rest of the context window on chat (no default here: the ceiling applies).
_DEFAULT_OUTPUT = {COMPLETIONS: 16}
# The Triton model inputs the gateway reads: the prompt it counts and the output bound it clamps.
_COUNTED_INPUTS = ("text_input", "max_tokens")


@dataclasses.dataclass(frozen=True)
class Route:
    method: str
    path: str
    generates: bool  # runs the token policy and metering; otherwise a plain pass-through


def _int_or_none(body: Mapping[str, Any], key: str, minimum: int = 1, maximum: int | None = None,
                 field: str | None = None) -> int | None:
    """``body[key]`` checked to be an integer in range, or None when unset; errors name ``field`` (default ``key``)."""
    value = body.get(key)
    if value is None:
        return None
    field = field or key
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{field}' must be an integer, got {json.dumps(value)[:40]}", field, "invalid_type")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise bad_request(f"'{field}' must be {bound}, got {value}", field, "invalid_value")
    return value


def triton_input(body: Mapping[str, Any], key: str) -> tuple[str, Mapping[str, Any]]:
    """Where a Triton generate request sets the model input ``key``: its field path and the object holding it.

    Triton's generate extension makes each key of the request's ``parameters`` object a model input, as it does a
    top-level key (and answers 400 when both set one): ``parameters.KEY`` when the client put it there, else the
    top level, where it is also set when absent."""
    parameters = body.get("parameters")
    if isinstance(parameters, dict) and key in parameters:
        return f"parameters.{key}", parameters
    return key, body


def rendered_template_kwargs(body: Mapping[str, Any]) -> Any:
    """The chat_template_kwargs vLLM's template gets for a chat request (``ChatCompletionRequest.
    build_chat_params``): the client's own, overridden by ``documents`` and ``reasoning_effort`` where set (not
    None or "auto"), and ``enable_thinking`` from ``reasoning_effort`` unless the client set it."""
    own = body.get("chat_template_kwargs") or {}
    if not isinstance(own, dict):
        return own  # the engine's tokenizer rejects it, as the engine would the request
    extra = {k: body[k] for k in _TEMPLATE_ARGUMENTS if body.get(k) not in (None, "auto")}
    if body.get("reasoning_effort") is not None and "enable_thinking" not in own:
        extra["enable_thinking"] = body["reasoning_effort"] != "none"
    return {**own, **extra}


class EngineClient:
    """The gateway's ways to the engine: ``connections`` for the requests it proxies, ``session`` for the rest."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, connections: EngineConnections) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.connections = connections

    async def post_json(self, path: str, body: Mapping[str, Any], seconds: float = 30.0) -> tuple[int, Any]:
        try:
            async with self.session.post(self.base_url + path, json=body,
                                         timeout=aiohttp.ClientTimeout(total=seconds)) as response:
                data = await response.read()
        except (aiohttp.ClientError, OSError) as exc:
            raise engine_unavailable(str(exc) or type(exc).__name__) from None
        except TimeoutError:
            raise GatewayError(504, f"the engine did not answer {path} within {seconds:g} s",
                               "engine_timeout") from None
        try:
            return response.status, json.loads(data) if data else None
        except ValueError:
            return response.status, None


class VLLMEngine:
    runtime = "vllm"
    health_path = "/health"
    routes = (Route("POST", CHAT, True), Route("POST", COMPLETIONS, True), Route("GET", "/v1/models", False))

    def __init__(self, served_model: str, max_batch_prompts: int = DEFAULT_MAX_BATCH_PROMPTS) -> None:
        self.served_model = served_model
        self.max_batch_prompts = max_batch_prompts

    def upstream_path(self, request: ProxyRequest) -> str:
        return request.endpoint

    async def ensure_model(self, client: EngineClient, path_model: str | None) -> None:
        return None  # the served name was checked against the body in validate

    def validate(self, request: ProxyRequest, path_model: str | None) -> None:
        body = request.body
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise bad_request("'model' is required and must be a string", "model", "missing_model")
        if model != self.served_model:
            raise GatewayError(404, f"The model `{model[:200]}` does not exist; this service serves "
                                    f"`{self.served_model}`.", "model_not_found", "model")
        stream = body.get("stream", False)
        if stream is not None and not isinstance(stream, bool):
            raise bad_request("'stream' must be a boolean", "stream", "invalid_type")
        for key in ("max_tokens", "max_completion_tokens"):
            _int_or_none(body, key)
        _int_or_none(body, "n", 1, 128)
        temperature = body.get("temperature")
        if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, int | float)):
            raise bad_request("'temperature' must be a number", "temperature", "invalid_type")
        if request.endpoint == CHAT:
            self._validate_messages(body.get("messages"))
        else:
            self._validate_prompt(body.get("prompt"), self.max_batch_prompts)
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise bad_request("'stream_options' must be an object", "stream_options", "invalid_type")
        request.streaming = bool(stream)
        request.client_wants_usage = bool(options and options.get("include_usage"))

    @staticmethod
    def _validate_messages(messages: Any) -> None:
        if not isinstance(messages, list) or not messages:
            raise bad_request("'messages' must be a non-empty array", "messages", "invalid_type")
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise bad_request(f"'messages[{index}]' must be an object with a string 'role'",
                                  f"messages[{index}]", "invalid_type")

    @staticmethod
    def _validate_prompt(prompt: Any, max_batch: int) -> None:
        if isinstance(prompt, list) and len(prompt) > max_batch and not isinstance(prompt[0], int):
            raise bad_request(f"'prompt' has {len(prompt)} prompts, over the limit of {max_batch} prompts in one "
                              "request (TENSORFLEET_GATEWAY_MAX_BATCH_PROMPTS)", "prompt", "invalid_value")
        ok = isinstance(prompt, str) or (
            isinstance(prompt, list) and prompt and (
                all(isinstance(p, str) for p in prompt)
                or all(isinstance(p, int) and not isinstance(p, bool) for p in prompt)
                or all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt)))
        if not ok:
            raise bad_request("'prompt' must be a string, an array of strings, an array of token ids or an "
                              "array of arrays of token ids", "prompt", "invalid_type")

    def clamp_output(self, request: ProxyRequest, limit: int) -> int:
        """Clamp the output bounds vLLM honours on this endpoint to ``limit``; when the client set none, set
        max_tokens to what vLLM would generate at most, within ``limit`` (so the budget reserves what can run).
        The effective value: the first of ``_OUTPUT_BOUNDS`` the client set, as vLLM reads them."""
        body = request.body
        keys = [k for k in _OUTPUT_BOUNDS[request.endpoint] if body.get(k) is not None]
        if not keys:
            effective = min(_DEFAULT_OUTPUT.get(request.endpoint, limit), limit)
            request.set_fields({"max_tokens": effective})
            return effective
        clamped = {k: min(int(body[k]), limit) for k in keys}
        if any(clamped[k] != body[k] for k in keys):
            request.set_fields(clamped)
        request.client_max_tokens = clamped[keys[0]]
        request.output_bound = keys[0]
        return request.client_max_tokens

    @staticmethod
    def prompt_field(request: ProxyRequest) -> str:
        return "messages" if request.endpoint == CHAT else "prompt"

    def choices(self, request: ProxyRequest) -> int:
        prompts = request.body.get("prompt")
        batch = len(prompts) if isinstance(prompts, list) and prompts and not isinstance(prompts[0], int) else 1
        return int(request.body.get("n") or 1) * batch

    @staticmethod
    def can_stream_instead(request: ProxyRequest) -> bool:
        """Whether a plain request may be sent upstream as a stream (and folded back for the client)."""
        body = request.body
        n, best_of = body.get("n") or 1, body.get("best_of")
        return not body.get("use_beam_search") and "stream_options" not in body \
            and not (isinstance(best_of, int) and best_of > n) \
            and not any(body.get(key) for key in _NOT_STREAMED_INSTEAD)

    def prepare_upstream(self, request: ProxyRequest, stream_instead: bool = False) -> None:
        """Ask the engine for per-event usage on streams (the client's own options are kept in the stream);
        with ``stream_instead``, ask for a stream although the client did not."""
        if stream_instead:
            request.set_fields({"stream": True,
                                "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
            return
        if not request.streaming:
            return
        options = request.body.get("stream_options") or {}
        wanted = {**options, "include_usage": True, "continuous_usage_stats": True}
        if options != wanted:
            request.set_fields({"stream_options": wanted})

    def new_stream(self, request: ProxyRequest, original_options: Mapping[str, Any] | None) -> VLLMStream:
        options = original_options or {}
        usage = bool(options.get("include_usage"))
        return VLLMStream(usage, usage and bool(options.get("continuous_usage_stats")))

    @staticmethod
    def usage_from_body(body: Any) -> Usage | None:
        return Usage.from_openai(body.get("usage")) if isinstance(body, dict) else None

    async def count_prompt(self, client: EngineClient, endpoint: str, body: Mapping[str, Any]) -> list[int]:
        if endpoint == CHAT:
            request = {"model": self.served_model, "messages": body["messages"]}
            request.update({k: body[k] for k in _TOKENIZE_CHAT_KEYS if k in body})
            if "documents" in body or "reasoning_effort" in body:
                request["chat_template_kwargs"] = rendered_template_kwargs(body)
            return [await self._tokenize(client, request)]
        prompt = body["prompt"]
        extra = {k: body[k] for k in ("add_special_tokens",) if k in body}
        if isinstance(prompt, str):
            return [await self._tokenize(client, {"model": self.served_model, "prompt": prompt, **extra})]
        if prompt and isinstance(prompt[0], int):
            return [len(prompt)]
        return await self._count_batch(client, prompt, extra)

    async def _count_batch(self, client: EngineClient, prompts: list[Any], extra: Mapping[str, Any]) -> list[int]:
        """Counts of a batch: token-id prompts by length, text prompts by ``TOKENIZE_CONCURRENCY`` workers."""
        counts = [0 if isinstance(p, str) else len(p) for p in prompts]
        indices = [index for index, p in enumerate(prompts) if isinstance(p, str)]
        texts = iter(indices)

        async def worker() -> None:
            for index in texts:  # shared: each text is taken by one worker
                counts[index] = await self._tokenize(client, {"model": self.served_model, "prompt": prompts[index],
                                                              **extra})

        workers = [asyncio.ensure_future(worker()) for _ in range(min(TOKENIZE_CONCURRENCY, len(indices)))]
        try:
            await asyncio.gather(*workers)  # cancelled with the request, it cancels the workers
        except Exception:  # one failed: the others stop, and the first failure answers
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            raise
        return counts

    @staticmethod
    async def _tokenize(client: EngineClient, request: Mapping[str, Any]) -> int:
        status, answer = await client.post_json("/tokenize", request)
        if status == 200 and isinstance(answer, dict) and isinstance(answer.get("count"), int):
            return int(answer["count"])
        message = answer.get("error", {}).get("message") if isinstance(answer, dict) else None
        if 400 <= status < 500:
            raise bad_request(f"the engine's tokenizer rejected the prompt: {message or status}", None,
                              "invalid_prompt")
        raise engine_unavailable(f"/tokenize answered {status}")

    def warmup_request(self, prompt: str | list[int], max_tokens: int) -> tuple[str, dict[str, Any]]:
        return COMPLETIONS, {"model": self.served_model, "prompt": prompt, "max_tokens": max_tokens,
                             "temperature": 0, "ignore_eos": True}

    async def token_for_padding(self, client: EngineClient) -> int:
        status, answer = await client.post_json("/tokenize", {"model": self.served_model, "prompt": "hello",
                                                              "add_special_tokens": False})
        if status == 200 and isinstance(answer, dict) and answer.get("tokens"):
            return int(answer["tokens"][0])
        return 0

    async def context_window(self, client: EngineClient) -> int | None:
        try:
            async with client.session.get(client.base_url + "/v1/models",
                                          timeout=aiohttp.ClientTimeout(total=10)) as response:
                models = await response.json()
            return int(models["data"][0]["max_model_len"])
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, KeyError, IndexError, TypeError):
            return None


class TritonEngine:
    runtime = "triton"
    health_path = "/v2/health/ready"
    routes = (Route("POST", TRITON_GENERATE, True), Route("POST", TRITON_STREAM, True),
              Route("GET", "/v2/models/{model}", False), Route("GET", "/v2/models/{model}/config", False))

    def __init__(self, served_model: str, tokenizer_model: str = "preprocessing") -> None:
        self.served_model = served_model
        self.tokenizer_model = tokenizer_model
        self.models: frozenset[str] = frozenset()  # READY models in the repository, read at warm-up
        self._tokenizer_missing_logged = False

    def upstream_path(self, request: ProxyRequest) -> str:
        return request.flags["_path"]

    def validate(self, request: ProxyRequest, path_model: str | None) -> None:
        body = request.body
        parameters = body.get("parameters", {})
        if not isinstance(parameters, dict):
            raise bad_request("'parameters' must be an object", "parameters", "invalid_type")
        for key in _COUNTED_INPUTS:
            if key in body and key in parameters:
                raise bad_request(f"'{key}' is set both at the top level and in 'parameters'; Triton takes each "
                                  "input once", f"parameters.{key}", "invalid_value")
        field, holder = triton_input(body, "text_input")
        if holder.get("text_input") is not None and not isinstance(holder["text_input"], str):
            raise bad_request(f"'{field}' must be a string", field, "invalid_type")
        field, holder = triton_input(body, "max_tokens")
        _int_or_none(holder, "max_tokens", field=field)
        request.streaming = request.endpoint == TRITON_STREAM

    async def ensure_model(self, client: EngineClient, path_model: str | None) -> None:
        """404 unless the repository has ``path_model`` ready: asked once per name (its path segment quoted, so a
        ``?`` or ``#`` in it cannot turn the question into another one), then remembered, up to
        ``MAX_REMEMBERED_MODELS`` names; beyond, a ready name is asked again each time."""
        if path_model in self.models:
            return
        if path_model is None or not await self._ready(client, path_model):
            raise GatewayError(404, f"The model `{str(path_model)[:200]}` is not ready in the Triton repository.",
                               "model_not_found", "model")
        if len(self.models) < MAX_REMEMBERED_MODELS:
            self.models = self.models | {path_model}

    @staticmethod
    async def _ready(client: EngineClient, model: str) -> bool:
        try:
            async with client.session.get(f"{client.base_url}/v2/models/{quote(model, safe='')}/ready",
                                          timeout=aiohttp.ClientTimeout(total=5)) as response:
                return response.status == 200
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise engine_unavailable(str(exc) or type(exc).__name__) from None

    def clamp_output(self, request: ProxyRequest, limit: int) -> int:
        """Clamp max_tokens to ``limit`` where the client set it (top level or ``parameters``), or set it top-level
        to ``limit`` when the client set none."""
        field, holder = triton_input(request.body, "max_tokens")
        current = holder.get("max_tokens")
        effective = limit if current is None else min(int(current), limit)
        if effective != current:
            request.set_fields({"max_tokens": effective} if holder is request.body
                               else {"parameters": {**holder, "max_tokens": effective}})
        request.client_max_tokens = None if current is None else effective
        request.output_bound = field
        return effective

    @staticmethod
    def prompt_field(request: ProxyRequest) -> str:
        return triton_input(request.body, "text_input")[0]

    def choices(self, request: ProxyRequest) -> int:
        return 1

    @staticmethod
    def can_stream_instead(request: ProxyRequest) -> bool:
        return False  # the generate and generate_stream answers differ in shape; plain stays plain

    def prepare_upstream(self, request: ProxyRequest, stream_instead: bool = False) -> None:
        return None

    def new_stream(self, request: ProxyRequest, original_options: Mapping[str, Any] | None) -> TritonStream:
        return TritonStream()

    @staticmethod
    def usage_from_body(body: Any) -> Usage | None:
        return None

    async def count_prompt(self, client: EngineClient, endpoint: str, body: Mapping[str, Any]) -> list[int]:
        text = triton_input(body, "text_input")[1].get("text_input")
        if not isinstance(text, str):
            return []
        count = await self.count_text(client, text)
        return [] if count is None else [count]

    async def count_text(self, client: EngineClient, text: str) -> int | None:
        """Tokens in ``text`` by the model repository's tokenizer model; None when there is none."""
        request = {"inputs": [
            {"name": "QUERY", "shape": [1, 1], "datatype": "BYTES", "data": [text]},
            {"name": "REQUEST_OUTPUT_LEN", "shape": [1, 1], "datatype": "INT32", "data": [1]}],
            "outputs": [{"name": "REQUEST_INPUT_LEN"}]}
        status, answer = await client.post_json(f"/v2/models/{self.tokenizer_model}/infer", request)
        if status != 200 or not isinstance(answer, dict):
            if not self._tokenizer_missing_logged:
                log.warning("no tokenizer model %r in the Triton repository (status %s): input tokens are not "
                            "counted by the gateway", self.tokenizer_model, status)
                self._tokenizer_missing_logged = True
            return None
        for output in answer.get("outputs", ()):
            if output.get("name") == "REQUEST_INPUT_LEN" and output.get("data"):
                return int(output["data"][0])
        return None

    def warmup_request(self, prompt: str | list[int], max_tokens: int) -> tuple[str, dict[str, Any]]:
        text = prompt if isinstance(prompt, str) else " ".join("hello" for _ in prompt)
        return f"/v2/models/{self.generate_model}/generate", {"text_input": text, "max_tokens": max_tokens}

    @property
    def generate_model(self) -> str:
        """The model warm-up talks to: the served name when the repository has it, else TensorRT-LLM's ensemble."""
        if not self.models or self.served_model in self.models:
            return self.served_model
        return "ensemble" if "ensemble" in self.models else sorted(self.models)[0]

    async def token_for_padding(self, client: EngineClient) -> int:
        return 0

    async def context_window(self, client: EngineClient) -> int | None:
        return None

    async def load_models(self, client: EngineClient) -> None:
        """The ready models, from the repository index when the server allows it (it may be restricted)."""
        status, answer = await client.post_json("/v2/repository/index", {"ready": True})
        if status == 200 and isinstance(answer, list):
            self.models = frozenset(str(m["name"]) for m in answer
                                    if isinstance(m, dict) and "name" in m and m.get("state", "READY") == "READY")


Engine = VLLMEngine | TritonEngine


def engine_for(runtime: str, served_model: str, tokenizer_model: str,
               max_batch_prompts: int = DEFAULT_MAX_BATCH_PROMPTS) -> Engine:
    if runtime == "triton":
        return TritonEngine(served_model, tokenizer_model)
    return VLLMEngine(served_model, max_batch_prompts)
