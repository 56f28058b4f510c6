"""Property-style tests of the pure role planner shared by the controller and the operator."""

from hypothesis import given, settings
from hypothesis import strategies as st

from tlt_operator.planner import (
    DRAFTER,
    ROLLOUT,
    JobProgress,
    PlannerConfig,
    WorkerProgress,
    in_long_tail,
    plan_roles,
    role_changes,
)

workers_st = st.lists(
    st.builds(WorkerProgress, name=st.sampled_from([f"w{i}" for i in range(8)]), running=st.integers(0, 4),
              queued=st.integers(0, 2), finished=st.integers(0, 50), buffered_responses=st.integers(0, 20),
              healthy=st.booleans()),
    min_size=1, max_size=8, unique_by=lambda w: w.name).map(tuple)
progress_st = st.builds(JobProgress, phase=st.sampled_from(["rollout", "update", "idle"]),
                        pending_prompts=st.integers(0, 3), workers=workers_st)
config_st = st.builds(PlannerConfig, drafter_training=st.booleans(), min_responses=st.integers(1, 10),
                      train_during_update=st.booleans(), max_drafter_workers=st.none() | st.integers(0, 4))


@settings(max_examples=400, deadline=None)
@given(progress_st, config_st)
def test_invariants(progress, config):
    roles = plan_roles(progress, config)
    assert set(roles) == {w.name for w in progress.workers}
    by_name = {w.name: w for w in progress.workers}
    drafters = [n for n, r in roles.items() if r == DRAFTER]
    for name in drafters:
        w = by_name[name]
        # a drafter never has work, is healthy and has data to train on
        assert w.running == 0 and w.queued == 0 and w.healthy
        assert w.buffered_responses >= config.min_responses
    if drafters:
        assert config.drafter_training
        assert progress.pending_prompts == 0 or progress.phase != "rollout"
        assert progress.phase == "rollout" or (progress.phase == "update" and config.train_during_update)
    if config.max_drafter_workers is not None:
        assert len(drafters) <= config.max_drafter_workers
    # deterministic and order-independent
    assert plan_roles(JobProgress(progress.phase, progress.pending_prompts, tuple(reversed(progress.workers))),
                      config) == roles


@settings(max_examples=200, deadline=None)
@given(progress_st)
def test_pending_work_preempts_everyone(progress):
    busy = JobProgress("rollout", max(1, progress.pending_prompts), progress.workers)
    assert set(plan_roles(busy, PlannerConfig()).values()) == {ROLLOUT}


def test_long_tail_moves_idle_worker_and_back():
    cfg = PlannerConfig(min_responses=2)
    tail = JobProgress("rollout", 0, (WorkerProgress("a", 3, 0, 10, 10), WorkerProgress("b", 0, 0, 12, 12)))
    assert in_long_tail(tail)
    roles = plan_roles(tail, cfg)
    assert roles == {"a": ROLLOUT, "b": DRAFTER}
    next_rollout = JobProgress("rollout", 64, tail.workers)
    back = plan_roles(next_rollout, cfg)
    assert role_changes(roles, back) == [("b", DRAFTER, ROLLOUT)]
    assert not in_long_tail(next_rollout)


def test_eligible_workers_ordered_by_buffer():
    progress = JobProgress("rollout", 0, tuple(WorkerProgress(n, 0, 0, 5, b) for n, b in
                                               [("a", 5), ("b", 9), ("c", 7)]))
    roles = plan_roles(progress, PlannerConfig(min_responses=1, max_drafter_workers=2))
    assert [n for n, r in sorted(roles.items()) if r == DRAFTER] == ["b", "c"]


def test_update_phase_respects_config():
    progress = JobProgress("update", 0, (WorkerProgress("a", 0, 0, 5, 5),))
    assert plan_roles(progress, PlannerConfig(train_during_update=False)) == {"a": ROLLOUT}
    assert plan_roles(progress, PlannerConfig(train_during_update=True)) == {"a": DRAFTER}
