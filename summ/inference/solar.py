"""The Solar API client (Upstage): dev-set summaries for model=solar_api, and back-translation
and paraphrase text for generation.kind=solar.

Upstage's API is OpenAI-compatible, so requests go through the official `openai` SDK
(chat.completions.create at solar.base_url). The SDK decides what to retry (429, 408, 409, 5xx,
timeouts, dropped connections; x-should-retry obeyed; in 3.x nothing when Retry-After asks for
over 2 minutes) and raises typed errors, which end a run as one line: ConfigError for what the
user fixes (key, URL, model; exit code 2), ServiceDown when nothing answers at the address (exit
code 1, a service down), SolarError otherwise. This module adds:

- a client-side throttle: every HTTP attempt, retries included, takes a slot of
  solar.requests_per_minute shared by solar.concurrency threads; a server's Retry-After (or
  retry-after-ms) pauses all threads;
- the wait before a retry: that Retry-After, else solar.backoff_s doubling, capped by
  solar.max_backoff_s, and cut short once another request of the batch has failed;
- no retries when no connection can be made (refused, unknown host): a down or mistyped
  endpoint fails at once, naming solar.base_url;
- a disk cache keyed by (base_url, model, messages, sampling settings), so a rerun or a sweep
  never pays for the same answer twice. Answers come back in input order.

The key comes only from the environment variable named by solar.api_key_env, read when a request
must actually be sent: a run whose answers are all cached needs no key. The key is never logged,
cached, written to disk or put in an error message.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import CancelledError, ThreadPoolExecutor, as_completed
from pathlib import Path

import httpx
import openai
from tqdm.auto import tqdm

from summ.config import PromptStrategy
from summ.errors import ConfigError, ServiceDown
from summ.inference.cache import TASKS, DiskCache
from summ.inference.scoring import clean_prediction

log = logging.getLogger(__name__)


Messages = list[dict]

SUMMARY_SYSTEM = (
    "당신은 대화 요약 전문가입니다. 주어진 대화를 한두 문장의 간결한 한국어로 요약하세요. "
    "화자는 대화에 나온 태그(#Person1#, #Person2# 등) 그대로 3인칭으로 부르고, "
    "#PhoneNumber# 같은 마스킹 토큰은 바꾸지 마세요. 요약문만 답하세요."
)
FEW_SHOT_INSTRUCTION = "아래 예시 대화와 요약을 읽고, 예시 요약의 문체를 따라 마지막 대화를 요약하세요."

# generation.py's tasks, as prompts: one text per request, the answer is the rewritten text alone.
TASK_SYSTEM = {
    "ko_en": "Translate the Korean text the user sends into natural English. Answer with the translation only.",
    "en_ko": "사용자가 보낸 영어 문장을 자연스러운 한국어로 번역하세요. 번역문만 답하세요.",
    "paraphrase": "사용자가 보낸 한국어 문장을 뜻은 그대로 두고 다른 표현으로 바꿔 쓰세요. 바꿔 쓴 문장만 답하세요.",
}

# A label some answers start with ("요약: ..."); it is not part of the summary.
_ANSWER_LABEL = re.compile(r"^\s*(요약|번역|summary|translation)\s*[:：]\s*", re.IGNORECASE)


class SolarError(RuntimeError):
    """A request that failed after the configured retries, or an answer that cannot be read."""


def _dialogue_turn(dialogue: str) -> str:
    return f"대화:\n{dialogue}\n\n요약:"


def build_messages(strategy: str, dialogue: str, examples: Sequence[tuple[str, str]] = ()) -> Messages:
    """The chat messages that ask for a summary of `dialogue`.

    zero_shot: system + the dialogue. few_shot_standard: the (dialogue, summary) examples inline in
    the user message. few_shot_chat: each example as a prior user/assistant turn pair.
    """
    system = {"role": "system", "content": SUMMARY_SYSTEM}
    if strategy == "zero_shot" or not examples:
        return [system, {"role": "user", "content": _dialogue_turn(dialogue)}]
    if strategy == "few_shot_standard":
        shown = "".join(f"예시 대화:\n{d}\n\n예시 요약:\n{s}\n\n" for d, s in examples)
        return [system, {"role": "user", "content": f"{FEW_SHOT_INSTRUCTION}\n\n{shown}{_dialogue_turn(dialogue)}"}]
    if strategy == "few_shot_chat":
        turns = [
            m
            for d, s in examples
            for m in ({"role": "user", "content": _dialogue_turn(d)}, {"role": "assistant", "content": s})
        ]
        return [system, *turns, {"role": "user", "content": _dialogue_turn(dialogue)}]
    raise ConfigError(f"solar.prompt_strategy={strategy} is unknown: choose one of {', '.join(PromptStrategy)}")


def postprocess(answer: str) -> str:
    """Strip the answer, collapse its whitespace (line breaks included) and drop a leading label."""
    return _ANSWER_LABEL.sub("", clean_prediction(answer, ()))


class RateLimiter:
    """At most `per_minute` request starts per minute, evenly spaced, shared by all threads."""

    def __init__(self, per_minute: float):
        self.interval_s = 60.0 / per_minute
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self, stop: threading.Event | None = None) -> float:
        """Block until this caller's slot, or until `stop` is set; returns the seconds waited."""
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval_s
        if start > now:
            (stop or threading.Event()).wait(start - now)
        return start - now

    def hold(self, seconds: float) -> None:
        """No slot starts within `seconds` from now (the server said it is over its limit)."""
        with self._lock:
            self._next = max(self._next, time.monotonic() + seconds)


class _OpenAI(openai.OpenAI):
    """The SDK's client with our wait before a retry. _sleep_for_retry is the SDK's one place for
    that wait (the same signature in openai 2.x and 3.x); what is retried stays the SDK's choice."""

    def __init__(self, *, before_retry, **kwargs):
        self._before_retry = before_retry
        super().__init__(**kwargs)

    def _sleep_for_retry(self, *, retries_taken: int, max_retries: int, options, response) -> None:
        # the SDK's parser: retry-after-ms or Retry-After (seconds or a date), as its retry decision read it
        retry_after = self._parse_retry_after_header(response.headers) if response is not None else None
        self._before_retry(retries_taken + 1, max_retries, response, retry_after)


class _Gate(httpx.BaseTransport):
    """The transport under the SDK's HTTP client: every attempt, retries included, passes here."""

    def __init__(self, send):
        self._send = send
        self._inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self._send(self._inner, request)

    def close(self) -> None:
        self._inner.close()


class SolarClient:
    """Chat completions with throttling, retries and an on-disk cache.

    `stats` (for the run's metrics): requests_sent (HTTP attempts, retries included), cache_hits
    (answers given without a request), retries, prompt_tokens and completion_tokens (as the
    server reports them), truncated (answers cut at solar.max_tokens), wait_s (seconds threads
    slept for the throttle and backoff, summed over threads), wall_s (wall seconds spent answering).
    """

    def __init__(self, cfg):
        self.cfg = cfg  # its value rules are checked with the rest of the config (summ/validation.py)
        self.url = str(cfg.base_url).rstrip("/") + "/chat/completions"
        self.path = httpx.URL(self.url).path
        self._limiter = RateLimiter(cfg.requests_per_minute)
        self._cache = (
            DiskCache(Path(cfg.cache_dir).expanduser() / "solar.sqlite", "solar.cache_dir") if cfg.cache_dir else None
        )
        # connecting takes seconds at most (the SDK's own default is 5 s): an endpoint that drops
        # packets costs each attempt that, not solar.timeout_s
        timeout = httpx.Timeout(cfg.timeout_s, connect=min(cfg.timeout_s, 5.0))
        self._http = httpx.Client(transport=_Gate(self._send), timeout=timeout)
        self._sdk: _OpenAI | None = None  # made when a request must be sent: only then is the key read
        self._local = threading.local()  # the batch's stop event, for the transport and the retry wait
        self._lock = threading.Lock()
        self.stats: dict = {
            "requests_sent": 0,
            "cache_hits": 0,
            "retries": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "truncated": 0,
            "wait_s": 0.0,
            "wall_s": 0.0,
        }

    def __repr__(self) -> str:
        return f"SolarClient(base_url={self.cfg.base_url!r}, model={self.cfg.model!r})"

    def close(self) -> None:
        self._http.close()

    def summarize(self, dialogues: Sequence[str], examples: Sequence[tuple[str, str]] = ()) -> list[str]:
        """One summary per dialogue, in order. `examples`: (dialogue, summary) training pairs, of
        which the first solar.num_examples are shown by the few-shot strategies."""
        shown = list(examples)[: self.cfg.num_examples]
        if self.cfg.prompt_strategy != "zero_shot" and self.cfg.num_examples and not shown:
            raise ConfigError(
                f"solar.prompt_strategy={self.cfg.prompt_strategy} shows training examples but none "
                f"were given: pass training pairs or set solar.prompt_strategy=zero_shot"
            )
        return self.complete_many([build_messages(self.cfg.prompt_strategy, d, shown) for d in dialogues])

    def complete(self, messages: Messages) -> str:
        """One chat completion (cached, throttled, retried), post-processed."""
        return self.complete_many([messages])[0]

    def complete_many(self, conversations: Sequence[Messages]) -> list[str]:
        """One answer per conversation, in input order; cached answers make no request, and
        identical conversations are asked once."""
        start = time.perf_counter()
        keys = [self.cache_key(m) for m in conversations]
        found = self._cache.get_many(keys) if self._cache else {}
        todo = {k: m for k, m in zip(keys, conversations) if k not in found}
        self._count(cache_hits=len(keys) - len(todo))
        if todo:
            sdk = self._client(self._api_key())  # a missing key fails here, once, before any thread starts
            stop = threading.Event()
            pool = ThreadPoolExecutor(max_workers=min(self.cfg.concurrency, len(todo)), thread_name_prefix="solar")
            futures = {pool.submit(self._request, sdk, m, stop): k for k, m in todo.items()}
            try:
                for fut in tqdm(as_completed(futures), total=len(futures), desc="solar", disable=None, leave=False):
                    found[futures[fut]] = fut.result()
            finally:  # after a failure nothing new starts and requests waiting to retry give up
                stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
        self._count(wall_s=time.perf_counter() - start)
        log.info(
            "Solar API: %d answers, %d from the cache, %d requests sent so far",
            len(keys),
            len(keys) - len(todo),
            self.stats["requests_sent"],
        )
        return [found[k] for k in keys]

    def cache_key(self, messages: Messages) -> str:
        """What identifies an answer: endpoint, model, messages and sampling settings (never the key)."""
        request = {
            "base_url": str(self.cfg.base_url).rstrip("/"),
            "model": self.cfg.model,
            "messages": messages,
            **self._sampling(),
        }
        return DiskCache.key("solar", "chat", json.dumps(request, ensure_ascii=False, sort_keys=True))

    def _sampling(self) -> dict:
        return {"temperature": self.cfg.temperature, "top_p": self.cfg.top_p, "max_tokens": self.cfg.max_tokens}

    def _api_key(self) -> str:
        name = self.cfg.api_key_env
        key = os.environ.get(name, "").strip()
        if not key:
            raise ConfigError(
                f"the Solar API key is not set: export {name}=<your Upstage API key> "
                f"(solar.api_key_env names the variable)"
            )
        return key

    def _client(self, key: str) -> _OpenAI:
        with self._lock:
            if self._sdk is None or self._sdk.api_key != key:
                self._sdk = _OpenAI(
                    before_retry=self._before_retry,
                    base_url=str(self.cfg.base_url),
                    api_key=key,
                    max_retries=int(self.cfg.max_retries),
                    timeout=self._http.timeout,
                    http_client=self._http,
                    # the SDK also reads OPENAI_* variables meant for OpenAI: an Authorization from
                    # OPENAI_CUSTOM_HEADERS must not replace the Solar key, nor OpenAI ids reach Upstage
                    default_headers={
                        "Authorization": f"Bearer {key}",
                        "OpenAI-Organization": openai.Omit(),
                        "OpenAI-Project": openai.Omit(),
                    },
                )
            return self._sdk

    def _count(self, **amounts) -> None:
        with self._lock:
            for name, amount in amounts.items():
                self.stats[name] += amount

    def _one_line(self, text: str) -> str:
        """Server text fit for an error message: one line, short, the key masked if echoed."""
        key = self._sdk.api_key if self._sdk else ""
        text = " ".join((text.replace(key, "***") if key else text).split())
        return text[:300]

    def _send(self, transport: httpx.BaseTransport, request: httpx.Request) -> httpx.Response:
        """One HTTP attempt: a throttle slot, then the request."""
        stop = self._local.stop
        if stop.is_set():  # another request failed: the batch is over
            raise CancelledError
        self._count(wait_s=self._limiter.wait(stop))
        if stop.is_set():
            raise CancelledError
        self._count(requests_sent=1)
        return transport.handle_request(request)

    def _before_retry(
        self, retry: int, max_retries: int, response: httpx.Response | None, retry_after: float | None
    ) -> None:
        """The wait before the SDK's retry number `retry`, or an error where asking again is no use."""
        if response is not None:
            why = f"HTTP {response.status_code}: {self._error_text(response)}"
        else:  # the SDK calls this while it handles the timeout or connection error
            exc = sys.exc_info()[1]
            self._raise_unless_retryable(exc)
            why = self._failure(exc)
        if retry_after is not None and math.isfinite(retry_after):
            delay = min(max(retry_after, 0.0), self.cfg.max_backoff_s)
            self._limiter.hold(delay)  # the server asked for a pause: every thread takes it
        else:
            delay = min(self.cfg.backoff_s * 2 ** (retry - 1), self.cfg.max_backoff_s)
        log.warning("Solar API: POST %s %s; retry %d/%d in %.1f s", self.path, why, retry, max_retries, delay)
        self._count(retries=1, wait_s=delay)
        if self._local.stop.wait(delay):
            raise CancelledError

    def _raise_unless_retryable(self, exc: BaseException | None) -> None:
        """Raise instead of letting the SDK retry (it retries every failed connection, and openai 2.x
        any exception from the transport) when the batch is over or no connection can be made."""
        if isinstance(exc, CancelledError) or self._local.stop.is_set():
            raise CancelledError
        if isinstance(exc, httpx.ConnectError):
            # nothing answers at that address (refused, unknown host): asking again for half a
            # minute only delays saying so
            raise ServiceDown(
                f"cannot connect to the Solar API at solar.base_url={self.cfg.base_url} "
                f"({self._one_line(str(exc)) or type(exc).__name__}): check solar.base_url, "
                f"or the server is unreachable"
            ) from None

    def _failure(self, exc: BaseException | None) -> str:
        """A request that got no response, in words."""
        if isinstance(exc, (httpx.TimeoutException, openai.APITimeoutError)):
            return f"timed out after {self.cfg.timeout_s:g} s"
        if exc is None:
            return "got no response"
        return f"{type(exc).__name__}: {self._one_line(str(exc))}"

    @staticmethod
    def _attempts(request: httpx.Request) -> int:
        """How many attempts the SDK made: it numbers each one in a header."""
        try:
            return int(request.headers.get("x-stainless-retry-count", 0)) + 1
        except (AttributeError, ValueError):
            return 1

    def _request(self, sdk: _OpenAI, messages: Messages, stop: threading.Event) -> str:
        self._local.stop = stop
        try:
            completion = sdk.chat.completions.create(
                model=self.cfg.model, messages=messages, stream=False, **self._sampling()
            )
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise ConfigError(
                f"the Solar API refused the key (HTTP {exc.status_code} from POST {self.path}): "
                f"check that ${self.cfg.api_key_env} holds a valid Upstage API key"
            ) from None
        except openai.NotFoundError:
            raise ConfigError(
                f"HTTP 404 from POST {self.path}: check solar.base_url={self.cfg.base_url} and "
                f"solar.model={self.cfg.model}"
            ) from None
        except (openai.APIStatusError, openai.APIConnectionError) as exc:  # after the SDK's retries
            if isinstance(exc, openai.APIConnectionError):  # with no retries left, or none configured
                self._raise_unless_retryable(exc.__cause__)
            n = self._attempts(exc.request)
            tries = f" after {n} attempts (solar.max_retries={self.cfg.max_retries}); the last" if n > 1 else ""
            if isinstance(exc, openai.APIStatusError):
                raise SolarError(
                    f"POST {self.path} failed{tries}: HTTP {exc.status_code}: {self._error_text(exc.response)}"
                ) from None
            hint = ": raise solar.timeout_s or try again later" if isinstance(exc, openai.APITimeoutError) else ""
            raise SolarError(f"POST {self.path} failed{tries}: {self._failure(exc.__cause__ or exc)}{hint}") from None
        except (openai.APIError, ValueError) as exc:  # a 200 whose body is not what the API sends
            raise SolarError(
                f"the answer to POST {self.path} cannot be read: {type(exc).__name__}: {self._one_line(str(exc))}"
            ) from None
        return self._answer(completion, messages)

    def _error_text(self, resp: httpx.Response) -> str:
        try:
            err = resp.json().get("error")
            text = err.get("message") if isinstance(err, dict) else err
        except (ValueError, AttributeError):
            text = None
        text = self._one_line(str(text or resp.text or resp.reason_phrase))
        wait = resp.headers.get("retry-after")
        return f"{text} (Retry-After: {wait})" if wait else text

    def _answer(self, completion, messages: Messages) -> str:
        try:
            choice = completion.choices[0]
            content = choice.message.content or ""
        except (AttributeError, IndexError, KeyError, TypeError):
            raise SolarError(
                f"the answer to POST {self.path} has no choices[0].message.content: {self._one_line(str(completion))}"
            ) from None
        usage = getattr(completion, "usage", None)
        self._count(
            prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            truncated=int(getattr(choice, "finish_reason", None) == "length"),
        )
        answer = postprocess(content)
        if answer and self._cache:  # an empty answer is asked again next time
            self._cache.put_many({self.cache_key(messages): answer})
        return answer


class SolarBackend:
    """generation.py's backend interface (`name`, `supports`, `generate(texts, task)`) through
    prompts: ko_en and en_ko translation, Korean paraphrase; one text per request."""

    def __init__(self, cfg, client: SolarClient | None = None):
        self.client = client or SolarClient(cfg)
        # generation's cache keys texts by backend name: the name carries everything that changes
        # an answer (URL, model, sampling, the task prompts), so new settings never get old text
        settings = self.client.cache_key([{"role": "system", "content": json.dumps(TASK_SYSTEM, ensure_ascii=False)}])
        self.name = f"solar:{self.client.cfg.model}:{settings[:12]}"

    def supports(self, task: str) -> bool:
        return task in TASKS

    def generate(self, texts: Sequence[str], task: str) -> list[str]:
        if task not in TASK_SYSTEM:
            raise ConfigError(f"the solar generation backend has no task {task}: choose one of {', '.join(TASKS)}")
        system = {"role": "system", "content": TASK_SYSTEM[task]}
        return self.client.complete_many([[system, {"role": "user", "content": t}] for t in texts])
