"""Load-aware `auto` budgets in batched decoding (issue 21): the t(B, N) surface is measured,
cached and reused; a row's node joins only when it raises the whole batch's tokens per second, so
speculation stops when the batch is full and returns as it drains; trees stay inside every row's
node cap and context; greedy output is unchanged."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import specdec.batch
import specdec.costs
from helpers import hf_greedy
from specdec.backends.pytorch import PyTorchBackend
from specdec.config import GenerationOptions
from specdec.costs import RECENT_STEPS, CostModel, Curve, Pooled, Surface, load_or_measure_surface, row_counts
from specdec.decode import Sequence
from specdec.decoder import SpeculativeDecoder
from specdec.plugins import get_strategy
from specdec.strategies.budget import Load, Planner
from test_auto_budget import curve

PROMPTS = [[3, 17, 42], [5, 6, 7, 8, 9, 10, 11, 12, 13], [1], [9, 9, 2, 4, 8], [60, 5, 5, 21, 30, 31], [7, 7]]
AUTO = {
    "chain": ("chain", {"k": "auto"}),
    "dyspec": ("dyspec", {"max_nodes": "auto", "node_cap": 6, "max_depth": 4}),
    "hybrid": ("hybrid", {"max_nodes": "auto", "node_cap": 6, "max_depth": 4}),
}


ALONE = CostModel(curve(0.010, 0.010), curve(0.0001, 0.0001))  # one row: nodes free, the draft nearly so
# one row: nodes free; two or more rows: every node of the padded trees costs a whole forward per row
CROWDED = Surface([1, 2, 8], [curve(0.010, 0.010), curve(0.020, 0.040), curve(0.080, 0.160)])
ROOMY = Surface([1, 8], [curve(0.010, 0.010), curve(0.011, 0.011)])  # rows and nodes nearly free


def auto_decoder(target_model, draft_model, label: str, surface: Surface, monkeypatch, learn: bool = False) -> SpeculativeDecoder:
    """A decoder whose `auto` plans from hand-made costs and, unless it should `learn`, learns
    nothing from its steps' wall-clock times (tiny models, not those costs)."""
    name, options = AUTO[label]
    component = get_strategy(name)
    strategy = component.cls(component.cls.Options(**options))
    strategy.set_costs(CostModel(ALONE.target, ALONE.draft))  # its own: each decoder's batches learn into it
    target, draft = PyTorchBackend(target_model), PyTorchBackend(draft_model)
    surfaces = {id(target): surface, id(draft): Surface([1], [ALONE.draft])}  # a batched draft forward: as one row's
    monkeypatch.setattr(specdec.batch, "load_or_measure_surface", lambda spec, backend, rows: surfaces[id(backend)])
    monkeypatch.setattr(CostModel, "observe_step", lambda self, *args, **kwargs: None)  # all costs hand-made: nothing learned
    if not learn:  # nor the record of drafted steps against plain ones
        monkeypatch.setattr(CostModel, "record", lambda self, *args, **kwargs: None)
    return SpeculativeDecoder(target, draft, strategy, GenerationOptions())


def record_plans(monkeypatch) -> list[tuple[int, int]]:
    """(rows in the step, nodes planned) of every step an auto planner began: 0 nodes when it
    did not even start the draft."""
    plans = []
    start, end = Planner.start, Planner.end

    def starting(self, context, lag):
        started = start(self, context, lag)
        if not started:
            plans.append((self.load.rows, 0))
        return started

    def ending(self):
        plans.append((self.load.rows, self.nodes))
        end(self)

    monkeypatch.setattr(Planner, "start", starting)
    monkeypatch.setattr(Planner, "end", ending)
    return plans


@pytest.mark.parametrize("label", list(AUTO))
def test_speculation_stops_when_the_batch_fills_and_returns_as_it_drains(label, models, monkeypatch):
    from specdec.batch import batch_slices, drain

    target = models("llama", 0)
    decoder = auto_decoder(target, target, label, CROWDED, monkeypatch)  # the draft is the target: always right
    plans = record_plans(monkeypatch)
    lengths = [4, 40, 6, 8, 30, 5]  # the two longest prompts start last and outlive the rest: the batch drains to one row
    requests = [decoder.prepare(p, None, {"max_new_tokens": n}) for p, n in zip(PROMPTS, lengths)]
    results = drain(batch_slices(decoder, requests, 3))
    assert [tokens for tokens, _ in results] == [hf_greedy(target, p, n) for p, n in zip(PROMPTS, lengths)]
    crowded = [nodes for rows, nodes in plans if rows >= 2]
    alone = [nodes for rows, nodes in plans if rows == 1]
    assert crowded and all(nodes == 0 for nodes in crowded)  # no node pays for 2+ rows
    assert alone and all(nodes > 0 for nodes in alone)  # one row: every step drafts again, no backoff left over
    assert results[1][1].accepted_tokens > 0  # the last row's steps alone accepted draft tokens


def test_rows_that_never_draft_never_run_the_draft_model(models, monkeypatch):
    """In a batch too full for any node to pay, the draft model is never prefilled nor run: the
    rows finish together, so none ever drafts alone. A row backing off proposes without a
    coroutine (`Lockstep.run`'s `direct`)."""
    from specdec.backends.batched import BatchedPyTorch
    from specdec.lockstep import Lockstep

    target = models("llama", 0)
    decoder = auto_decoder(target, target, "chain", CROWDED, monkeypatch)
    plans = record_plans(monkeypatch)
    calls = []  # (batched model, method): the target and the draft model both run as a BatchedPyTorch
    for name in ("prefill_row", "forward_rows"):
        original = getattr(BatchedPyTorch, name)
        monkeypatch.setattr(BatchedPyTorch, name, lambda self, *a, _o=original, _n=name: (calls.append((self, _n)), _o(self, *a))[1])
    flags, run = [], Lockstep.run
    monkeypatch.setattr(Lockstep, "run", lambda self, tasks, direct=(): (flags.append(list(direct)), run(self, tasks, direct))[1])
    outputs = decoder.generate_batch(PROMPTS[:3], batch_size=3, max_new_tokens=12, ignore_eos=True)
    assert [o.token_ids for o in outputs] == [hf_greedy(target, p, 12) for p in PROMPTS[:3]]
    assert plans and all(rows == 3 and nodes == 0 for rows, nodes in plans)
    assert flags[0] == [False] * 3 and [True] * 3 in flags  # the first step tries; backing off, no coroutines
    assert len({model for model, _ in calls}) == 1  # one batched model ran: the target; the draft's never did
    assert [name for _, name in calls].count("prefill_row") == 3  # the three prompts


def test_rows_plan_jointly_within_the_padded_tree(models, monkeypatch):
    """With free rows and nodes, every row drafts; the batch's padded size is the largest tree."""
    target = models("llama", 0)
    decoder = auto_decoder(target, target, "dyspec", ROOMY, monkeypatch)
    plans = record_plans(monkeypatch)
    outputs = decoder.generate_batch(PROMPTS, batch_size=4, max_new_tokens=24)
    assert [o.token_ids for o in outputs] == [hf_greedy(target, p, 24) for p in PROMPTS]
    full = [nodes for rows, nodes in plans if rows == 4]
    assert full and all(nodes <= 6 for nodes in full)
    assert sum(nodes == 6 for nodes in full) >= 0.8 * len(full)  # the node cap, in every row (but near the end)
    assert min(o.metrics.mean_accepted_length for o in outputs) > 2.0


def test_the_planner_values_the_batch_not_the_row():
    costs = CostModel(curve(0.010, 0.010), None, CROWDED)
    planner = Planner(costs)
    planner.load = Load(rows=1)
    planner.begin(100)
    assert planner.pays(0.5)  # one row: a free node of 0.5 pays
    planner.load = Load(rows=8)
    planner.begin(100)
    assert not planner.pays(0.9)  # 8 rows: the node doubles the forward, for 0.9 of 8 tokens
    # a row planned after one that drafted 3 nodes: the forward is padded to 4 entries already, so
    # its own nodes up to 3 cost nothing more
    planner.load = first_row = Load(rows=2)
    first = Planner(costs)
    first.load = first_row
    first.begin(100)
    for _ in range(3):
        first.add(0.5)
    first.end()
    planner.begin(100)
    for _ in range(3):
        assert planner.pays(0.1)
        planner.add(0.1)
    assert not planner.pays(0.1)
    planner.end()
    assert first_row.begun == first_row.ended == {first, planner}


def test_a_step_costs_its_forwards_at_the_batchs_context_and_looks_each_size_up_once(monkeypatch):
    # t(B, Q) doubles from 100 to 300 cached entries; rows of 100 and 300 entries plan at their
    # mean, 200, and the step asks the cost model for each (model, Q, B) once however often it plans
    by_context = Curve([1, 2], [100, 300], [[0.010, 0.012], [0.020, 0.024]])
    costs = CostModel(by_context, by_context, Surface([1, 2], [by_context, by_context]), Surface([1, 2], [by_context, by_context]))
    asked = []
    lookup = CostModel.target_seconds
    monkeypatch.setattr(CostModel, "target_seconds", lambda self, *a, **k: asked.append(a) or lookup(self, *a, **k))
    load = Load(rows=2, context=200.0)
    planners = [Planner(costs), Planner(costs)]
    for planner, context in zip(planners, (100, 300)):
        planner.load = load
        planner.begin(context)
    plain = planners[0]._rate(0, 1.0, 0.0)
    assert plain == planners[1]._rate(0, 1.0, 0.0) == pytest.approx(2 / 0.015)
    for planner in planners:
        planner.pays(0.5, feed_queries=1)
    assert sorted(set(asked)) == sorted(asked) == [(1, 200.0), (2, 200.0)]  # t(2, 1) and t(2, 2), once each


def test_a_draft_round_another_row_pays_for_costs_a_row_only_its_share():
    """The rows' i-th draft forwards run as one call: a round costs one batched draft forward of
    the rows in it (the draft's surface), so joining a round another row runs costs little."""
    draft_rows = Surface([1, 8], [curve(0.004, 0.004), curve(0.005, 0.005)])
    costs = CostModel(curve(0.010, 0.010), curve(0.004, 0.004), ROOMY, draft_rows)
    load = Load(rows=2)
    other = Planner(costs)
    other.load = load
    other.begin(100)
    other.draft_forward(1)
    other.draft_forward(1)  # the other row drafts two rounds
    riding = Planner(costs)
    riding.load = load
    riding.begin(100)
    alone = Planner(costs)
    alone.load = Load(rows=2)
    alone.begin(100)
    # 2 rows, extra entries nearly free: a node of 0.2 pays for a draft forward only when another
    # row runs that round anyway
    assert riding.pays(0.2, feed_queries=1) and not alone.pays(0.2, feed_queries=1)
    riding.draft_forward(1)
    two, one = draft_rows.at(2, 1, 100), draft_rows.at(1, 1, 100)
    assert load.rounds == [{other: 1, riding: 1}, {other: 1}]
    assert riding.draft_seconds == pytest.approx(two + one)  # the step's draft: 2 rows, then 1
    riding.draft_forward(1)
    riding.draft_forward(4)  # a third round is its own
    assert riding.draft_seconds == pytest.approx(2 * two + draft_rows.at(1, 4, 100))


def test_rows_plan_a_shared_round_jointly():
    """4 rows, t(4, 1) 12 ms, t(4, 2) 14 ms, a draft round 2 ms however many rows join it, a first
    node of 0.5: the first row alone would lower the batch's rate (4.5 / 16 ms < 4 / 12 ms), all
    four together raise it (6 / 16 ms), so each row drafts, counting the rows yet to decide as
    doing the same; a row whose peers all back off plans alone and does not."""
    rows = Surface([1, 4], [curve(0.010, 0.011), curve(0.012, 0.014)])
    draft_rows = Surface([1, 4], [curve(0.002, 0.002), curve(0.002, 0.002)])
    costs = CostModel(curve(0.010, 0.011), curve(0.002, 0.002), rows, draft_rows)
    planners = [Planner(costs) for _ in range(4)]
    load = Load(rows=4, waiting=set(planners))
    for planner in planners:
        planner.load = load
    planners[0].begin(100)
    assert planners[0].peers(feed=True) == (3, 3)  # the rows yet to begin join its first round
    assert all(planner.start(100, 1) for planner in planners)
    assert list(load.rounds[0].values()) == [1, 1, 1, 1] and load.waiting == set()
    assert planners[-1].peers(feed=False) == (3, 0)  # the first nodes, after the round
    planners[0].add(0.5)
    assert planners[1].peers(feed=False) == (2, 0)  # the first row has a larger tree now
    for planner in planners[1:]:
        planner.add(0.5)
        planner.end()
    assert planners[0].peers(feed=True) == (0, 0)  # alone now: it decides exactly

    lonely = [Planner(costs) for _ in range(4)]
    load = Load(rows=4, waiting=set(lonely))
    for planner in lonely:
        planner.load = load
    for planner in lonely[1:]:
        planner._back_off()
    lonely[0].begin(100)
    assert lonely[0].peers(feed=True) == (0, 0) and not lonely[0].start(100, 1)


def test_rows_that_drafted_together_back_off_while_their_steps_run_below_plain_decoding():
    """Each row plans on its peers adding what it adds, so together they can lose. Plain steps of
    2 rows run at 100 tok/s; a drafted step then emits 3 tokens in 40 ms (75 tok/s): its rows
    back off. One of 6 tokens in 40 ms (150 tok/s) lifts the two drafted steps above plain (9
    tokens in 80 ms, which plain decoding takes 90 ms for): they draft the next step. A batch of
    another size keeps its own record (before its plain steps, t(B, 1) stands in)."""
    costs = CostModel(curve(0.010, 0.011), curve(0.002, 0.002))

    def step(tokens: int, seconds: float, rows: int = 2, drafted: bool = True) -> list[Planner]:
        planners = [Planner(costs) for _ in range(rows)]
        load = Load(rows=rows, context=100, waiting=set(planners))
        for planner in planners:
            planner.load = load
            planner.begin(100)
            if drafted:
                planner.draft_forward(1)
                planner.add(0.5)
        load.settle(costs, tokens, seconds, nodes=1 if drafted else 0)
        return planners

    step(2, 0.020, drafted=False)
    assert costs.plain[2].value == pytest.approx(100.0)
    assert all(planner.skip == 1 and planner.backoff == 2 for planner in step(3, 0.040))
    assert costs.payoff[2].value == pytest.approx(0.75)
    assert all(planner.skip == 0 and planner.backoff == 1 for planner in step(6, 0.040))
    assert all(planner.skip == 0 for planner in step(2, 0.010, rows=1))  # 200 tok/s against t(1, 1)'s 100
    assert costs.payoff[1].value == pytest.approx(2.0) and costs.payoff[2].value == pytest.approx(1.125)


def test_a_row_alone_in_its_step_follows_the_record_of_one_row():
    """After plain steps of one row at 100 tok/s, a row alone whose drafted node left its step at
    25 tok/s backs off, as a sequence decoding alone does (`Planner.settle`), and so do two rows
    whose drafted step lost."""
    costs = CostModel(curve(0.010, 0.011), curve(0.002, 0.002))

    def step(tokens: int, seconds: float, rows: int, drafted: bool = True) -> list[Planner]:
        planners = [Planner(costs) for _ in range(rows)]
        load = Load(rows=rows, context=100, waiting=set(planners))
        for planner in planners:
            planner.load, planner.backoff = load, 4  # after steps that found nothing
            planner.begin(100)
            if drafted:
                planner.draft_forward(1)
                planner.add(0.5)
            planner.end()
        load.settle(costs, tokens, seconds, nodes=1 if drafted else 0)
        return planners

    step(1, 0.010, rows=1, drafted=False)
    step(2, 0.020, rows=2, drafted=False)
    (alone,) = step(1, 0.040, rows=1)
    assert costs.payoff[1].value == pytest.approx(0.25) and costs.payoff[1].seen
    assert (alone.skip, alone.backoff) == (1, 2)  # its node had reset the backoff (`end`); the record backs it off
    assert all((planner.skip, planner.backoff) == (4, 8) for planner in step(2, 0.040, rows=2))


def test_drafted_steps_are_weighed_by_their_time_not_by_their_median():
    """Plain steps of 1 row run at 100 tok/s. Three drafted steps accept nothing (1 token in
    12 ms each: 0.83x) and one accepts four (5 tokens in 12 ms: 4.2x): most steps lose, the four
    together gain (8 tokens in 48 ms: 1.67x), so the rows keep drafting."""
    costs = CostModel(curve(0.010, 0.010), curve(0.002, 0.002))
    planner = None
    for tokens, seconds, drafted in [(1, 0.010, False), (1, 0.012, True), (5, 0.012, True), (1, 0.012, True), (1, 0.012, True)]:
        planner = Planner(costs)
        planner.load = Load(rows=1, context=100, waiting={planner})
        if drafted:
            assert planner.start(100, 1)
            planner.add(0.5)
        else:
            planner.begin(100)
        planner.load.settle(costs, tokens, seconds, nodes=planner.nodes)
    assert costs.payoff[1].value == pytest.approx(8 / 100 / 0.048) and planner.skip == 0 and planner.backoff == 1


def test_a_start_that_found_no_node_counts_as_a_drafted_step():
    """Its draft forward cost time all the same: after plain steps of one row at 100 tok/s, a
    step that ran the draft, found nothing and emitted its one token in 12 ms joins the drafted
    steps at 0.83x plain decoding."""
    costs = CostModel(curve(0.010, 0.011), curve(0.002, 0.002))

    def step(tokens: int, seconds: float, start: bool) -> Planner:
        planner = Planner(costs)
        planner.top_prob = 0.1  # a typical first node would not pay: a start that finds none backs off
        planner.load = Load(rows=1, context=100, waiting={planner})
        if start:
            assert planner.start(100, 1)
            planner.end()  # no node paid: it backs off itself
        else:
            planner.begin(100)
        planner.load.settle(costs, tokens, seconds, nodes=0)
        return planner

    step(1, 0.010, start=False)
    planner = step(1, 0.012, start=True)
    assert costs.plain[1].value == pytest.approx(100.0) and costs.payoff[1].value == pytest.approx(0.010 / 0.012)
    assert (planner.skip, planner.backoff) == (1, 2)  # backed off once, by `end`, not again by `settle`


def test_a_new_sequence_does_not_prefill_a_draft_whose_steps_have_been_losing():
    """A sequence's first start prefills the draft over its whole prompt (here 200 entries,
    40 ms). Before anything is learned, or while the decoder's drafted steps of this batch size
    pay, the prefill is taken to serve the steps after it: a sure first node pays a steady start
    (2 entries). While they run below plain decoding, the first start must pay for the whole lag,
    which no node can: the new sequence backs off without a draft forward, in a batch's row of
    one and decoding alone alike (both keep the record of one row). A sequence whose draft is
    already fed starts as before."""
    costs = CostModel(curve(0.010, 0.011), curve(0.002, 0.040, queries=(1, 200)))

    def start(lag: int, planner: Planner | None = None, rows: int | None = 1) -> tuple[bool, Planner]:
        planner = planner or Planner(costs)
        planner.load = None if rows is None else Load(rows=rows, context=200, waiting={planner})
        return planner.start(200, lag), planner

    assert start(200)[0]  # nothing learned yet
    fed = start(200)[1]
    costs.payoff[1] = Pooled(1.0)
    costs.payoff[1].add(0.8, 1.0)  # drafted steps of one row ran at 0.8x plain decoding
    started, new = start(200)
    assert not started and new.rounds == [] and (new.skip, new.backoff) == (1, 2)
    assert start(2, fed)[0]  # its draft is fed: a steady start
    assert not start(200, rows=None)[0]  # decoding alone: the same record
    costs.payoff[1].add(2.0, 1.0)  # together 1.4x: paying
    assert start(200)[0]


def test_every_batch_over_one_decoder_learns_into_the_same_records(models, monkeypatch):
    """The batch loop's cost model (the decoder's, with the t(B, N) surfaces) shares what its
    steps learn with the decoder's, so the decoder's next batch starts from it."""
    target = models("llama", 0)
    decoder = auto_decoder(target, target, "chain", CROWDED, monkeypatch, learn=True)
    decoder.generate_batch(PROMPTS[:2], batch_size=2, max_new_tokens=8, ignore_eos=True)
    learned = decoder.strategy.planner.costs
    assert learned.plain[2].seen and learned.rows is None  # plain steps of 2 rows (nodes cost too much)
    loop = specdec.batch.BatchLoop(decoder, 2)
    assert loop.costs.rows is CROWDED and loop.costs.plain is learned.plain and loop.costs.payoff is learned.payoff
    assert loop.costs.target_scale is learned.target_scale


def test_a_sequence_decoding_alone_prices_its_drafts_from_the_calibration_alone():
    """What the decoder's batches learned (here 5 ms of host work per row draft forward) stays
    out of `generate`, so a decoding alone plans the same whether or not batches ran before."""
    costs = CostModel(curve(0.010, 0.011), curve(0.002, 0.003))
    costs.host.add(0.005)
    planner = Planner(costs)
    planner.begin(100)
    planner.draft_forward(1)
    assert planner.draft_seconds == pytest.approx(0.002)
    assert planner._draft_seconds(2) == pytest.approx(0.002 + 0.003)


def test_what_the_calibration_does_not_hold_is_learned_from_the_steps_and_priced():
    """A batch's steps teach the cost model the host's work per row draft forward, the loop's own
    work per row, and how far the target's forwards run from its surface: medians of the recent
    steps, which a planner adds to its rates."""
    surface = Surface([1, 8], [curve(0.010, 0.010), curve(0.020, 0.020)])
    draft_rows = Surface([1, 8], [curve(0.001, 0.001), curve(0.002, 0.002)])
    costs = CostModel(curve(0.010, 0.010), curve(0.001, 0.001), surface, draft_rows)

    def step(rows=2, target=0.010, host=0.006, forwards=3, draft=0.001):
        """One step: its proposals spent `host` seconds besides `draft` in draft model calls
        (`forwards` row forwards), the loop 2 ms per row besides the proposals and the target."""
        lockstep = SimpleNamespace(seconds=host + draft, host_seconds=host, row_forwards=forwards)
        costs.observe_step(rows, 1, 100, target, host + draft + target + 0.002 * rows, lockstep)

    step(rows=2, target=1.5 * surface.at(2, 1, 100))
    assert costs.host.value == pytest.approx(0.002) and costs.overhead.value == pytest.approx(0.002)
    assert costs.target_scale.value == pytest.approx(1.5)
    step(forwards=0)  # no draft forward: no host work learned
    assert costs.host.value == pytest.approx(0.002)
    for _ in range(RECENT_STEPS):
        step(rows=8, target=0.010, host=0.0009, forwards=8)
    assert costs.host.value == pytest.approx(0.0009 / 8)  # only the last RECENT_STEPS count
    assert costs.target_scale.value == pytest.approx(0.5)  # the forwards ran at half the surface
    step(rows=8, target=0.400, host=0.6, forwards=8)  # one step slowed by something else
    assert costs.host.value == pytest.approx(0.0009 / 8) and costs.target_scale.value == pytest.approx(0.5)
    assert costs.target_seconds(1, 100, rows=8) == pytest.approx(0.010)

    planner = Planner(costs)
    planner.load = Load(rows=8)
    planner.begin(100)
    planner.draft_forward(1)
    assert planner.draft_seconds == pytest.approx(draft_rows.at(1, 1, 100) + 0.0009 / 8)
    assert planner._rate(0, 1.0, 0.0) == pytest.approx(8 / (0.010 + 8 * 0.002))


def test_the_draft_models_real_round_time_is_learned_against_its_surface():
    """Rounds priced as 2 rows of 2 queries ran three times as long (a row catching up pads the
    round to its lag): the draft's batched forwards are then costed at 3x their surface."""
    draft_rows = Surface([1, 8], [curve(0.001, 0.002), curve(0.002, 0.004)])
    costs = CostModel(curve(0.010, 0.010), curve(0.001, 0.002), ROOMY, draft_rows)
    lockstep = SimpleNamespace(seconds=0.0, host_seconds=0.0, row_forwards=0)
    planned = draft_rows.at(2, 2, 100)
    costs.observe_step(2, 1, 100, 0.010, 0.012, lockstep, 3 * 2 * planned, [(2, 2), (2, 2)])
    assert costs.draft_scale.value == pytest.approx(3.0)
    assert costs.draft_seconds(2, 100, rows=2) == pytest.approx(3 * planned)
    assert costs.draft_seconds(2, 100) == pytest.approx(0.002)  # one sequence alone: the calibration as it is
    costs.observe_step(2, 1, 100, 0.010, 0.012, lockstep, 0.5)  # no planned round: nothing learned
    assert costs.draft_scale.value == pytest.approx(3.0)


def test_a_batch_learns_from_its_own_steps(models, monkeypatch):
    target = models("llama", 0)
    learn = CostModel.observe_step
    decoder = auto_decoder(target, target, "chain", ROOMY, monkeypatch)
    monkeypatch.setattr(CostModel, "observe_step", learn)  # hand-made forward costs, learned host work
    loop = specdec.batch.BatchLoop(decoder, 2)
    for prompt in PROMPTS[:2]:
        loop.join(decoder.prepare(prompt, None, {"max_new_tokens": 8}))
    loop.step()
    assert loop.lockstep.row_forwards >= 2 and 0.0 < loop.lockstep.host_seconds < loop.lockstep.seconds
    costs = loop.costs
    assert costs.host.value > 0.0 and costs.overhead.value > 0.0 and costs.target_scale.value != 1.0
    assert costs.draft_scale.value != 1.0  # the draft model's rounds, timed against its surface


@pytest.mark.parametrize("label", ["dyspec", "hybrid", "chain"])
def test_batched_auto_trees_stay_inside_every_rows_node_cap_and_context(label, models, monkeypatch):
    target = models("llama", 0)
    decoder = auto_decoder(target, target, label, ROOMY, monkeypatch)
    limit = decoder.target.max_length
    prompts = [(p * 200)[: limit - 12 - i] for i, p in enumerate(PROMPTS)]  # each row near the end of its context
    seen = []
    inputs = Sequence.target_inputs

    def checking(self, tree):
        ids, positions, mask = inputs(self, tree)
        seen.append((len(tree) - 1, int(positions.max())))
        return ids, positions, mask

    monkeypatch.setattr(Sequence, "target_inputs", checking)
    outputs = decoder.generate_batch(prompts, batch_size=4, max_new_tokens=12)
    assert [o.token_ids for o in outputs] == [hf_greedy(target, p, len(o.token_ids)) for p, o in zip(prompts, outputs)]
    cap = 16 if label == "chain" else 6  # chain: its max_k
    assert max(n for n, _ in seen) >= 2
    assert all(n <= cap and deepest <= limit - 1 for n, deepest in seen)


def test_the_surface_is_measured_cached_and_reused(models, write_config, monkeypatch, tmp_path):
    from specdec.config import load_config

    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(tmp_path / "cache"))
    config = load_config(write_config())
    backend = PyTorchBackend(models("llama", 0))
    measured = []
    measure = specdec.costs.measure_surface

    def counting(backend, max_rows, **kwargs):
        measured.append(max_rows)
        return measure(backend, max_rows, queries=(1, 2, 4), contexts=(8,), repeats=1)

    monkeypatch.setattr(specdec.costs, "measure_surface", counting)
    first = load_or_measure_surface(config.target, backend, 4)
    assert first.rows == [1, 2, 4] == row_counts(4) and [c.queries for c in first.curves] == [[1, 2, 4]] * 3
    assert all(t > 0 for c in first.curves for t in c.seconds[0])
    again = load_or_measure_surface(config.target, backend, 3)  # fewer rows: the cached surface serves
    assert again == first and measured == [4]
    assert load_or_measure_surface(config.target, backend, 6).rows == [1, 2, 4, 6] and measured == [4, 6]
    assert load_or_measure_surface(None, backend, 2).rows == [1, 2] and measured == [4, 6, 2]  # no spec: not cached
    assert row_counts(1) == [1] and row_counts(16) == [1, 2, 4, 8, 16]


def test_surface_interpolates_between_batch_sizes():
    surface = Surface([1, 4], [curve(0.010, 0.020), curve(0.040, 0.080)])
    assert surface.at(1, 1, 0) == pytest.approx(0.010)
    assert surface.at(2, 2, 0) == pytest.approx(0.020 + (0.080 - 0.020) / 3)
    costs = CostModel(curve(0.5, 0.5), None, surface)
    assert costs.target_seconds(1, 0) == 0.5 and costs.target_seconds(1, 0, rows=4) == pytest.approx(0.040)


def test_calibrate_shows_and_plots_the_batched_surface(capsys, write_config, monkeypatch, tmp_path):
    from test_cli import run_cli

    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(tmp_path / "cache"))
    curve_measure, surface_measure = specdec.costs.measure_curve, specdec.costs.measure_surface
    monkeypatch.setattr(specdec.costs, "measure_curve", lambda backend, **kw: curve_measure(backend, (1, 2), (8,), 1))
    monkeypatch.setattr(specdec.costs, "measure_surface",
                        lambda backend, rows, **kw: surface_measure(backend, rows, (1, 2), (8,), 1))
    config, plot = str(write_config()), tmp_path / "costs.png"
    code, out, err = run_cli(capsys, "calibrate", config, "--batch-size", "3", "--plot", str(plot))
    assert code == 0, err
    assert "target, batched: cached in" in out and plot.stat().st_size > 0
    table = out[out.index("target, batched"):].splitlines()
    assert [line.split()[0] for line in table[3:6]] == ["1", "2", "3"]  # a line per measured batch size
    table = out[out.index("draft, batched: cached in"):].splitlines()  # the config's pytorch draft model too
    assert [line.split()[0] for line in table[3:6]] == ["1", "2", "3"]
