"""Request bodies of the OpenAI-shaped endpoints, checked field by field: a bad field is a 400 that names it.

Chat prompts use the instruction format the library trains with (:func:`gpt2lora.data.tasks.alpaca_prompt`):
the last message must come from the user and is the instruction; earlier messages (a system message, previous
turns) become the ``### Input:`` section as ``role: content`` lines. GPT-2 has no chat template of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ...data.tasks import alpaca_prompt


class BadRequest(Exception):
    """A 400 in OpenAI's error shape, naming the offending field in ``param``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code


@dataclass
class Sampling:
    """What every generation endpoint shares."""

    model: str
    max_tokens: int | None
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool


@dataclass
class CompletionRequest(Sampling):
    prompts: list[str | list[int]]


@dataclass
class ChatRequest(Sampling):
    prompt: str


@dataclass
class ClassifyRequest:
    model: str
    inputs: list[str]


# Fields OpenAI defines that this server accepts only at their "off" value (or not at all when None).
_NEUTRAL = {"n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (None, False), "top_logprobs": (None, 0),
            "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},), "suffix": ("",),
            "tools": ([],), "tool_choice": ("none",), "parallel_tool_calls": (False,),
            "response_format": ({"type": "text"},), "service_tier": ("auto", "default"), "store": (False,)}
_SHARED = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options", "user",
           "metadata"}
COMPLETION_FIELDS = _SHARED | {"prompt", "n", "best_of", "echo", "logprobs", "presence_penalty",
                               "frequency_penalty", "logit_bias", "suffix"}
CHAT_FIELDS = _SHARED | {"messages", "max_completion_tokens", "n", "logprobs", "top_logprobs", "presence_penalty",
                         "frequency_penalty", "logit_bias", "tools", "tool_choice", "parallel_tool_calls",
                         "response_format", "service_tier", "store"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_fields(body: Any, allowed: set[str], required: tuple[str, ...]) -> dict[str, Any]:
    """``body`` as a dict with no unknown field and every required one; neutral-only fields at their neutral value."""
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"unknown parameter {unknown[0]!r}; this endpoint accepts {sorted(allowed)}", unknown[0])
    for key in required:
        if key not in body or body[key] is None:
            raise BadRequest(f"missing required parameter {key!r}", key)
    for key, neutral in _NEUTRAL.items():
        if key in body and body[key] is not None and body[key] not in neutral:
            raise BadRequest(f"{key}={body[key]!r} is not supported; gpt2lora serve accepts only {neutral[0]!r}",
                             key)
    return body


def _sampling(body: dict[str, Any], max_tokens_key: str = "max_tokens") -> dict[str, Any]:
    model = body["model"]
    if not isinstance(model, str):
        raise BadRequest(f"model: expected a string, got {type(model).__name__}", "model")
    max_tokens = body.get(max_tokens_key)
    if body.get("max_completion_tokens") is not None and max_tokens_key == "max_tokens":
        max_tokens_key, max_tokens = "max_completion_tokens", body["max_completion_tokens"]
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise BadRequest(f"{max_tokens_key}: expected an integer >= 1, got {max_tokens!r}", max_tokens_key)
    temperature = body.get("temperature")
    temperature = 1.0 if temperature is None else temperature
    if not _is_number(temperature) or not 0 <= temperature <= 2:
        raise BadRequest(f"temperature: expected a number from 0 to 2, got {temperature!r}", "temperature")
    top_p = body.get("top_p")
    top_p = 1.0 if top_p is None else top_p
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise BadRequest(f"top_p: expected a number in (0, 1], got {top_p!r}", "top_p")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise BadRequest(f"stop: expected a string or a list of up to 4 strings, got {body.get('stop')!r}", "stop")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
        raise BadRequest(f"seed: expected a non-negative integer, got {seed!r}", "seed")
    stream = body.get("stream")
    stream = False if stream is None else stream
    if not isinstance(stream, bool):
        raise BadRequest(f"stream: expected true or false, got {stream!r}", "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}
                                or not isinstance(options.get("include_usage", False), bool)):
        raise BadRequest(f"stream_options: expected {{\"include_usage\": true|false}}, got {options!r}",
                         "stream_options")
    for key in ("user",):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise BadRequest(f"{key}: expected a string, got {type(body[key]).__name__}", key)
    return {"model": model, "max_tokens": max_tokens, "temperature": float(temperature), "top_p": float(top_p),
            "stop": stop, "seed": seed, "stream": stream,
            "include_usage": bool(options and options.get("include_usage"))}


def parse_completion(body: Any) -> CompletionRequest:
    """A ``/v1/completions`` body: ``prompt`` is a string, a list of strings, a list of token ids or a list of
    lists of token ids."""
    body = check_fields(body, COMPLETION_FIELDS, ("model", "prompt"))
    prompt = body["prompt"]
    if isinstance(prompt, str):
        prompts: list[str | list[int]] = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or (isinstance(p, list) and p and all(_is_int(t) for t in p)) for p in prompt):
        prompts = list(prompt)
    else:
        raise BadRequest("prompt: expected a string, a list of strings, a list of token ids or a list of lists "
                         "of token ids (none empty)", "prompt")
    return CompletionRequest(**_sampling(body), prompts=prompts)


def _content(message: dict[str, Any], index: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise BadRequest(f"messages[{index}].content: expected a string or a list of text parts", f"messages[{index}]"
                     ".content")


def chat_prompt(messages: list[dict[str, Any]]) -> str:
    """The instruction prompt of a conversation (see the module docstring)."""
    *history, last = messages
    context = "\n".join(f"{m['role']}: {_content(m, i)}" for i, m in enumerate(history))
    return alpaca_prompt(_content(last, len(messages) - 1), context)


def parse_chat(body: Any) -> ChatRequest:
    """A ``/v1/chat/completions`` body."""
    body = check_fields(body, CHAT_FIELDS, ("model", "messages"))
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: expected a non-empty list of {role, content} objects", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant"):
            raise BadRequest(f"messages[{i}]: expected an object with role system, user or assistant and its "
                             "content", f"messages[{i}]")
        unknown = sorted(set(message) - {"role", "content", "name"})
        if unknown:
            raise BadRequest(f"messages[{i}]: unknown field {unknown[0]!r}", f"messages[{i}].{unknown[0]}")
        _content(message, i)
    if messages[-1]["role"] != "user":
        raise BadRequest(f"messages[{len(messages) - 1}]: the last message must come from the user (it is the "
                         "instruction)", f"messages[{len(messages) - 1}].role")
    return ChatRequest(**_sampling(body), prompt=chat_prompt(messages))


def parse_classify(body: Any) -> ClassifyRequest:
    """A ``/classify`` body: ``model`` and ``input`` (a string or a list of strings)."""
    body = check_fields(body, {"model", "input", "user"}, ("model", "input"))
    if not isinstance(body["model"], str):
        raise BadRequest(f"model: expected a string, got {type(body['model']).__name__}", "model")
    inputs = body["input"]
    inputs = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) and t for t in inputs):
        raise BadRequest("input: expected a non-empty string or a non-empty list of non-empty strings", "input")
    return ClassifyRequest(body["model"], inputs)
