"""`specdec serve` (issue 22), through the official openai client against servers started here on
127.0.0.1, over the demo pair (its tokenizer given a chat template): answers equal `specdec run`'s,
streaming and not; 16 concurrent requests; a client that leaves frees its row; every bad request
gets its status while the server stays healthy; metrics; SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="needs the [serve] extra (starlette, uvicorn, prometheus-client)")
openai = pytest.importorskip("openai", reason="the tests talk to the server through the official openai client")

import uvicorn  # noqa: E402

from specdec.config import load_config  # noqa: E402
from specdec.decoder import SpeculativeDecoder  # noqa: E402
from specdec.serve.app import ServeSettings, create_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|endoftext|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
QUESTIONS = ["def add(a, b):", "import os", "class Stack:", "for i in range(10):", "def main():", "x = [1, 2, 3]",
             "while True:", "print('hello')", "def fib(n):", "import numpy as np", "return None", "if x > 0:",
             "try:", "with open(path) as f:", "def __init__(self):", "lambda x: x + 1"]


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> Path:
    """The demo pair, its target's tokenizer with a chat template, in a chain config."""
    root = tmp_path_factory.mktemp("serve")
    for name in ("target", "draft"):
        shutil.copytree(ROOT / "models" / "demo" / name, root / name)
    settings = json.loads((root / "target" / "tokenizer_config.json").read_text())
    (root / "target" / "tokenizer_config.json").write_text(json.dumps({**settings, "chat_template": TEMPLATE}))
    path = root / "demo-chain.yaml"
    path.write_text(f"target: {{model: {root / 'target'}}}\ndraft: {{model: {root / 'draft'}}}\n"
                    "strategy: {name: chain, k: 4}\ngeneration: {max_new_tokens: 32}\n")
    return path


class Server:
    """A server in a thread of this process, on a free port of 127.0.0.1."""

    def __init__(self, config_path: Path, **settings):
        self.decoder = SpeculativeDecoder.from_config(load_config(config_path))
        self.app = create_app(self.decoder, config_path.stem, ServeSettings(**settings))
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            assert self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def client(self, key: str = "none", **options) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, **options)

    def request(self, path: str, body: bytes | dict | None = None, headers: dict | None = None) -> tuple:
        """(status, body: JSON, or text when not JSON, headers) of a raw request."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, _decode(response), response.headers
        except urllib.error.HTTPError as error:
            return error.code, _decode(error), error.headers

    def healthy(self) -> dict:
        status, body, _ = self.request("/health")
        assert status == 200 and body["status"] == "ok"
        return body

    def wait_for(self, condition, seconds: float = 30.0) -> None:
        """Poll /health until `condition(health)` holds (a liveness bound, not a speed check)."""
        deadline = time.monotonic() + seconds
        while not condition(self.healthy()):
            assert time.monotonic() < deadline, "the server never got there"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def _decode(response):
    data = response.read()
    return json.loads(data) if response.headers.get("content-type", "").startswith("application/json") else data.decode()


@pytest.fixture(scope="module")
def server(config_path):
    server = Server(config_path, max_batch=4)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def small(config_path):
    """One row, a queue of one, an API key."""
    server = Server(config_path, max_batch=1, max_queue=1, api_key="secret")
    yield server
    server.stop()


def run_cli_json(capsys, config_path: Path, *args: str) -> dict:
    """`specdec run CONFIG --json ARGS` (in this process) -> its JSON output."""
    from test_cli import run_cli

    code, out, err = run_cli(capsys, "run", str(config_path), "--json", *args)
    assert code == 0, err
    return json.loads(out)


def test_chat_and_completions_equal_specdec_run_streaming_and_not(server, config_path, capsys):
    client = server.client()
    question = "Write a function that adds two numbers."
    chat = client.chat.completions.create(model="demo-chain", messages=[{"role": "user", "content": question}],
                                          max_tokens=24, temperature=0)
    alone = run_cli_json(capsys, config_path, "--chat", "--prompt", question, "--max-new-tokens", "24")
    assert chat.choices[0].message.content == alone["text"] and chat.model == "demo-chain"
    prompt_tokens = len(server.decoder.prepare(None, [{"role": "user", "content": question}], {}).prompt_ids)
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (prompt_tokens, len(alone["token_ids"]))
    assert chat.usage.total_tokens == prompt_tokens + len(alone["token_ids"])
    spec = chat.model_extra["metrics"]["speculative_decoding"]
    assert spec["accepted_tokens"] == alone["metrics"]["accepted_tokens"] and spec["draft_tokens"] > 0
    assert len(spec["acceptance_by_position"]) == 4 and 1.0 <= spec["mean_tokens_per_step"] <= 5.0

    completion = client.completions.create(model="demo-chain", prompt="def add(a, b):", max_tokens=20, temperature=0)
    alone = run_cli_json(capsys, config_path, "--prompt", "def add(a, b):", "--max-new-tokens", "20")
    assert completion.choices[0].text == alone["text"] and completion.choices[0].finish_reason == "length"

    chunks = list(client.chat.completions.create(model="demo-chain", messages=[{"role": "user", "content": question}],
                                                 max_tokens=24, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].model_extra["metrics"]["speculative_decoding"] == spec
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    streamed = client.completions.create(model="demo-chain", prompt="def add(a, b):", max_tokens=20, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text


def test_stop_strings_cut_the_answer_and_end_it_with_stop(server):
    client = server.client()
    full = client.completions.create(model="demo-chain", prompt="def add(a, b):", max_tokens=20, temperature=0).choices[0].text
    stop = full[6:9]
    cut = client.completions.create(model="demo-chain", prompt="def add(a, b):", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="demo-chain", prompt="def add(a, b):", max_tokens=20, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_sixteen_concurrent_requests_are_all_correct(server):
    client = server.client()
    want = [server.decoder.generate(q, max_new_tokens=16).text for q in QUESTIONS]

    def ask(question):
        return client.completions.create(model="demo-chain", prompt=question, max_tokens=16, temperature=0).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, QUESTIONS))
    assert got == want
    server.wait_for(lambda health: health["running"] == 0 and health["queued"] == 0)


def test_sampling_with_a_seed_repeats_and_other_seeds_differ(server):
    client = server.client()
    ask = lambda seed: client.completions.create(model="demo-chain", prompt="import os", max_tokens=16,  # noqa: E731
                                                 temperature=1.0, seed=seed).choices[0].text
    assert ask(5) == ask(5)
    assert len({ask(seed) for seed in range(4)}) > 1


def test_a_client_that_disconnects_frees_its_row(small):
    import http.client

    connection = http.client.HTTPConnection(small.url.removeprefix("http://"), timeout=30)
    body = {"model": "demo-chain", "prompt": "def add(a, b):", "max_tokens": 1500, "stream": True, "temperature": 0}
    connection.request("POST", "/v1/completions", json.dumps(body), {"Authorization": "Bearer secret",
                                                                       "Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")  # decoding in the only row
    small.wait_for(lambda health: health["running"] == 1)
    connection.close()  # leave mid-answer
    small.wait_for(lambda health: health["running"] == 0)
    answer = small.client("secret").completions.create(model="demo-chain", prompt="import os", max_tokens=4)
    assert answer.usage.completion_tokens == 4  # the freed row serves the next request


BAD = [
    ("malformed JSON", "/v1/chat/completions", b'{"model": "demo-chain", "messages": [', 400, "invalid_json"),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "hi"}, 404, "model_not_found"),
    ("negative max_tokens", "/v1/completions", {"prompt": "hi", "max_tokens": -3}, 422, None),
    ("n = 2", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, 422, None),
    ("prompt beyond the context", "/v1/completions", {"prompt": "hi " * 3000}, 400, "context_length_exceeded"),
    ("max_tokens beyond the context", "/v1/completions", {"prompt": "hi", "max_tokens": 5000}, 400, "context_length_exceeded"),
    ("no messages", "/v1/chat/completions", {"model": "demo-chain"}, 422, None),
    ("a 10 MB body", "/v1/completions", b'{"prompt": "' + b"x" * 10_000_000 + b'"}', 413, "request_too_large"),
    ("no route", "/v1/embeddings", {"input": "hi"}, 404, "not_found"),
]


@pytest.mark.parametrize("label, path, body, status, code", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_their_status_and_the_server_stays_healthy(label, path, body, status, code, server):
    got, answer, _ = server.request(path, body)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "code", "param"} and error["message"] and "Traceback" not in error["message"]
    if code is not None:
        assert error["code"] == code
    server.healthy()
    assert server.client().completions.create(model="demo-chain", prompt="import os", max_tokens=2).usage.completion_tokens == 2


def test_the_api_key_is_required_and_compared(small):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "secret"}):
        status, answer, _ = small.request("/v1/models", None, headers)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        small.client("wrong").models.list()
    assert [m.id for m in small.client("secret").models.list()] == ["demo-chain"]
    assert small.request("/health")[0] == 200 and small.request("/metrics")[0] == 200  # open without a key


def test_a_full_queue_answers_503_with_retry_after(small):
    import http.client

    connection = http.client.HTTPConnection(small.url.removeprefix("http://"), timeout=60)
    body = {"prompt": "def add(a, b):", "max_tokens": 1500, "stream": True}
    connection.request("POST", "/v1/completions", json.dumps(body), {"Authorization": "Bearer secret"})
    assert connection.getresponse().readline().startswith(b"data: ")  # the only row is busy
    waiting = threading.Thread(target=small.request, args=("/v1/completions", {"prompt": "import os", "max_tokens": 2},
                                                           {"Authorization": "Bearer secret"}))
    waiting.start()
    small.wait_for(lambda health: health["queued"] == 1)  # the queue of one is full
    status, answer, headers = small.request("/v1/completions", {"prompt": "hi", "max_tokens": 2}, {"Authorization": "Bearer secret"})
    assert status == 503 and answer["error"]["code"] == "queue_full" and headers["Retry-After"] == "1"
    connection.close()
    waiting.join(60)
    small.wait_for(lambda health: health["running"] == 0 and health["queued"] == 0)


def test_a_request_past_the_time_limit_is_stopped_with_504(config_path):
    server = Server(config_path, timeout=0.3)
    try:
        status, answer, _ = server.request("/v1/completions", {"prompt": "def add(a, b):", "max_tokens": 1900})
        assert status == 504 and answer["error"]["code"] == "timeout"
        server.wait_for(lambda health: health["running"] == 0)
        assert server.client().completions.create(model="demo-chain", prompt="import os", max_tokens=2).usage.completion_tokens == 2
    finally:
        server.stop()


def test_metrics_count_requests_tokens_and_speculation(server):
    server.client().completions.create(model="demo-chain", prompt="class Stack:", max_tokens=16, temperature=0)
    status = urllib.request.urlopen(server.url + "/metrics").read().decode()
    values = {}
    for line in status.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values['specdec_requests_total{endpoint="completions",status="200"}'] >= 1
    assert values["specdec_generation_tokens_total"] >= 16 and values["specdec_prompt_tokens_total"] > 0
    assert values["specdec_draft_tokens_total"] >= values["specdec_accepted_tokens_total"] > 0
    assert values['specdec_draft_position_reached_total{position="1"}'] >= values['specdec_draft_position_accepted_total{position="1"}'] > 0
    assert values["specdec_batch_rows"] == 4 and "specdec_queue_depth" in values
    assert values["specdec_batch_step_seconds_count"] > 0 and values["specdec_time_to_first_token_seconds_count"] > 0
    assert 0 < values["specdec_target_forward_seconds_sum"] <= values["specdec_batch_step_seconds_sum"]


def test_sigterm_stops_the_server_gracefully(config_path, tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "specdec", "serve", str(config_path), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "SPECDEC_API_KEY": ""})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status == 200:
                    break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, process.stderr.read() if process.poll() is not None else "no start"
                time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        assert "Traceback" not in process.stderr.read()
    finally:
        process.kill()


def test_serve_refuses_a_bad_config_in_one_line(capsys, tmp_path):
    from test_cli import run_cli

    code, _, err = run_cli(capsys, "serve", str(tmp_path / "missing.yaml"))
    assert code == 1 and err.count("\n") == 1 and "missing.yaml" in err


def test_bench_server_loads_a_running_server_at_each_concurrency(server, capsys, tmp_path):
    from test_cli import run_cli

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"question_id": str(i), "category": "c", "turns": [q]}) + "\n"
                               for i, q in enumerate(QUESTIONS[:6])))
    code, out, err = run_cli(capsys, "bench", "--server", server.url, "--concurrency", "1,3", "--prompts", str(prompts),
                             "--max-new-tokens", "8", "--out", str(tmp_path / "b"))
    assert code == 0, err
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["model"] == "demo-chain" and [r["concurrency"] for r in report["runs"]] == [1, 3]
    for run in report["runs"]:
        assert run["requests"] == 6 and run["errors"] == 0 and run["tokens_per_second"] > 0
        assert 1.0 <= run["tau"] <= 5.0 and run["first_token_p50_ms"] > 0
    code, _, err = run_cli(capsys, "bench", "--server", "http://127.0.0.1:9", "--prompts", str(prompts))
    assert code == 1 and "cannot reach the server" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "bench")
    assert code == 2 and "--server URL" in err
