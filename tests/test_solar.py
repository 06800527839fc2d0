"""The Solar API client against a real OpenAI-compatible HTTP server on 127.0.0.1 (nothing
patched): request bodies per prompt strategy, the openai SDK's retries on 429 / 500 / timeouts with
our waits, no retries for a refused connection, one-line errors, the throttle on every attempt,
the cache, and the key kept off disk."""

from __future__ import annotations

import itertools
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from omegaconf import OmegaConf

from summ.errors import ConfigError, ServiceDown, UserError
from summ.inference.solar import SolarBackend, SolarClient, SolarError

from .conftest import compose_cfg

KEY = "sk-test-0123456789abcdef-secret"
ENV = "UPSTAGE_API_KEY"
DIALOGUES = [f"#Person1#: 안녕하세요, 질문 {i}번이 있어요.\n#Person2#: 네, 말씀하세요." for i in range(4)]
EXAMPLES = [
    ("#Person1#: 점심 먹었어?\n#Person2#: 아직이야.", "#Person2#는 아직 점심을 먹지 않았습니다."),
    ("#Person1#: 내일 비 온대.\n#Person2#: 우산 챙길게.", "#Person2#는 우산을 챙기기로 합니다."),
]


class FakeSolar:
    """An OpenAI-compatible /v1/chat/completions. Each request is recorded (headers looked up
    case-insensitively, as HTTP has them); `script` holds (status, headers, body, delay_s) for the
    next requests, then it answers 200 with the last line of the last user message (so answers
    can be matched to prompts)."""

    def __init__(self):
        self.requests: list[dict] = []
        self.script: list[tuple] = []
        self.answer = None  # body -> answer text, instead of echoing the last user message
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append(
                        {
                            "path": self.path,
                            "headers": httpx.Headers(self.headers.items()),
                            "body": body,
                            "t": time.monotonic(),
                        }
                    )
                    step = fake.script.pop(0) if fake.script else None
                status, headers, reply, delay = step or (200, {}, None, 0.0)
                if reply is None:
                    last = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
                    content = fake.answer(body) if fake.answer else f"  요약:  {last}\n\n  "
                    reply = {
                        "choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 5},
                    }
                time.sleep(delay)
                data = json.dumps(reply, ensure_ascii=False).encode()
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout) and closed the connection
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    fake = FakeSolar()
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def solar_base():
    return compose_cfg().solar  # the real config's solar section, typed by its schema


@pytest.fixture
def make_client(server, solar_base, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    clients = []

    def _make(**overrides):
        settings = {
            "base_url": server.base_url,
            "model": "solar-mini",
            "requests_per_minute": 6000,
            "concurrency": 4,
            "max_retries": 2,
            "backoff_s": 0.01,
            "timeout_s": 5.0,
            "cache_dir": str(tmp_path / "cache"),
            **overrides,
        }
        client = SolarClient(OmegaConf.merge(solar_base, settings))
        clients.append(client)
        return client

    yield _make
    for c in clients:
        c.close()


def test_zero_shot_request_body_and_answers_in_order(server, make_client):
    client = make_client(prompt_strategy="zero_shot", temperature=0.2, top_p=0.3, max_tokens=77)
    out = client.summarize(DIALOGUES)
    # answers are post-processed (label dropped, whitespace collapsed) and in input order
    assert out == [" ".join(f"대화: {d} 요약:".split()) for d in DIALOGUES]
    assert len(server.requests) == 4
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == f"Bearer {KEY}"
    body = req["body"]
    assert (body["model"], body["temperature"], body["top_p"], body["max_tokens"]) == ("solar-mini", 0.2, 0.3, 77)
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert {r["body"]["messages"][1]["content"].split("\n")[1] for r in server.requests} == {
        d.split("\n")[0] for d in DIALOGUES
    }
    assert client.stats["requests_sent"] == 4 and client.stats["completion_tokens"] == 20
    assert KEY not in repr(client) and KEY not in json.dumps(client.stats)


def test_few_shot_standard_puts_examples_inline(server, make_client):
    make_client(prompt_strategy="few_shot_standard", num_examples=1).summarize(DIALOGUES[:1], EXAMPLES)
    messages = server.requests[0]["body"]["messages"]
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    assert EXAMPLES[0][0] in user and EXAMPLES[0][1] in user and DIALOGUES[0] in user
    assert EXAMPLES[1][0] not in user  # only the first solar.num_examples
    assert user.index(EXAMPLES[0][1]) < user.index(DIALOGUES[0])


def test_few_shot_chat_puts_examples_as_prior_turns(server, make_client):
    make_client(prompt_strategy="few_shot_chat", num_examples=2).summarize(DIALOGUES[:1], EXAMPLES)
    messages = server.requests[0]["body"]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert EXAMPLES[0][0] in messages[1]["content"] and messages[2]["content"] == EXAMPLES[0][1]
    assert EXAMPLES[1][0] in messages[3]["content"] and messages[4]["content"] == EXAMPLES[1][1]
    assert DIALOGUES[0] in messages[5]["content"]


def test_few_shot_without_examples_says_what_to_do(server, make_client):
    with pytest.raises(ConfigError, match="prompt_strategy=zero_shot"):
        make_client(prompt_strategy="few_shot_chat").summarize(DIALOGUES[:1])
    assert not server.requests


def test_429_waits_as_long_as_retry_after_says(server, make_client, caplog):
    caplog.set_level(logging.DEBUG)  # httpx and httpcore included: the key is in no log line
    server.script = [(429, {"Retry-After": "1"}, {"error": {"message": "rate limited"}}, 0.0)]
    client = make_client(backoff_s=0.01)
    assert client.complete([{"role": "user", "content": "안녕"}]) == "안녕"
    first, second = server.requests
    assert second["t"] - first["t"] >= 0.95  # the header's 1 s, not backoff_s
    assert client.stats["retries"] == 1 and client.stats["requests_sent"] == 2
    assert "HTTP 429" in caplog.text and KEY not in caplog.text


def test_retry_after_pauses_every_thread(server, make_client):
    # two threads: the first request gets the 429, the second's slot (0.1 s later) was given
    # before it came back; the third conversation's slot waits out the server's 0.5 s
    server.script = [(429, {"retry-after-ms": "500"}, {"error": {"message": "slow down"}}, 0.0)]
    client = make_client(requests_per_minute=600, concurrency=2, cache_dir=None)
    assert client.complete_many([[{"role": "user", "content": t}] for t in "ABC"]) == list("ABC")
    sent = [(r["body"]["messages"][-1]["content"], r["t"]) for r in server.requests]
    (limited, t0), (other, _) = sent[:2]
    (late,) = set("ABC") - {limited, other}
    assert [t for c, t in sent if c == limited][1] - t0 >= 0.45
    assert [t for c, t in sent if c == late][0] - t0 >= 0.45
    assert client.stats["retries"] == 1 and client.stats["requests_sent"] == 4


def test_repeated_500_fails_after_max_retries_with_the_configured_backoff(server, make_client):
    server.script = [(500, {}, {"error": {"message": "internal\nerror"}}, 0.0)] * 10
    client = make_client(max_retries=2, backoff_s=0.05)
    start = time.monotonic()
    with pytest.raises(SolarError) as err:
        client.complete([{"role": "user", "content": "안녕"}])
    message = str(err.value)
    assert len(server.requests) == 3 and client.stats["requests_sent"] == 3 and client.stats["retries"] == 2
    assert "\n" not in message and "HTTP 500" in message and "/v1/chat/completions" in message
    assert "3 attempts" in message and "internal error" in message and KEY not in message
    t = [r["t"] for r in server.requests]
    assert t[1] - t[0] >= 0.045 and t[2] - t[1] >= 0.095  # solar.backoff_s doubling...
    assert time.monotonic() - start < 1.0  # ...not the SDK's own 0.5 s, 1 s (less up to 25 %)


def test_timeouts_fail_clearly_after_retries(server, make_client):
    server.script = [(200, {}, None, 0.6)] * 10
    client = make_client(timeout_s=0.2, max_retries=1, backoff_s=0.01)
    start = time.monotonic()
    with pytest.raises(SolarError, match="timed out after 0.2 s") as err:
        client.complete([{"role": "user", "content": "안녕"}])
    assert len(server.requests) == 2 and time.monotonic() - start < 2
    message = str(err.value)
    assert "\n" not in message and "/v1/chat/completions" in message and "2 attempts" in message
    assert "solar.timeout_s" in message and client.stats["retries"] == 1


@pytest.mark.parametrize("max_retries", [0, 5])
def test_refused_connection_fails_at_once_naming_the_url(make_client, max_retries):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    client = make_client(base_url=url, max_retries=max_retries, backoff_s=1.0)
    start = time.monotonic()
    with pytest.raises(ServiceDown) as err:  # exit code 1: a service down, not a bad input
        client.complete([{"role": "user", "content": "안녕"}])
    message = str(err.value)
    assert err.value.exit_status == 1 and time.monotonic() - start < 3
    assert "\n" not in message and f"solar.base_url={url}" in message and "unreachable" in message
    assert KEY not in message and client.stats["requests_sent"] == 1 and client.stats["retries"] == 0


def test_throttle_spaces_retries_too(server, make_client):
    server.script = [(500, {}, {"error": {"message": "busy"}}, 0.0)] * 2
    client = make_client(requests_per_minute=600, backoff_s=0.0, cache_dir=None)
    assert client.complete([{"role": "user", "content": "안녕"}]) == "안녕"
    times = [r["t"] for r in server.requests]
    assert len(times) == 3 and all(b - a >= 0.08 for a, b in itertools.pairwise(times))


def test_a_failure_cuts_short_the_other_requests_retry_waits(server, make_client):
    # one request gets a 503 and would wait 30 s to retry; the other's refused key (0.3 s later)
    # ends the batch, and the waiting request gives up at once
    server.script = [(503, {}, {"error": {"message": "later"}}, 0.0), (401, {}, {"error": {"message": "bad key"}}, 0.3)]
    client = make_client(concurrency=2, backoff_s=30, max_backoff_s=60, cache_dir=None)
    start = time.monotonic()
    with pytest.raises(ConfigError, match=ENV):
        client.complete_many([[{"role": "user", "content": t}] for t in "AB"])
    assert time.monotonic() - start < 2 and len(server.requests) == 2


@pytest.mark.parametrize("status", [401, 403])
def test_refused_key_fails_at_once_with_one_line(server, make_client, status):
    server.script = [(status, {}, {"error": {"message": f"invalid key {KEY}"}}, 0.0)]
    with pytest.raises(ConfigError) as err:
        make_client().complete([{"role": "user", "content": "안녕"}])
    assert len(server.requests) == 1  # a 4xx other than 429 is not retried
    assert "\n" not in str(err.value) and ENV in str(err.value) and KEY not in str(err.value)


def test_404_names_the_url_and_the_model(server, make_client):
    server.script = [(404, {}, {"error": {"message": "no such model"}}, 0.0)]
    with pytest.raises(ConfigError) as err:
        make_client(model="solar-nope").complete([{"role": "user", "content": "안녕"}])
    message = str(err.value)
    assert len(server.requests) == 1 and "\n" not in message
    assert f"solar.base_url={server.base_url}" in message and "solar.model=solar-nope" in message


def test_openai_environment_variables_do_not_reach_upstage(server, make_client, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-other")
    monkeypatch.setenv("OPENAI_ORG_ID", "org-other")
    monkeypatch.setenv("OPENAI_CUSTOM_HEADERS", "Authorization: Bearer sk-openai-other")
    make_client().complete([{"role": "user", "content": "안녕"}])
    headers = server.requests[0]["headers"]  # case-insensitive, like HTTP
    assert headers["Authorization"] == f"Bearer {KEY}" and "OpenAI-Organization" not in headers


def test_missing_key_is_one_line_naming_the_variable(server, make_client, monkeypatch):
    client = make_client()
    monkeypatch.delenv(ENV)
    with pytest.raises(UserError) as err:
        client.summarize(DIALOGUES[:1], EXAMPLES)
    message = str(err.value)
    assert "\n" not in message and f"{ENV}=" in message
    assert not server.requests


def test_cache_answers_without_requests_or_key_and_keeps_the_key_off_disk(server, make_client, monkeypatch, tmp_path):
    first = make_client().summarize(DIALOGUES, EXAMPLES)
    assert len(server.requests) == 4
    monkeypatch.delenv(ENV)  # every answer is cached: no request, so no key is needed
    again = make_client()
    assert again.summarize(DIALOGUES, EXAMPLES) == first
    assert len(server.requests) == 4 and again.stats["cache_hits"] == 4 and again.stats["requests_sent"] == 0
    changed = make_client(temperature=0.7)  # other sampling settings are another answer
    with pytest.raises(ConfigError):
        changed.summarize(DIALOGUES[:1], EXAMPLES)
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert files and not any(KEY.encode() in p.read_bytes() for p in files)


def test_throttle_spaces_requests(server, make_client):
    client = make_client(requests_per_minute=600, concurrency=4, cache_dir=None)
    start = time.monotonic()
    client.summarize(DIALOGUES, EXAMPLES)
    assert time.monotonic() - start >= 0.28  # 4 starts, 0.1 s apart
    times = sorted(r["t"] for r in server.requests)
    assert all(b - a >= 0.08 for a, b in itertools.pairwise(times))


def test_backend_translates_and_paraphrases_through_prompts(server, make_client):
    backend = SolarBackend(None, client=make_client())
    assert all(backend.supports(t) for t in ("ko_en", "en_ko", "paraphrase"))
    assert backend.generate(["점심 먹었어요?", "네"], "ko_en") == ["점심 먹었어요?", "네"]  # the server echoes
    system = server.requests[0]["body"]["messages"][0]
    assert system["role"] == "system" and "English" in system["content"]
    backend.generate(["점심 먹었어요?"], "paraphrase")
    assert "바꿔" in server.requests[-1]["body"]["messages"][0]["content"]
    with pytest.raises(ConfigError):
        backend.generate(["x"], "summarize")
