"""`specdec bench --server URL`: load on a running OpenAI-compatible server (specdec serve, or any
other), and its throughput and latency at each concurrency.

At concurrency C, C clients each send streaming requests one after another until every prompt
(a question's first turn) is answered. Per level:
- tokens/s: all completion tokens (the server's `usage`) over the level's wall time;
- time to first token: from sending a request to its first content chunk;
- inter-token latency: each gap between a request's content chunks, divided evenly over the
  tokens those chunks carry (usage tokens / content chunks); p50 and p99 over all gaps;
- tau: tokens per step, from the `metrics.speculative_decoding` a specdec server adds.
Requests go only to URL.
"""

from __future__ import annotations

import http.client
import json
import statistics
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from specdec.bench.batched import percentile
from specdec.errors import SpecdecError


@dataclass
class Reply:
    first_token: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    tokens: int = 0
    steps: int = 0  # verification steps (specdec servers), 0 when unknown
    accepted: int = 0  # draft tokens accepted in them
    error: str | None = None


class Client:
    def __init__(self, url: str, api_key: str | None):
        parts = urlsplit(url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SpecdecError(f"--server must be an http(s) URL such as http://127.0.0.1:8000, not {url!r}")
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.base = parts.path.removesuffix("/v1")
        self.headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}

    def connection(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=600)

    def model(self) -> str:
        """The first model the server lists (one clear error when it cannot be reached)."""
        connection = self.connection()
        try:
            connection.request("GET", f"{self.base}/v1/models", headers=self.headers)
            response = connection.getresponse()
            body = response.read()
        except OSError as error:
            raise SpecdecError(f"cannot reach the server at {self.scheme}://{self.host}:{self.port}: {error}") from None
        finally:
            connection.close()
        if response.status != 200:
            raise SpecdecError(f"GET /v1/models answered {response.status}: {body[:200].decode(errors='replace')}")
        return json.loads(body)["data"][0]["id"]

    def stream(self, path: str, body: dict) -> Reply:
        reply, start = Reply(), time.perf_counter()
        connection = self.connection()
        try:
            connection.request("POST", f"{self.base}{path}", json.dumps(body), self.headers)
            response = connection.getresponse()
            if response.status != 200:
                reply.error = f"{response.status}: {response.read()[:200].decode(errors='replace')}"
                return reply
            for line in response:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                _read_chunk(json.loads(line[6:]), reply, time.perf_counter() - start)
        except OSError as error:
            reply.error = str(error)
        finally:
            connection.close()
        return reply


def _read_chunk(data: dict, reply: Reply, now: float) -> None:
    if "error" in data:
        reply.error = data["error"].get("message", "error")
    for choice in data.get("choices", []):
        text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
        if text:
            if not reply.chunk_times:
                reply.first_token = now
            reply.chunk_times.append(now)
    if data.get("usage"):
        reply.tokens = data["usage"]["completion_tokens"]
    spec = (data.get("metrics") or {}).get("speculative_decoding")
    if spec:
        reply.steps, reply.accepted = spec["steps"], spec["accepted_tokens"]


def run_server_bench(url: str, api_key: str | None, turns: list[str], chat: bool, max_new_tokens: int,
                     levels: list[int]) -> dict:
    client = Client(url, api_key)
    model = client.model()
    path = "/v1/chat/completions" if chat else "/v1/completions"

    def body(turn: str) -> dict:
        prompt = {"messages": [{"role": "user", "content": turn}]} if chat else {"prompt": turn}
        return {"model": model, **prompt, "max_tokens": max_new_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}

    client.stream(path, body(turns[0]))  # warm-up
    rows = []
    for level in levels:
        replies, pending, lock = [], list(turns), threading.Lock()

        def worker():
            while True:
                with lock:
                    if not pending:
                        return
                    turn = pending.pop(0)
                reply = client.stream(path, body(turn))
                with lock:
                    replies.append(reply)

        start = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(level)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        rows.append(_summary(level, replies, time.perf_counter() - start))
    return {"url": url, "model": model, "settings": {"prompts": len(turns), "chat": chat, "max_new_tokens": max_new_tokens,
                                                       "concurrency": levels}, "runs": rows}


def _summary(level: int, replies: list[Reply], seconds: float) -> dict:
    good = [r for r in replies if r.error is None]
    gaps = []
    for r in good:
        per_chunk = r.tokens / len(r.chunk_times) if r.chunk_times else 1
        gaps += [(b - a) / per_chunk for a, b in zip(r.chunk_times, r.chunk_times[1:]) for _ in range(round(per_chunk) or 1)]
    tokens = sum(r.tokens for r in good)
    steps, accepted = sum(r.steps for r in good), sum(r.accepted for r in good)
    return {
        "concurrency": level, "requests": len(replies), "errors": len(replies) - len(good),
        "first_error": next((r.error for r in replies if r.error), None),
        "tokens_per_second": tokens / seconds, "tau": 1 + accepted / steps if steps else None,
        "first_token_p50_ms": 1e3 * statistics.median([r.first_token for r in good]) if good else 0.0,
        "first_token_p99_ms": 1e3 * percentile([r.first_token for r in good], 0.99),
        "inter_token_p50_ms": 1e3 * percentile(gaps, 0.5), "inter_token_p99_ms": 1e3 * percentile(gaps, 0.99),
    }


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"Server {report['url']}, model {report['model']}: {s['prompts']} prompts{' as chat' if s['chat'] else ''}, "
             f"max_tokens {s['max_new_tokens']}, greedy, streaming", "",
             "| concurrency | requests | errors | tokens/s (all) | tau | first token p50 ms | p99 ms | inter-token p50 ms | p99 ms |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["runs"]:
        tau = f"{r['tau']:.2f}" if r["tau"] else "-"
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['tokens_per_second']:.1f} | {tau} | "
                     f"{r['first_token_p50_ms']:.0f} | {r['first_token_p99_ms']:.0f} | {r['inter_token_p50_ms']:.1f} | "
                     f"{r['inter_token_p99_ms']:.1f} |")
    return "\n".join(lines) + "\n"
