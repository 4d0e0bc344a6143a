"""LLM-judge scores for instruction responses, through any OpenAI-compatible chat endpoint.

A run folder of an instruction task holds ``responses.jsonl`` (instruction, input, reference,
response per line). :func:`judge_run` sends each to a judge model — a local Ollama or vLLM server,
or a hosted one — with :class:`huggingface_hub.InferenceClient` (``base_url=...``), asks for one
integer on a 0-100 scale, parses the answer strictly, retries a bounded number of times and writes:

- ``judge.jsonl``: one line per response as soon as it is judged (score or the unparseable answers
  or the error), so an interrupted run keeps what it did;
- ``judge.json``: mean, count, distribution (ten-point bins), every unparseable answer and failure.

``HF_HUB_OFFLINE=1`` makes ``huggingface_hub`` refuse every request, local ones included. A judge on
this machine (localhost / 127.x / ::1) is still reached: offline mode is lifted for those requests
only. A remote judge under offline mode is refused with one line saying so.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import string
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..constants import JUDGE_SCORES_FILE, JUDGE_SUMMARY_FILE, RESPONSES_FILE
from ..errors import ConfigError, DataError

#: Fields of a ``responses.jsonl`` line.
RESPONSE_FIELDS = ("instruction", "input", "reference", "response")

#: Our judging prompt. Placeholders: {instruction} {input} {reference} {response} {low} {high}.
DEFAULT_PROMPT = (
    "You are grading how well a model followed an instruction.\n\n"
    "Instruction:\n{instruction}\n\n"
    "Input (may be empty):\n{input}\n\n"
    "Reference answer:\n{reference}\n\n"
    "Model response:\n{response}\n\n"
    "Compare the model response with the reference answer. Rate it from {low} (useless or wrong) to "
    "{high} (as good as the reference). Reply with a single integer between {low} and {high} and nothing else."
)
_INTEGER = re.compile(r"[+]?\d{1,6}")
_LOCAL_HOSTS = ("localhost", "::1", "0.0.0.0")


@dataclass(frozen=True)
class JudgeConfig:
    """Where the judge is and how it is asked."""

    endpoint: str
    """Base URL of an OpenAI-compatible server, e.g. ``http://127.0.0.1:11434/v1`` (Ollama)."""
    model: str
    """Model name the server knows (``llama3.1:8b``, ``Qwen/Qwen2.5-7B-Instruct``, ...)."""
    prompt: str = DEFAULT_PROMPT
    """Prompt template; must contain {instruction}, {input}, {reference} and {response}."""
    low: int = 0
    """Lowest score the judge may give."""
    high: int = 100
    """Highest score the judge may give."""
    retries: int = 2
    """Extra attempts per response after a server error (5xx, 429, timeout) or an unparseable answer."""
    timeout_s: float = 60.0
    """Seconds to wait for one answer."""
    api_key: str | None = None
    """Bearer token for hosted endpoints (default: none; ``$GPT2LORA_JUDGE_API_KEY`` on the command line)."""
    max_tokens: int = 8
    """Tokens the judge may answer with (an integer needs few)."""
    backoff_s: float = 0.5
    """Pause before a retry, doubled on each further retry."""

    def __post_init__(self) -> None:
        parsed = urlparse(self.endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigError(f"--endpoint: expected an http(s) URL like http://127.0.0.1:11434/v1, got "
                              f"{self.endpoint!r}")
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError(f"--model: expected the judge model's name, got {self.model!r}")
        _check_template(self.prompt)
        missing = [f"{{{f}}}" for f in RESPONSE_FIELDS if f"{{{f}}}" not in self.prompt]
        if missing:
            raise ConfigError(f"judge prompt: expected the placeholders {', '.join(missing)}")
        if not (isinstance(self.low, int) and isinstance(self.high, int) and self.low < self.high):
            raise ConfigError(f"judge scale: expected integers low < high, got {self.low!r}..{self.high!r}")
        if not isinstance(self.retries, int) or isinstance(self.retries, bool) or not 0 <= self.retries <= 10:
            raise ConfigError(f"--retries: expected an integer in 0..10, got {self.retries!r}")
        if not self.timeout_s > 0:
            raise ConfigError(f"--timeout: expected a number of seconds > 0, got {self.timeout_s!r}")

    def message(self, item: dict[str, str]) -> str:
        """The prompt for one response."""
        try:
            return self.prompt.format(low=self.low, high=self.high, **{f: item[f] for f in RESPONSE_FIELDS})
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(f"judge prompt: cannot fill the template ({err!r}); use only the placeholders "
                              "{instruction} {input} {reference} {response} {low} {high}, and {{ }} for braces") from None


#: Longest judge prompt template accepted (characters); the filled prompt adds one response to it.
MAX_PROMPT_CHARS = 100_000
TEMPLATE_FIELDS = (*RESPONSE_FIELDS, "low", "high")


def _check_template(prompt: str) -> None:
    """Plain ``{name}`` placeholders of known names only: a format spec (``{response:>300000000}``), an
    attribute or index (``{instruction.nope}``) or a conversion is refused before any request."""
    if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS:
        size = len(prompt) if isinstance(prompt, str) else type(prompt).__name__
        raise ConfigError(f"judge prompt: expected a template of at most {MAX_PROMPT_CHARS:,} characters, got {size}")
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(prompt) if name is not None]
    except ValueError as err:
        raise ConfigError(f"judge prompt: not a valid template ({err}); write {{{{ }}}} for literal braces") from None
    for name, spec, conv in fields:
        if name not in TEMPLATE_FIELDS or spec or conv:
            shown = "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
            raise ConfigError(f"judge prompt: placeholder {shown} is not one of "
                              f"{' '.join('{' + f + '}' for f in TEMPLATE_FIELDS)} (plain, without format specs); "
                              "write {{ }} for literal braces")


def parse_score(answer: str, low: int = 0, high: int = 100) -> int | None:
    """The integer the judge answered, or None when the answer is anything but one integer in range."""
    text = answer.strip() if isinstance(answer, str) else ""
    if not _INTEGER.fullmatch(text):
        return None
    value = int(text)
    return value if low <= value <= high else None


def read_responses(run_dir: str | os.PathLike) -> list[dict[str, str]]:
    """The generated responses of a run folder (``responses.jsonl``), validated."""
    path = Path(run_dir) / RESPONSES_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no {RESPONSES_FILE}; expected a run folder of an instruction task written "
                          "by 'gpt2lora train' or 'gpt2lora reproduce'")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {number}: invalid JSON ({err.msg})") from None
        missing = [f for f in RESPONSE_FIELDS if not isinstance(row.get(f) if isinstance(row, dict) else None, str)]
        if missing:
            raise DataError(f"{path} line {number}: expected string fields {', '.join(RESPONSE_FIELDS)}; "
                            f"missing or not text: {', '.join(missing)}")
        items.append({f: row[f] for f in RESPONSE_FIELDS})
    if not items:
        raise DataError(f"{path} has no responses")
    return items


def is_local(endpoint: str) -> bool:
    """Whether the endpoint's host is this machine."""
    host = (urlparse(endpoint).hostname or "").lower()
    return host in _LOCAL_HOSTS or host.startswith("127.")


@contextlib.contextmanager
def hub_online_for(endpoint: str) -> Iterator[None]:
    """Lift ``HF_HUB_OFFLINE`` for requests to a local endpoint; refuse a remote one in one line."""
    from huggingface_hub import constants

    if not constants.is_offline_mode():
        yield
        return
    if not is_local(endpoint):
        raise ConfigError(f"--endpoint {endpoint}: HF_HUB_OFFLINE=1 is set, and huggingface_hub then refuses every "
                          "request; a judge on this machine (localhost, 127.0.0.1) is still reached, a remote one "
                          "is not. Unset HF_HUB_OFFLINE for this command or run the judge locally")
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


class _Abort(Exception):
    """The endpoint cannot be used at all (unreachable, not OpenAI-compatible, unauthorised)."""


class _Retryable(Exception):
    """This request failed in a way that a retry may fix (5xx, 429, timeout, no connection)."""

    def __init__(self, message: str, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _is_transport_error(err: BaseException) -> bool:
    names = {cls.__name__ for cls in type(err).__mro__}
    return isinstance(err, OSError) or bool(names & {"TransportError", "RequestError", "NetworkError"})


def make_client(config: JudgeConfig) -> Callable[[list[dict[str, str]]], str]:
    """A function sending chat messages to the judge and returning its answer's text."""
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import HfHubHTTPError, InferenceTimeoutError

    client = InferenceClient(base_url=config.endpoint, api_key=config.api_key, timeout=config.timeout_s)
    where = f"--endpoint {config.endpoint}"

    def ask(messages: list[dict[str, str]]) -> str:
        try:
            out = client.chat_completion(messages, model=config.model, max_tokens=config.max_tokens,
                                         temperature=0.0)
            return out.choices[0].message.content or ""
        except InferenceTimeoutError as err:
            raise _Retryable(f"no answer within {config.timeout_s:g} s") from err
        except HfHubHTTPError as err:
            status = _status(err)
            if status is not None and (status >= 500 or status == 429):
                raise _Retryable(f"HTTP {status}") from err
            hint = {401: "unauthorised: pass --api-key or set $GPT2LORA_JUDGE_API_KEY",
                    403: "forbidden: check the API key", 404: "no /chat/completions there (for Ollama use "
                    "http://HOST:11434/v1, for vLLM http://HOST:8000/v1) or unknown --model"}.get(
                        status, "is it an OpenAI-compatible chat endpoint, and does it know --model?")
            raise _Abort(f"{where} answered HTTP {status}: {hint}") from err
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as err:
            raise _Abort(f"{where} did not answer like an OpenAI-compatible chat endpoint ({type(err).__name__}: "
                         f"{str(err)[:120]})") from err
        except Exception as err:
            if _is_transport_error(err):
                raise _Retryable(f"cannot connect ({type(err).__name__}: {err})", unreachable=True) from err
            raise

    return ask


def _judge_one(ask: Callable[[list[dict[str, str]]], str], config: JudgeConfig, item: dict[str, str],
               sleep: Callable[[float], None]) -> dict[str, Any]:
    answers: list[str] = []
    errors: list[str] = []
    unreachable = True
    messages = [{"role": "user", "content": config.message(item)}]
    for attempt in range(config.retries + 1):
        if attempt:
            sleep(config.backoff_s * 2 ** (attempt - 1))
        try:
            answer = ask(messages)
        except _Retryable as err:
            errors.append(str(err))
            unreachable = unreachable and err.unreachable
            continue
        unreachable = False
        score = parse_score(answer, config.low, config.high)
        if score is not None:
            return {"score": score, "attempts": attempt + 1, "unparseable": answers, "errors": errors}
        answers.append(answer)
    if unreachable:
        raise _Abort(f"--endpoint {config.endpoint}: {errors[-1]} after {config.retries + 1} attempts; is the judge "
                     "server running?")
    return {"score": None, "attempts": config.retries + 1, "unparseable": answers, "errors": errors}


def summarise(records: list[dict[str, Any]], config: JudgeConfig) -> dict[str, Any]:
    """Mean, count, ten-point distribution, unparseable answers and failures of judged responses."""
    scores = [r["score"] for r in records if r["score"] is not None]
    count = min(10, config.high - config.low + 1)
    width = (config.high - config.low + 1) // count
    bins: dict[str, int] = {}
    for k in range(count):  # ten bins; the last one takes the remainder (90-100 on a 0-100 scale)
        start = config.low + k * width
        end = config.high if k == count - 1 else start + width - 1
        bins[f"{start}-{end}"] = sum(start <= s <= end for s in scores)
    return {
        "endpoint": config.endpoint, "model": config.model, "scale": [config.low, config.high],
        "responses": len(records), "scored": len(scores),
        "mean": sum(scores) / len(scores) if scores else None,
        "distribution": bins,
        "unparseable": [{"index": r["index"], "answers": r["unparseable"]} for r in records
                        if r["score"] is None and r["unparseable"]],
        "failed": [{"index": r["index"], "errors": r["errors"]} for r in records
                   if r["score"] is None and not r["unparseable"]],
    }


def judge_run(run_dir: str | os.PathLike, config: JudgeConfig,
              ask: Callable[[list[dict[str, str]]], str] | None = None,
              sleep: Callable[[float], None] = time.sleep, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Score every response of ``run_dir`` with the judge; write judge.jsonl and judge.json; return the summary.

    An endpoint that cannot be used (unreachable after the retries, not OpenAI-compatible, refused)
    stops the run with a one-line :class:`ConfigError`; what was judged so far stays in judge.jsonl and
    the responses stay in responses.jsonl.
    """
    folder = Path(run_dir)
    items = read_responses(folder)
    ask = ask or make_client(config)
    records: list[dict[str, Any]] = []
    scores_path = folder / JUDGE_SCORES_FILE
    with hub_online_for(config.endpoint), open(scores_path, "w", encoding="utf-8") as out:
        for index, item in enumerate(items):
            try:
                result = _judge_one(ask, config, item, sleep)
            except _Abort as err:
                raise ConfigError(f"{err}; judged {len(records)} of {len(items)} responses (kept in {scores_path}; "
                                  f"the responses are in {folder / RESPONSES_FILE})") from None
            record = {"index": index, **result}
            records.append(record)
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
    summary = summarise(records, config)
    (folder / JUDGE_SUMMARY_FILE).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    mean = f"{summary['mean']:.2f}" if summary["mean"] is not None else "n/a"
    log(f"judge {config.model} on {folder}: mean {mean} over {summary['scored']} of {summary['responses']} responses; "
        f"{len(summary['unparseable'])} unparseable, {len(summary['failed'])} failed; details in {folder / JUDGE_SUMMARY_FILE}")
    return summary


def judge_command(run: str | os.PathLike, endpoint: str, model: str, prompt_file: str | None = None,
                  low: int = 0, high: int = 100, retries: int = 2, timeout: float = 60.0,
                  api_key: str | None = None) -> dict[str, Any]:
    """``gpt2lora judge RUN_DIR --endpoint URL --model NAME``: score a run's responses, print nothing extra."""
    prompt = DEFAULT_PROMPT
    if prompt_file:
        path = Path(prompt_file)
        if not path.is_file():
            raise ConfigError(f"--prompt-file {path}: no such file")
        try:
            prompt = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"--prompt-file {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    config = JudgeConfig(endpoint, model, prompt=prompt, low=low, high=high, retries=retries, timeout_s=timeout,
                         api_key=api_key or os.environ.get("GPT2LORA_JUDGE_API_KEY"))
    return judge_run(run, config)
