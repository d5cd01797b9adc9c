"""`specdec serve`: an OpenAI-compatible HTTP server on the batched speculative loop.

- `worker.py`: one thread runs the model (specdec/batch.py's `BatchLoop`); requests join and
  leave the batch at step boundaries, and wait in a bounded queue.
- `api.py`: OpenAI request fields to a decoder's generation settings; responses and chunks.
- `metrics.py`: the Prometheus metrics of `GET /metrics`.
- `app.py`: the ASGI app (Starlette): routes, the API key, limits, errors, streaming.
"""
