"""OpenAI's request fields to a decoder's generation settings, and its response and chunk objects.

Fields read: model, messages (chat) or prompt (completions), max_tokens / max_completion_tokens,
temperature, top_p, top_k (an extension), seed, stop, n (1 only), stream, stream_options.
Any other field is accepted and ignored, as OpenAI's clients send more than a server reads.
An omitted field takes the config's `generation` value, except seed: a fresh one per request.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from specdec.metrics import GenerationMetrics


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "code", "param"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 422: "invalid_request_error", 500: "server_error", 503: "server_error",
             504: "server_error"}

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "code": self.code, "param": self.param}}


@dataclass
class Parsed:
    chat: bool
    prompt: str | list[int] | None  # completions
    messages: list[dict] | None  # chat
    generation: dict  # the decoder's generation overrides
    fit_context: bool  # max tokens not given: as many as the config's default and the context allow
    stream: bool
    include_usage: bool


def parse(body: object, chat: bool, model: str) -> Parsed:
    """Check a request body -> Parsed, or raise ApiError (422 for a bad value, 404 for a model
    this server does not serve)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if body.get("model") not in (None, model):
        raise ApiError(404, f"the model {body['model']!r} does not exist; this server serves {model!r}", "model_not_found", "model")
    if body.get("n", 1) != 1:
        raise ApiError(422, f"n must be 1: this server returns one choice per request, not {body['n']!r}", param="n")
    generation: dict = {"seed": secrets.randbits(31)}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        generation["max_new_tokens"] = _number(max_tokens, "max_tokens", int, low=1)
    if body.get("temperature") is not None:
        generation["temperature"] = _number(body["temperature"], "temperature", float, low=0.0)
    if body.get("top_p") is not None:
        generation["top_p"] = _number(body["top_p"], "top_p", float, low=0.0, high=1.0, open_low=True)
    if body.get("top_k") is not None:
        generation["top_k"] = max(0, _number(body["top_k"], "top_k", int, low=-1))  # -1 (vLLM) and 0: off
    if body.get("seed") is not None:
        generation["seed"] = _number(body["seed"], "seed", int)
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise ApiError(422, "stop must be a string or a list of non-empty strings", param="stop")
        generation["stop"] = stop
    stream = body.get("stream") or False
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise ApiError(422, "stream must be true or false, and stream_options an object", param="stream")
    prompt, messages = (None, _messages(body.get("messages"))) if chat else (_prompt(body.get("prompt")), None)
    return Parsed(chat, prompt, messages, generation, max_tokens is None, stream, bool(options.get("include_usage")))


def _number(value, name: str, kind: type, low=None, high=None, open_low: bool = False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or float(value).is_integer())
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bounds = f" from {low}" if low is not None else ""
        bounds += f" to {high}" if high is not None else ""
        raise ApiError(422, f"{name} must be {'a whole number' if kind is int else 'a number'}{bounds}, not {value!r}", param=name)
    return kind(value)


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(422, 'messages must be a non-empty list of {"role": ..., "content": ...} objects', param="messages")
    out = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts: only text is read
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise ApiError(422, 'each message must be {"role": "...", "content": "..."}', param="messages")
        out.append({"role": m["role"], "content": content})
    return out


def _prompt(prompt) -> str | list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise ApiError(422, "prompt must be a non-empty string or list of token ids (one prompt per request)", param="prompt")


# -- responses -------------------------------------------------------------------------------------

class Text:
    """The answer's text as tokens arrive: decoded whole each time (a token can carry part of a
    character), cut before the first stop string, and held back while it may still be the start
    of one, so streamed deltas never show text the final answer does not."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = 0  # characters already handed out

    def add(self, block: list[int]) -> str:
        self.ids.extend(block)
        text = self.full()
        end = len(text) - max((len(s) - 1 for s in self.stop), default=0)
        while end > self.sent and text[end - 1] == "\ufffd":  # an unfinished character
            end -= 1
        return self._take(text, end)

    def rest(self) -> str:
        text = self.full()
        return self._take(text, len(text))

    def full(self) -> str:
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cuts = [text.find(s) for s in self.stop if s in text]
        return text[: min(cuts)] if cuts else text

    def _take(self, text: str, end: int) -> str:
        delta = text[self.sent : max(end, self.sent)]
        self.sent += len(delta)
        return delta


def finish_reason(sequence) -> str:
    """"length" when max_tokens ended the answer, else "stop" (EOS, end of turn or a stop string)."""
    stopper, generated = sequence.stopper, sequence.generated
    ended = generated and (generated[-1] in stopper.eos_token_ids or (stopper.stop and stopper.hits_stop_string(generated)))
    return "length" if len(generated) >= stopper.max_new_tokens and not ended else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def speculative(metrics: GenerationMetrics) -> dict:
    """The `metrics.speculative_decoding` object of a response."""
    return {"speculative_decoding": {
        "draft_tokens": metrics.drafted_nodes,
        "accepted_tokens": metrics.accepted_tokens,
        "steps": metrics.steps,
        "mean_tokens_per_step": round(metrics.mean_accepted_length, 4),
        "acceptance_rate": round(metrics.accepted_tokens / metrics.drafted_nodes, 4) if metrics.drafted_nodes else 0.0,
        "acceptance_by_position": [round(a, 4) for a in metrics.acceptance_by_depth],
        "draft_forwards": metrics.draft_forwards,
    }}


def response(chat: bool, ident: str, created: int, model: str, text: str, reason: str, use: dict, metrics: dict) -> dict:
    choice = {"index": 0, "finish_reason": reason, "logprobs": None}
    choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
    return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": [choice], "usage": use, "metrics": metrics}


def chunk(chat: bool, ident: str, created: int, model: str, text: str | None = None, reason: str | None = None,
          first: bool = False) -> dict:
    """A streamed chunk: a text delta and/or the finish reason (text None: choices left empty,
    the usage chunk)."""
    choices = []
    if text is not None:
        delta = ({"role": "assistant", "content": text} if first else {"content": text}) if chat else None
        choice = {"index": 0, "finish_reason": reason, "logprobs": None}
        choice.update({"delta": delta} if chat else {"text": text})
        choices.append(choice)
    return {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": choices}
