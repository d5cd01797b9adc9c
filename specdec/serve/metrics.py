"""The Prometheus metrics of `GET /metrics` (prometheus-client), in a registry of the server's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from specdec.metrics import StepStats

POSITIONS = 16  # draft positions counted one by one; deeper ones count as the last


class ServerMetrics:
    def __init__(self, max_batch: int):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("specdec_requests", "Finished requests by endpoint and HTTP status", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("specdec_prompt_tokens", "Prompt tokens of answered requests", registry=r)
        self.generation_tokens = Counter("specdec_generation_tokens", "Generated tokens", registry=r)
        self.steps = Counter("specdec_steps", "Verification steps (one target forward per sequence)", registry=r)
        self.draft_tokens = Counter("specdec_draft_tokens", "Drafted tree nodes verified", registry=r)
        self.accepted_tokens = Counter("specdec_accepted_tokens", "Draft tokens accepted", registry=r)
        self.tokens_per_step = Histogram("specdec_tokens_per_step", "Tokens emitted per step (tau)",
                                         buckets=(1, 2, 3, 4, 5, 6, 8, 12, 16, 32), registry=r)
        self.position_reached = Counter("specdec_draft_position_reached", "Steps whose draft reached this depth",
                                        ["position"], registry=r)
        self.position_accepted = Counter("specdec_draft_position_accepted", "Steps that accepted this depth",
                                         ["position"], registry=r)
        self.queue_depth = Gauge("specdec_queue_depth", "Requests waiting for a batch row", registry=r)
        self.batch_running = Gauge("specdec_batch_running", "Sequences in the batch", registry=r)
        Gauge("specdec_batch_rows", "Rows of the batch (--max-batch)", registry=r).set(max_batch)
        self.batch_step_seconds = Histogram("specdec_batch_step_seconds", "Wall time of one batched step (drafts and target forward)",
                                            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5), registry=r)
        self.target_forward_seconds = Histogram("specdec_target_forward_seconds", "The target's batched forward of one step",
                                                buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5), registry=r)
        self.request_seconds = Histogram("specdec_request_seconds", "Wall time of answered requests",
                                         buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=r)
        self.first_token_seconds = Histogram("specdec_time_to_first_token_seconds", "Time to the first token",
                                             buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)

    def step(self, stats: StepStats) -> None:
        """One sequence's step (called on the worker thread)."""
        self.steps.inc()
        self.draft_tokens.inc(stats.drafted_nodes)
        self.accepted_tokens.inc(stats.accepted)
        self.tokens_per_step.observe(stats.accepted + 1)
        for depth in range(1, min(stats.tree_depth, POSITIONS) + 1):
            self.position_reached.labels(str(depth)).inc()
            if depth <= stats.accepted:
                self.position_accepted.labels(str(depth)).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)
