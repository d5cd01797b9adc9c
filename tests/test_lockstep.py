"""specdec.lockstep: tasks run one at a time in a fixed order, and the forwards they ask for in the
same round run as one joint call."""

import threading

import greenlet
import pytest

from specdec import lockstep
from specdec.lockstep import Lockstep


class Echo:
    """A backend stand-in: its forward returns (name, request); `forward_many` logs each joint call."""

    calls: list[list[str]] = []

    def __init__(self, name: str):
        self.name = name

    @classmethod
    def forward_many(cls, calls):
        cls.calls.append([backend.name for backend, _ in calls])
        return [(backend.name, request) for backend, request in calls]


class Failing(Echo):
    @classmethod
    def forward_many(cls, calls):
        raise ValueError("the joint forward failed")


def drafting(name: str, forwards: int, log: list, backend_type=Echo):
    """A task that asks for `forwards` forwards, logging what it does."""
    backend = backend_type(name)

    def task():
        outputs = []
        for i in range(forwards):
            log.append(f"{name} asks {i}")
            outputs.append(lockstep.forward(backend, (i,)))
        log.append(f"{name} done")
        return outputs

    return task


def recording(name: str, forwards: int, log: list, seen: list):
    """`drafting`'s task that first notes the greenlet it runs on in `seen`."""
    task = drafting(name, forwards, log)

    def run():
        seen.append(greenlet.getcurrent())
        return task()

    return run


@pytest.fixture(autouse=True)
def fresh_log():
    Echo.calls = []


def test_forwards_of_a_round_run_as_one_call_in_task_order():
    log: list[str] = []
    step = Lockstep()
    results = step.run([drafting("a", 2, log), drafting("b", 0, log), drafting("c", 3, log)])
    assert results == [[("a", (0,)), ("a", (1,))], [], [("c", (0,)), ("c", (1,)), ("c", (2,))]]
    assert Echo.calls == [["a", "c"], ["a", "c"], ["c"]]  # one call per round, of the tasks still asking
    assert log == ["a asks 0", "b done", "c asks 0", "a asks 1", "c asks 1", "a done", "c asks 2", "c done"]
    # the next step runs the same way
    log.clear()
    Echo.calls = []
    assert step.run([drafting("x", 1, log), drafting("y", 1, log)]) == [[("x", (0,))], [("y", (0,))]]
    assert Echo.calls == [["x", "y"]] and log == ["x asks 0", "y asks 0", "x done", "y done"]


def test_a_lone_task_is_called_and_forwards_directly():
    seen = []

    def task():
        seen.append(threading.current_thread())
        return lockstep.forward(Echo("solo"), (7,))

    assert Lockstep().run([task]) == [("solo", (7,))]
    assert seen == [threading.current_thread()] and Echo.calls == [["solo"]]


def test_tasks_without_a_draft_are_called_one_after_another():
    """Every task direct (no row has a draft), no coroutine runs: each task runs to its end in
    turn, and a forward it asks for anyway is a joint call of one."""
    log: list[str] = []
    seen = []
    step = Lockstep()
    assert step.run([recording("a", 2, log, seen), drafting("b", 1, log)], direct=[True, True]) == [[("a", (0,)), ("a", (1,))], [("b", (0,))]]
    assert log == ["a asks 0", "a asks 1", "a done", "b asks 0", "b done"]
    assert Echo.calls == [["a"], ["a"], ["b"]] and seen == [greenlet.getcurrent()]


def test_a_direct_task_is_called_in_its_turn_and_the_others_still_share_rounds():
    """A task marked direct (expected to ask for no forward) runs on the calling greenlet in its
    turn; a forward it asks for anyway is a joint call of one."""
    log: list[str] = []
    seen = []
    step = Lockstep()
    results = step.run([drafting("a", 2, log), recording("b", 1, log, seen), drafting("c", 1, log)], direct=[False, True, False])
    assert results == [[("a", (0,)), ("a", (1,))], [("b", (0,))], [("c", (0,))]]
    assert log == ["a asks 0", "b asks 0", "b done", "c asks 0", "a asks 1", "c done", "a done"]
    assert Echo.calls == [["b"], ["a", "c"], ["a"]] and seen == [greenlet.getcurrent()]


def test_a_failing_task_raises_its_error_and_cancels_the_others():
    log: list[str] = []

    def broken():
        lockstep.forward(Echo("bad"), (0,))
        raise KeyError("the strategy failed")

    step = Lockstep()
    with pytest.raises(KeyError, match="the strategy failed"):
        step.run([drafting("a", 3, log), broken, drafting("c", 3, log)])
    assert "a done" not in log and "c done" not in log  # cancelled at their next forward
    assert Echo.calls == [["a", "bad", "c"]]  # nothing ran after the failure
    assert step.run([drafting("a", 1, log), drafting("b", 1, log)]) == [[("a", (0,))], [("b", (0,))]]  # usable again


def test_a_failing_joint_forward_raises_and_ends_every_task():
    log: list[str] = []
    with pytest.raises(ValueError, match="the joint forward failed"):
        Lockstep().run([drafting("a", 2, log, Failing), drafting("b", 2, log, Failing)])
    assert log == ["a asks 0", "b asks 0"]


def test_an_interrupted_step_leaves_the_lockstep_usable(monkeypatch):
    log: list[str] = []
    step = Lockstep()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Lockstep, "_answer", staticmethod(interrupted))
        with pytest.raises(KeyboardInterrupt):
            step.run([drafting("a", 2, log), drafting("b", 2, log)])
    assert step.run([drafting("x", 1, log), drafting("y", 2, log)]) == [[("x", (0,))], [("y", (0,)), ("y", (1,))]]


def test_every_task_runs_on_the_calling_thread():
    """Threads that ran torch ops keep CPU thread teams of their own: no step may leave any behind."""
    seen = []

    def task():
        seen.append(threading.current_thread())
        return lockstep.forward(Echo("t"), (0,))

    before = threading.active_count()
    assert Lockstep().run([task, task, task]) == [("t", (0,))] * 3
    assert seen == [threading.current_thread()] * 3 and threading.active_count() == before


def test_outside_a_task_a_forward_is_a_joint_call_of_one():
    assert lockstep.forward(Echo("direct"), (1,)) == ("direct", (1,)) and Echo.calls == [["direct"]]
