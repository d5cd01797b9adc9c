"""Per-step statistics and their aggregate over one generation.

tau (mean accepted length) = mean tokens emitted per verification forward, bonus included,
before truncation by max_new_tokens / EOS / stop strings (what Spec-Bench calls mean accepted
tokens). Acceptance at depth d = share of steps whose tree reached depth d that accepted a token
at depth d.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class StepStats:
    drafted_nodes: int  # draft tree nodes excluding the root
    tree_depth: int
    accepted: int  # accepted draft tokens (the bonus is not counted)
    draft_forwards: int
    draft_seconds: float  # proposing: draft forwards and tree building
    verify_seconds: float  # the target forward and the verification walk
    other_seconds: float  # commits, stop checks, bookkeeping
    draft_forward_seconds: float = 0.0  # inside the draft model's forwards
    target_forward_seconds: float = 0.0  # inside the target model's forward
    dag_nodes: int = 0  # distinct draft nodes drafted (< drafted_nodes when a DAG was unrolled)
    merged_hits: int = 0  # accepted tokens reached through a merged DAG edge


@dataclass
class GenerationMetrics:
    new_tokens: int = 0
    target_forwards: int = 0  # prefill included
    draft_forwards: int = 0
    steps: int = 0
    accepted_tokens: int = 0
    drafted_nodes: int = 0
    dag_nodes: int = 0
    merged_hits: int = 0
    prefill_seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    other_seconds: float = 0.0
    draft_forward_seconds: float = 0.0
    target_forward_seconds: float = 0.0
    total_seconds: float = 0.0
    reached_depth: list[int] = field(default_factory=list)  # [d-1]: steps whose tree reached depth d
    accepted_depth: list[int] = field(default_factory=list)  # [d-1]: steps that accepted depth d

    def add(self, step: StepStats) -> None:
        self.steps += 1
        self.target_forwards += 1
        self.draft_forwards += step.draft_forwards
        self.accepted_tokens += step.accepted
        self.drafted_nodes += step.drafted_nodes
        self.dag_nodes += step.dag_nodes
        self.merged_hits += step.merged_hits
        self.draft_seconds += step.draft_seconds
        self.verify_seconds += step.verify_seconds
        self.other_seconds += step.other_seconds
        self.draft_forward_seconds += step.draft_forward_seconds
        self.target_forward_seconds += step.target_forward_seconds
        _grow(self.reached_depth, step.tree_depth)
        _grow(self.accepted_depth, step.tree_depth)
        for depth in range(step.tree_depth):
            self.reached_depth[depth] += 1
        for depth in range(step.accepted):
            self.accepted_depth[depth] += 1

    @property
    def mean_accepted_length(self) -> float:
        return (self.accepted_tokens + self.steps) / self.steps if self.steps else 0.0

    @property
    def step_seconds(self) -> float:
        return self.draft_seconds + self.verify_seconds + self.other_seconds

    @property
    def outside_forward_share(self) -> float:
        """Share of step time spent outside model forwards (tree building, masks, verification,
        commits, bookkeeping)."""
        inside = self.draft_forward_seconds + self.target_forward_seconds
        return 1.0 - inside / self.step_seconds if self.step_seconds > 0 else 0.0

    @property
    def merged_share(self) -> float:
        """Share of accepted tokens that came through merged DAG nodes (GSD)."""
        return self.merged_hits / self.accepted_tokens if self.accepted_tokens else 0.0

    @property
    def acceptance_by_depth(self) -> list[float]:
        return [a / r if r else 0.0 for a, r in zip(self.accepted_depth, self.reached_depth)]

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_seconds if self.total_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(
            mean_accepted_length=self.mean_accepted_length,
            acceptance_by_depth=self.acceptance_by_depth,
            merged_share=self.merged_share,
            outside_forward_share=self.outside_forward_share,
            tokens_per_second=self.tokens_per_second,
        )
        return out


def _grow(counts: list[int], size: int) -> None:
    counts.extend([0] * (size - len(counts)))
