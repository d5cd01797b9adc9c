"""`auto` decoding alone keeps the record of drafted steps against plain ones that a batch's rows
keep (`CostModel.record`): each step of `speculative_decode` joins it (`Planner.settle`), and while drafted
steps run below plain ones, the sequence backs off instead of drafting every step."""

from __future__ import annotations

import pytest

from specdec.backends.pytorch import PyTorchBackend
from specdec.config import GenerationOptions
from specdec.costs import CostModel
from specdec.decoder import SpeculativeDecoder
from specdec.metrics import StepStats
from specdec.plugins import get_strategy
from specdec.strategies.budget import Load, Planner
from test_auto_budget import curve


def stats(seconds: float, nodes: int = 0, accepted: int = 0, forwards: int | None = None) -> StepStats:
    """A step of `seconds` (proposing, verifying and the rest in equal parts) that drafted `nodes`
    nodes with `forwards` draft forwards (default: one per node)."""
    forwards = nodes if forwards is None else forwards
    return StepStats(drafted_nodes=nodes, tree_depth=nodes, accepted=accepted, draft_forwards=forwards,
                     draft_seconds=seconds / 3, verify_seconds=seconds / 3, other_seconds=seconds / 3)


def drafted(planner: Planner, lag: int = 1) -> None:
    """Begin a step that starts the draft and adds one node."""
    assert planner.start(100, lag)
    planner.add(0.5)
    planner.end()


def test_a_sequence_alone_backs_off_while_its_drafted_steps_lose_and_drafts_while_they_pay():
    """Plain steps at 100 tok/s. A drafted step that emitted 1 token in 12 ms (0.83x) backs the
    sequence off; a second that emitted 3 in 12 ms brings the two to 4 tokens in 24 ms (1.67x):
    it drafts every step again."""
    planner = Planner(CostModel(curve(0.010, 0.011), curve(0.002, 0.002)))
    planner.begin(100)
    planner.settle(stats(0.010), 100)
    assert planner.costs.plain[1].value == pytest.approx(100.0)
    drafted(planner)
    planner.settle(stats(0.012, nodes=1), 100)
    assert planner.costs.payoff[1].value == pytest.approx(0.010 / 0.012)
    assert (planner.skip, planner.backoff) == (1, 2)
    assert not planner.should_draft()  # the skipped step
    drafted(planner)
    planner.settle(stats(0.012, nodes=2, accepted=2), 100)
    assert planner.costs.payoff[1].value == pytest.approx(4 / 100 / 0.024)
    assert (planner.skip, planner.backoff) == (0, 1)


def test_a_node_found_while_drafted_steps_lose_does_not_undo_the_backoff():
    """Plain steps at 100 tok/s, drafted steps at 0.83x: a probe that finds a node keeps the
    backoff it came from, and the record doubles it; once drafted steps pay, it drafts every step
    again. (When each node reset it, the real pair's chain `auto`, whose draft's nodes are
    accepted about half the time, kept drafting at 0.88x its plain steps and ran 0.90x `ar` at
    B = 1.)"""
    planner = Planner(CostModel(curve(0.010, 0.011), curve(0.002, 0.002)))
    planner.begin(100)
    planner.settle(stats(0.010), 100)
    drafted(planner)
    planner.settle(stats(0.012, nodes=1), 100)
    assert (planner.skip, planner.backoff) == (1, 2)
    assert not planner.should_draft()
    drafted(planner)  # the probe finds a node: drafted steps have been losing, so the backoff stays
    assert planner.backoff == 2
    planner.settle(stats(0.012, nodes=1), 100)
    assert planner.costs.payoff[1].value == pytest.approx(0.010 / 0.012)
    assert (planner.skip, planner.backoff) == (2, 4)
    assert not planner.should_draft() and not planner.should_draft()
    drafted(planner)
    planner.settle(stats(0.012, nodes=3, accepted=3), 100)  # 4 tokens: the three steps read 1.67x
    assert planner.costs.payoff[1].value == pytest.approx(6 / 100 / 0.036)
    assert (planner.skip, planner.backoff) == (0, 1)


def test_a_start_that_found_nothing_backs_off_while_drafted_steps_lose():
    """A start that found no node is one position's news while drafting pays (`_promising`): the
    sequence starts again. Once the record reads drafted steps below plain ones, it backs off
    (`settle` does not back it off twice: a step without nodes follows no record)."""
    planner = Planner(CostModel(curve(0.010, 0.011), curve(0.002, 0.002)))
    planner.top_prob = 0.9  # a typical first node pays
    assert planner.start(100, 1)
    planner.end()
    assert planner.skip == 0
    planner.settle(stats(0.010), 100)  # a plain step: 100 tok/s
    planner.settle(stats(0.040, forwards=1), 100)  # a drafted step that found nothing: 1 token in 40 ms
    assert planner.costs.payoff[1].value == pytest.approx(0.25)
    assert planner.start(100, 1)
    planner.end()
    assert (planner.skip, planner.backoff) == (1, 2)


def test_the_catch_up_of_a_long_lag_is_left_out_of_the_record():
    """A start over a lag of 200 entries (40 ms by the calibration, against 2 ms for a steady
    start) serves the steps after it: a step of 50 ms with it counts as 12 ms. Lookup nodes with
    no draft forward are not a drafted step and leave the record alone."""
    planner = Planner(CostModel(curve(0.010, 0.011), curve(0.002, 0.040, queries=(2, 200))))
    planner.begin(100)
    planner.settle(stats(0.010), 100)
    drafted(planner, lag=200)
    planner.settle(stats(0.050, nodes=1, accepted=1), 100)
    assert planner.costs.payoff[1].value == pytest.approx(2 / 100 / 0.012)
    planner.begin(100)
    planner.settle(stats(0.020, nodes=3, forwards=0), 100)
    assert len(planner.costs.payoff[1].seen) == 1 and len(planner.costs.plain[1].seen) == 1


def test_every_step_of_generate_joins_the_record(models):
    """Each step of `speculative_decode` joins the record of one row: plain steps or drafted ones,
    as many as the decoding took (fewer than the record keeps)."""
    target = models("llama", 0)
    component = get_strategy("chain")
    strategy = component.cls(component.cls.Options(k="auto"))
    strategy.set_costs(CostModel(curve(0.010, 0.010), curve(0.0001, 0.0001)))  # nodes free: it drafts
    decoder = SpeculativeDecoder(PyTorchBackend(target), PyTorchBackend(target), strategy, GenerationOptions())
    steps = []
    out = decoder.generate([3, 17, 42], max_new_tokens=10, ignore_eos=True, on_step=steps.append)
    costs = strategy.planner.costs
    assert len(out.token_ids) == 10 and any(step.draft_forwards for step in steps)
    plain = len(costs.plain[1].seen) if 1 in costs.plain else 0
    assert plain + len(costs.payoff[1].seen) == len(steps)


def test_the_record_decides_whether_a_start_that_found_nothing_backs_off():
    """Before any drafted step, a start that found nothing backs off when a first node of the
    draft's recent top probability would not pay (here 0.05). Once drafted steps, those starts
    among them, have paid (2 tokens in 12 ms against plain steps' 100 tok/s), it starts again."""
    planner = Planner(CostModel(curve(0.010, 0.011), curve(0.002, 0.002)))
    planner.top_prob = 0.05
    assert planner.start(100, 1)
    planner.end()
    assert (planner.skip, planner.backoff) == (1, 2)
    planner.settle(stats(0.010), 100)
    planner.reset()
    planner.top_prob = 0.05
    planner.begin(100)
    planner.settle(stats(0.012, nodes=1, accepted=1), 100)
    assert planner.start(100, 1)
    planner.end()
    assert planner.skip == 0


def test_a_batch_leaves_its_rows_catch_ups_out_of_the_record():
    """In a batch of 2 rows, one row's start catches its draft up over 200 entries (38 ms more
    than a steady start, by the calibration): the step of 50 ms counts as 12 ms. Without that,
    a probe after a backoff (whose lag is the steps it skipped) would count its catch-up against
    drafting, and a record below 1 could never recover."""
    costs = CostModel(curve(0.010, 0.011), curve(0.002, 0.040, queries=(2, 200)))
    planners = [Planner(costs), Planner(costs)]
    load = Load(rows=2, context=100, waiting=set(planners))
    for planner in planners:
        planner.load = load
    planners[0].begin(100)
    load.settle(costs, 2, 0.010, nodes=0)  # a plain step of 2 rows: 200 tok/s
    load = Load(rows=2, context=100, waiting=set(planners))
    for planner in planners:
        planner.load = load
    assert planners[0].start(100, 200)
    planners[0].add(0.9)
    planners[0].end()
    planners[1].begin(100)
    load.settle(costs, 3, 0.050, nodes=1)
    assert costs.payoff[2].value == pytest.approx(3 / 200 / 0.012)


def test_a_losing_record_is_forgotten_after_plain_steps_so_drafting_is_tried_again():
    """A losing record of B rows keeps new sequences from starting (their first start is priced at
    the whole prompt), so nothing would update it: after FORGET_AFTER plain steps of B rows it is
    forgotten and the cost model decides again. The wait doubles each time, a drafted step that
    still loses restarts it, and one that pays starts it over at FORGET_AFTER."""
    from specdec.costs import FORGET_AFTER

    costs = CostModel(curve(0.010, 0.011), curve(0.002, 0.002))
    costs.record(4, 100, 4, 0.010, drafted=False)  # plain: 400 tok/s
    costs.record(4, 100, 4, 0.012, drafted=True)  # drafted: 0.83x
    for _ in range(FORGET_AFTER - 1):
        costs.record(4, 100, 4, 0.010, drafted=False)
    assert costs.payoff[4].value == pytest.approx(0.010 / 0.012)
    planner = Planner(costs)
    planner.load = Load(rows=4, context=100, waiting={planner})
    planner.top_prob = 0.9
    assert planner._losing()
    costs.record(4, 100, 4, 0.010, drafted=False)
    assert 4 not in costs.payoff and not planner._losing()  # forgotten: the cost model decides
    assert costs.record(4, 100, 4, 0.012, drafted=True).value < 1.0  # losing again
    for _ in range(2 * FORGET_AFTER - 1):
        costs.record(4, 100, 4, 0.010, drafted=False)
    costs.record(4, 100, 4, 0.012, drafted=True)  # still losing: the wait restarts
    for _ in range(2 * FORGET_AFTER - 1):
        costs.record(4, 100, 4, 0.010, drafted=False)
    assert 4 in costs.payoff
    costs.record(4, 100, 4, 0.010, drafted=False)
    assert 4 not in costs.payoff  # after twice the first wait
    costs.record(4, 100, 12, 0.012, drafted=True)  # a drafted step that pays
    assert costs.forget.get(4) is None and costs.payoff[4].value > 1.0
