"""bench/pipeline_sim.py's event engine against schedules worked out by hand."""

import pytest

from bench.pipeline_sim import Costs, Task, run_tasks, simulate_split


def test_shared_cores_slow_concurrent_tasks_by_hand():
    # two 1-second CPU tasks on two units: 1 s each on their own devices, both end at 2 s sharing one core
    for cores, end in ((None, 1.0), (2, 1.0), (1, 2.0)):
        a, b = Task("a", "r", 1.0), Task("b", "r", 1.0)
        assert run_tasks([a, b], {"r": 2}, cores) == pytest.approx(end)
    # a 3-second and a 1-second task on one core: shared at rate 1/2 until the short one ends at 2 s, then the long
    # one (2 s of work left... 1 s done) runs alone: 3 - 1 = 2 more seconds -> 4 s; a non-CPU task is not slowed
    long, short, comm = Task("long", "r", 3.0), Task("short", "r", 1.0), Task("comm", "c", 1.0, cpu=False)
    assert run_tasks([long, short, comm], {"r": 2, "c": 1}, cores=1) == pytest.approx(4.0)
    assert short.end == pytest.approx(2.0) and comm.end == pytest.approx(1.0)


def test_pinned_units_work_in_order_and_pools_take_any_ready_task():
    # unit 0 must run `first` (waits 3 s for `gate`) before `second`, though `second` is ready at 0
    gate = Task("gate", "other", 3.0)
    first, second = Task("first", "learn", 1.0, [gate], unit=0), Task("second", "learn", 1.0, unit=0)
    assert run_tasks([gate, first, second], {"other": 1, "learn": 1}) == pytest.approx(5.0)
    assert second.start == pytest.approx(4.0)
    # a pool unit skips a blocked task for a ready one
    gate = Task("gate", "other", 3.0)
    blocked, ready = Task("blocked", "pool", 1.0, [gate]), Task("ready", "pool", 1.0)
    assert run_tasks([gate, blocked, ready], {"other": 1, "pool": 1}) == pytest.approx(4.0)
    assert ready.start == 0.0


def test_iteration_schedules_by_hand():
    # 2 chunks of 1 group, rollout 1 s / chunk, score 0.5 s / chunk, learner 1 s per row (2 rows of 1 group), sync 0
    c = Costs(rollout=2.0, score=1.0, learn=2.0, sync=0.0, chunks=2, groups=2, per_group=1, accum=2)
    serial = simulate_split(c, 1, 1, 1, "serial")
    assert serial.iteration == pytest.approx(2.0 + 1.0 + 2.0)
    # pipelined: roll 0-1, 1-2; score 1-1.5, 2-2.5; learn row 0 1.5-2.5, row 1 2.5-3.5
    assert simulate_split(c, 1, 1, 1, "pipelined").iteration == pytest.approx(3.5)
    # one row covering both groups (accum 1): the learner waits for every group, as serial does after scoring
    one_row = Costs(rollout=2.0, score=1.0, learn=2.0, sync=0.0, chunks=2, groups=2, per_group=1, accum=1)
    assert simulate_split(one_row, 1, 1, 1, "pipelined").iteration == pytest.approx(2.5 + 2.0)
    # both on one shared core: rollout 1 runs beside score 0 (1-1.5 at half speed) ... total work 5 s on 1 core
    assert simulate_split(c, 1, 1, 1, "pipelined", cores=1).iteration == pytest.approx(5.0)
    # two learner ranks split each row's states; the optimizer step ends in an all-reduce (not on a core)
    two = Costs(rollout=2.0, score=1.0, learn=2.0, sync=0.0, chunks=2, groups=2, per_group=2, accum=1,
                allreduce=0.25)
    assert simulate_split(two, 1, 1, 2, "serial").iteration == pytest.approx(2.0 + 1.0 + 1.0 + 0.25)
