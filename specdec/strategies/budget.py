"""`auto` draft budgets: grow a draft tree only while the step's expected tokens per second improve.

Costs come from a calibration on the actual device (specdec/costs.py): the target forward of n
nodes and the draft forwards made so far. Acceptance is estimated per node from its raw value
(the draft probability of its token given its parent; 1 for a lookup match) by a line fitted per
(source, depth) to what verification accepted at that depth over recent steps (`Fit`), so the
estimate starts from the draft's probability and follows what verification really accepts, for
a draft that is underconfident or overconfident alike. A node's estimate is the product of its
path's conditional estimates.

A step is expected to emit 1 + the sum of its nodes' estimates; a node joins only when that
divided by the step's cost rises. When a drafted step ends with no node worth adding, drafting is
skipped (plain `ar` steps) for a doubling number of steps, then probed again; a sequence decoding
alone skips nothing while its drafted steps pay, or before any while a first node of the draft's
recent top probability would pay (a start that found nothing tells of that one position: skipping,
the demo pair's chain `auto` ran 18% more steps at B = 1).

Example (t_target: 1 node 30 ms, 2 nodes 32 ms; the draft start 4 ms; estimate 0.6): without the
node 1 / 34 ms = 29 tok/s, with it 1.6 / 36 ms = 44 tok/s, above plain decoding's 1 / 30 ms = 33
tok/s: the node joins.

In a batch (specdec/batch.py) the rate is the whole batch's: B rows step in one target forward of
t(B, N) seconds (the measured surface; N the largest row's tree, as trees are padded), every row
emits at least one token, and the rows that have begun the step (`Load`) count their trees so far.
The rows' i-th draft forwards run as one call (specdec/lockstep.py), so the step's draft time is,
per round, one batched draft forward of the rows in it (the draft's own measured surface; an
EAGLE-3 head's single forward): a row joining a round that runs anyway adds only what one more row
costs. A row's node joins only when it raises the batch's tokens per second, so speculation
shrinks as B grows and t(B, N) steepens, stops where no node pays, and returns as the batch
drains.

The rows plan jointly. Rows plan one after another (in lockstep, each up to its next draft
forward), so a row deciding a node assumes that its peers, the rows still planning with trees no
larger (and, in its first round, the rows yet to begin the step), add the same node and feed the
same round. Without this the first row would price a round's whole draft forward against its own
node alone, and no row would start drafting where all of them together gain.

Example (4 rows, t(4, 1) 12 ms, t(4, 2) 14 ms, a draft round of 4 rows 2 ms, a first node of
0.7): the first row alone, 4.7 / 16 ms = 294 tok/s, below plain decoding's 4 / 12 ms = 333; with
its 3 peers, 6.8 / 16 ms = 425 tok/s: it drafts, and so do the others.

Planned jointly, the rows may still lose together (a row's peers need not add what it assumed):
after each step `Load.settle` weighs its real rate against recent plain steps of the batch's size
(`CostModel.record`), and the rows that drafted back off while the drafted steps run below them.
A sequence decoding alone keeps the same record of one row (`Planner.settle`): the cost model can
be wrong where it cannot see (the real pair's draft, priced as paying, emitted 1.40 tokens per
drafted step in 32 ms against plain steps' 1 in 21 ms).

The start forward is priced at the entries a drafting sequence feeds each step (at most
`STEADY_LAG`: an unfed leaf and the root); the catch-up of a longer lag after skipped steps, or the
first prefill, is paid once and serves the steps after it. Not so a sequence's first start (the
draft's prefill over the whole prompt) while the decoder's drafted steps of this batch size have
run below plain decoding (`costs.payoff`, learned by `Load.settle`): there the prefill serves steps
that lose, so the first start must pay for the whole lag, and a new sequence does not pay the
prefill and first probes of a draft that has not been paying. A step in a batch starts drafting
when a first node of the draft's recent top probability would pay; otherwise it backs off, and
probes once the backoff is full if a sure first node could pay for catching the draft up over the
whole lag (a probe that finds nothing has paid that catch-up for nothing), unless drafted steps of
its batch size have been losing: their record already tells, and is forgotten in time (the demo
pair's rows at B = 16, each probing every 33 steps, spent 2 to 4% of the steps on probes that
lost). A sequence decoding alone
(or the last row of a batch) starts unless even a sure first node could not pay: its start forward
is its own, and the real probabilities it shows decide better than the recent mean (gated on the
mean, the demo pair's chain `auto` ran 5% more target forwards at B = 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import PlainValidator

from specdec.costs import CostModel, Pooled
from specdec.metrics import StepStats
from specdec.strategies.acceptance import Fit
from specdec.tree import DraftTree, Verdict


def Budget(high: int):  # noqa: N802 (a type)
    """An options field type: a count in 1..high, or "auto"."""

    def check(value):
        if value == "auto" or (type(value) is int and 1 <= value <= high):
            return value
        raise ValueError(f"expected a whole number from 1 to {high}, or auto")

    return Annotated[int | Literal["auto"], PlainValidator(check)]


DEPTHS = 8  # depths beyond this share one fit
PRIOR = {"draft": 1.0, "lookup": 0.5}  # acceptance over draft probability before any step
MAX_BACKOFF = 32
STEADY_LAG = 2  # entries a drafting sequence's start feeds each step: an unfed accepted leaf and the root


@dataclass
class Load:
    """One batched step so far: `rows` sequences share the target forward, their caches about
    `context` entries long (the mean: the batch's forwards are costed there). The planners of the
    rows that have `begun` the step hold their trees so far (`nodes`, `expected`), those in
    `ended` are done proposing (or drafted nothing), those `waiting` have not begun it;
    `rounds[i]` holds the draft queries of each row (by planner) in the step's i-th draft round,
    whose forwards run as one call. `seconds` keeps the step's cost lookups (`Planner._batched`)."""

    rows: int
    context: float = 0.0
    rounds: list[dict[Planner, int]] = field(default_factory=list)
    waiting: set[Planner] = field(default_factory=set)
    begun: set[Planner] = field(default_factory=set)
    ended: set[Planner] = field(default_factory=set)
    seconds: dict[tuple[str, int, int], float] = field(default_factory=dict)

    def settle(self, costs: CostModel, tokens: int, seconds: float, nodes: int) -> None:
        """After the step, which emitted `tokens` in `seconds` with trees of up to `nodes` nodes:
        each row decided on its peers adding what it added, so together they may have lost. The
        step joins the records of this many rows (`CostModel.record`), less the catch-ups the
        rows' starts fed beyond a steady one (each row's own forward: they serve the steps after
        it); while drafted steps run below plain ones every row that drafted nodes backs off as if
        it had found nothing (a row that found none has backed off already), else it drafts the
        next step (`Planner.follow`)."""
        if nodes and not any(planner.rounds for planner in self.begun):  # lookup nodes only: no draft forward
            return
        seconds = max(seconds - sum(planner.catch_up for planner in self.begun), 1e-9)
        payoff = costs.record(self.rows, self.context, tokens, seconds, drafted=any(self.rounds))
        for planner in self.begun:
            if payoff is not None and planner.rounds and planner.nodes:
                planner.follow(payoff)


class Planner:
    """Per-strategy state of `auto`: acceptance fits, the current step's budget, the backoff.
    `load` is the batch's step when the sequence decodes in a batch (None: alone)."""

    def __init__(self, costs: CostModel):
        self.costs = costs
        self.load: Load | None = None
        self.reset()

    def reset(self) -> None:
        self.fits: dict[tuple[str, int], Fit] = {}
        self.skip, self.backoff, self.backoff_rows = 0, 1, 1
        self.fed = False  # whether this sequence's draft has started (its prompt prefilled)
        self.top_prob = 0.5  # recent mean of the best draft probability at an opened node

    # -- one step ------------------------------------------------------------------------------
    def should_draft(self) -> bool:
        """False while backing off after a step that found nothing worth drafting, unless the
        batch has shrunk since (fewer rows: nodes may pay again)."""
        if self._shrunk():
            self.skip, self.backoff = 0, 1
        if self.skip > 0:
            self.skip -= 1
            return False
        return True

    @property
    def may_draft(self) -> bool:
        """Whether `should_draft` would let this step draft (asked of a row yet to begin)."""
        return self.skip == 0 or self._shrunk()

    @property
    def alone(self) -> bool:
        """Decoding alone, or as the only row of a batch's step: no peers plan with it."""
        return self.load is None or self.load.rows == 1

    def _shrunk(self) -> bool:
        return self.load is not None and self.load.rows < self.backoff_rows

    def begin(self, context: int) -> None:
        """Start a step at cache length `context` (`draft_forward` then counts its draft forwards)."""
        self.context, self.nodes, self.expected = context, 0, 1.0
        self.rounds: list[int] = []  # queries of each of this step's draft forwards
        self.spent = 0.0  # their seconds, each as one sequence's forward
        self.catch_up = 0.0  # calibrated seconds of the start's feed beyond a steady one (it serves later steps)
        if self.load is not None:
            self.load.waiting.discard(self)
            self.load.begun.add(self)

    def start(self, context: int, lag: int) -> bool:
        """Begin a step at cache length `context` with the draft `lag` entries behind -> whether
        to draft: when a first node of the draft's recent top probability (calibrated at depth 1;
        alone, of probability 1) would pay for the start forward. Otherwise back off (skip a
        doubling number of steps) without a forward; once the backoff is full, probe if a sure
        first node (draft probability 1) could pay for a start forward over the whole lag (after
        skipped steps, or the draft's first prefill), so that no forward is spent on a probe that
        cannot pay (in a full batch, the usual case), and if drafted steps of this batch size have
        not been losing (while they have, the record's forget rule decides when to try again:
        `CostModel.record`). The start forward shows the draft's real
        confidence, and the nodes decide. A start that drafts is counted as `STEADY_LAG` entries
        at most: its catch-up serves the steps after it; a first start while drafted steps of this
        batch size have been losing is priced at the whole lag (`_losing`)."""
        self.begin(context)
        if not self.should_draft():
            return self._decline()
        feed = min(lag, STEADY_LAG)
        priced = lag if not self.fed and self._losing() else feed
        sure = self.conditional("draft", 1, 1.0)
        if not self.pays(sure if self.alone else self.prospect(1.0, 0), feed_queries=priced):
            if self.backoff < MAX_BACKOFF or self._losing() or not self.pays(sure, feed_queries=lag):
                self._back_off()
                return self._decline()
        self.fed = True
        self.draft_forward(feed)
        if lag > feed:
            self.catch_up = self.costs.draft_seconds(lag, context) - self.costs.draft_seconds(feed, context)
        return True

    def _losing(self) -> bool:
        """Whether the decoder's recent drafted steps of this many rows (alone: of one) have run
        below plain decoding (`CostModel.record`'s payoff)."""
        payoff = self._record()
        return payoff is not None and payoff.value < 1.0

    def _record(self) -> Pooled | None:
        """The record of recent drafted steps of this many rows (alone: of one), if any."""
        payoff = self.costs.payoff.get(1 if self.load is None else self.load.rows)
        return payoff if payoff is not None and payoff.seen else None

    def _decline(self) -> bool:
        """This step drafts nothing: no peer of the rows still planning -> False."""
        if self.load is not None:
            self.load.ended.add(self)
        return False

    @property
    def draft_seconds(self) -> float:
        return self._draft_seconds()

    def draft_forward(self, queries: int) -> None:
        self.rounds.append(queries)
        self.spent += self.costs.draft_seconds(queries, self.context)  # alone: the calibration as it is
        if self.load is not None:  # this row joins the batch's round
            if len(self.rounds) > len(self.load.rounds):
                self.load.rounds.append({})
            self.load.rounds[len(self.rounds) - 1][self] = queries

    def _draft_seconds(self, feed: int = 0, own: bool = True, peers: int = 0) -> float:
        """The step's draft seconds with this sequence's draft forwards so far (none if not
        `own`) and one more of `feed` queries (if any), which `peers` more rows join: alone,
        their sum; in a batch, per round one forward of the rows in it, padded to the largest
        query, each row's forward adding the host's work around it (`CostModel.host`, learned
        by batches)."""
        if self.load is None:  # the common path, constant time; what batches learn stays out of it
            return (self.spent if own else 0.0) + (self.costs.draft_seconds(feed, self.context) if feed else 0.0)
        mine = (self.rounds + [feed] if feed else self.rounds) if own else []
        seconds = 0.0
        for i in range(max(len(mine), len(self.load.rounds))):
            queries = [q for row, q in self.load.rounds[i].items() if row is not self] if i < len(self.load.rounds) else []
            queries += mine[i : i + 1]
            if feed and own and i == len(self.rounds):
                queries += [feed] * peers
            if queries:
                seconds += self._batched("draft", max(queries), len(queries)) + self.costs.host.value * len(queries)
        return seconds

    def _batched(self, model: str, queries: int, rows: int) -> float:
        """Seconds of one batched forward of the target or the draft (`model`) of `rows` rows of
        `queries` entries, at the batch's context; looked up once per step (planning a step asks
        for the same few sizes many times)."""
        key = (model, queries, rows)
        if key not in self.load.seconds:
            lookup = self.costs.target_seconds if model == "target" else self.costs.draft_seconds
            self.load.seconds[key] = lookup(queries, self.load.context, rows=rows)
        return self.load.seconds[key]

    def _rate(self, nodes: int, expected: float, draft_seconds: float, gained: float = 0.0,
              others: tuple[float, int] | None = None) -> float:
        """Expected tokens per second of the step (of the whole batch, in a batch) if this
        sequence drafts `nodes` nodes expected to yield `expected` tokens, its peers gain
        `gained` tokens with trees no larger, and the step's draft takes `draft_seconds`
        (`others`: `_others()`, when the caller has it already)."""
        if self.load is None:
            return expected / (draft_seconds + self.costs.target_seconds(nodes + 1, self.context))
        tokens, largest = others or self._others()
        target = self._batched("target", max(nodes, largest) + 1, self.load.rows)  # trees padded to the largest
        return (tokens + expected + gained) / (draft_seconds + target + self.costs.overhead.value * self.load.rows)

    def _others(self) -> tuple[float, int]:
        """In a batch: (the tokens the other rows are expected to emit, their largest tree so far)."""
        others = [planner for planner in self.load.begun if planner is not self]
        tokens = self.load.rows - 1 - len(others) + sum(planner.expected for planner in others)
        return tokens, max((planner.nodes for planner in others), default=0)

    def peers(self, feed: bool) -> tuple[int, int]:
        """-> (rows assumed to add the same node as this one, how many of them join the draft
        round that feeds it, if it needs one): the rows still planning with trees no larger, and
        in its first round the rows yet to begin the step that are not backing off."""
        load = self.load
        if load is None:
            return 0, 0
        stage = len(self.rounds)
        fed = load.rounds[stage] if stage < len(load.rounds) else {}
        planning = [p for p in load.begun if p is not self and p not in load.ended and p.nodes <= self.nodes]
        count, feeding = len(planning), sum(p not in fed for p in planning)
        if stage == 0:
            waiting = sum(p.may_draft for p in load.waiting)
            count, feeding = count + waiting, feeding + waiting
        return count, feeding if feed else 0

    def pays(self, estimate: float, feed_queries: int = 0) -> bool:
        """Whether one more node of this estimate (after a draft forward of `feed_queries`
        entries, when its parent must be fed first), added by this sequence and by its peers,
        raises the step's expected rate above both the rate so far and plain decoding's (no
        draft forward of this sequence at all), so a draft that costs more than it saves is
        given up."""
        count, feeding = self.peers(feed_queries > 0)
        others = self._others() if self.load is not None else None
        drafted = self._draft_seconds(feed_queries, peers=feeding)
        grown = self._rate(self.nodes + 1, self.expected + estimate, drafted, count * estimate, others)
        so_far = self._rate(self.nodes, self.expected, self._draft_seconds(), others=others)
        return grown > max(so_far, self._rate(0, 1.0, self._draft_seconds(own=False), others=others))

    def add(self, estimate: float) -> None:
        self.nodes += 1
        self.expected += estimate

    def conditional(self, source: str, depth: int, raw: float) -> float:
        """Estimated acceptance of a node given its parent's, from its raw value: the fit at its
        source and depth (before any step, PRIOR[source] x raw value)."""
        fit = self.fits.get((source, min(depth, DEPTHS)))
        return fit.at(raw) if fit is not None else min(1.0, PRIOR[source] * raw)

    def opened(self, top_prob: float) -> None:
        self.top_prob = 0.9 * self.top_prob + 0.1 * top_prob

    def prospect(self, estimate: float, depth: int) -> float:
        """Expected estimate of the best child of a node not fed yet (its draft probabilities
        unknown): the recent best draft probability, calibrated at the child's depth."""
        return estimate * self.conditional("draft", depth + 1, self.top_prob)

    def end(self) -> None:
        """After proposing: this tree is final for the batch's step. When nothing paid, back off,
        unless alone (or the only row of the step) while drafting pays (`_promising`); when a
        node paid alone, the backoff starts over unless drafted steps have been losing (then a
        node found by a probe does not undo the backoff: the record decides, `follow`)."""
        if self.load is not None:
            self.load.ended.add(self)
        if self.nodes == 0:
            if not (self.alone and self._promising()):
                self._back_off()
        elif self.alone and not self._losing():
            self.backoff = 1

    def _promising(self) -> bool:
        """Whether drafting every step pays: then a start that found nothing tells of its own
        position only, and the next step starts again. The record of drafted steps against plain
        ones tells (its drafted steps include such starts); before any, whether a first node of
        the draft's recent top probability (calibrated at depth 1) would pay for a steady start
        forward."""
        record = self._record()
        if record is not None:
            return record.value >= 1.0
        start = self.costs.draft_seconds(STEADY_LAG, self.context)
        return self._rate(1, 1.0 + self.prospect(1.0, 0), start) > self._rate(0, 1.0, 0.0)

    def follow(self, payoff: Pooled) -> None:
        """After a step in which this sequence drafted nodes: draft the next step while drafted
        steps of its batch size (`payoff`) beat plain ones, else back off."""
        if payoff.value >= 1.0:
            self.backoff = 1
        else:
            self._back_off()

    def settle(self, stats: StepStats, context: int) -> None:
        """Decoding alone, after a step (`stats`) at cache length `context`: the step joins the
        records of one row (`CostModel.record`), less the catch-up its start fed beyond a steady
        one, and a step that drafted nodes follows them (`follow`), as a batch's rows do
        (`Load.settle`)."""
        drafted = stats.draft_forwards > 0
        if stats.drafted_nodes and not drafted:  # lookup nodes only: no draft forward
            return
        seconds = stats.draft_seconds + stats.verify_seconds + stats.other_seconds - (self.catch_up if drafted else 0.0)
        payoff = self.costs.record(1, context, stats.accepted + 1, max(seconds, 1e-9), drafted)
        if payoff is not None and stats.drafted_nodes:
            self.follow(payoff)

    def _back_off(self) -> None:
        """Skip drafting for the next `backoff` steps; double the backoff, up to the cap."""
        self.skip, self.backoff = self.backoff, min(2 * self.backoff, MAX_BACKOFF)
        self.backoff_rows = self.load.rows if self.load is not None else 1

    # -- after verification --------------------------------------------------------------------
    def observe(self, tree: DraftTree, verdict: Verdict, raw: list[float], source: list[str]) -> None:
        """Update the fits: at each depth the accepted path reached, each child of the accepted
        parent is one point (its raw value, 1 if it was accepted else 0) of its source's fit."""
        for fit in self.fits.values():
            fit.decay()
        children = tree.children()
        for depth, parent in enumerate(verdict.path, start=1):
            kids = children[parent]
            if not kids:
                break
            accepted = verdict.path[depth] if depth < len(verdict.path) else None
            for kid in kids:
                key = (source[kid], min(depth, DEPTHS))
                if key not in self.fits:
                    self.fits[key] = Fit(PRIOR[source[kid]])
                self.fits[key].add(raw[kid], 1.0 if kid == accepted else 0.0)

