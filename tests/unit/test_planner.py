"""Property-style tests of the pure role planner shared by the controller and the operator."""

from collections.abc import Mapping

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

# zero (idle worker, no pending prompt) as likely as any other value, so drafter moves are common
workers_st = st.lists(
    st.builds(WorkerProgress, name=st.sampled_from([f"w{i}" for i in range(8)]),
              running=st.just(0) | st.integers(1, 4), queued=st.just(0) | st.integers(1, 2),
              finished=st.integers(0, 50), buffered_responses=st.integers(0, 20), healthy=st.booleans()),
    min_size=1, max_size=8, unique_by=lambda w: w.name).map(tuple)
progress_st = st.builds(JobProgress, phase=st.sampled_from(["rollout", "update", "idle"]),
                        pending_prompts=st.just(0) | st.integers(1, 3), workers=workers_st)
config_st = st.builds(PlannerConfig, drafter_training=st.booleans(), min_responses=st.integers(1, 10),
                      train_during_update=st.booleans(), max_drafter_workers=st.none() | st.integers(0, 4))
roles_st = st.dictionaries(st.sampled_from([f"w{i}" for i in range(8)]), st.sampled_from([ROLLOUT, DRAFTER]))


def _eligible(progress: JobProgress, config: PlannerConfig) -> list[WorkerProgress]:
    """Workers the planner may move to drafter: healthy, with nothing to do, and enough responses to train on."""
    return [w for w in progress.workers
            if w.healthy and w.running == 0 and w.queued == 0 and w.buffered_responses >= config.min_responses]


@st.composite
def long_tail_st(draw: st.DrawFn) -> tuple[JobProgress, PlannerConfig]:
    """A rollout in its long tail (no prompt pending, one healthy worker still decoding) with at least one idle
    healthy worker holding enough responses, under a config that trains the drafter and allows >= 1 drafter."""
    config = draw(st.builds(PlannerConfig, drafter_training=st.just(True), min_responses=st.integers(1, 10),
                            train_during_update=st.booleans(), max_drafter_workers=st.none() | st.integers(1, 4)))
    idle = WorkerProgress("idle", 0, 0, draw(st.integers(0, 50)), draw(st.integers(config.min_responses, 20)))
    busy = draw(st.builds(WorkerProgress, name=st.just("busy"), running=st.integers(1, 4), queued=st.integers(0, 2),
                          finished=st.integers(0, 50), buffered_responses=st.integers(0, 20)))
    workers = draw(st.permutations([idle, busy, *draw(workers_st)]))
    return JobProgress("rollout", 0, tuple(workers)), config


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
@given(progress_st, config_st)
def test_pending_work_preempts_everyone(progress, config):
    busy = JobProgress("rollout", max(1, progress.pending_prompts), progress.workers)
    assert set(plan_roles(busy, config).values()) == {ROLLOUT}


@settings(max_examples=300, deadline=None)
@given(progress_st, config_st)
def test_every_eligible_worker_moves_up_to_the_limit(progress, config):
    """Completeness (the converse of the invariants): whenever the phase allows drafter training, exactly
    min(eligible, max_drafter_workers) workers train it, those holding most responses first."""
    allowed = config.drafter_training and (
        (progress.phase == "rollout" and progress.pending_prompts == 0)
        or (progress.phase == "update" and config.train_during_update))
    drafters = {n for n, r in plan_roles(progress, config).items() if r == DRAFTER}
    eligible = _eligible(progress, config)
    limit = len(eligible) if config.max_drafter_workers is None else min(len(eligible), config.max_drafter_workers)
    assert len(drafters) == (limit if allowed else 0)
    if drafters:  # nobody left out holds more responses than a chosen worker
        least = min(w.buffered_responses for w in eligible if w.name in drafters)
        assert all(w.buffered_responses <= least for w in eligible if w.name not in drafters)


@settings(max_examples=300, deadline=None)
@given(long_tail_st())
def test_long_tail_moves_an_idle_worker_and_new_work_moves_everyone_back(case):
    progress, config = case
    assert in_long_tail(progress)
    before = plan_roles(progress, config)
    drafters = sorted(n for n, r in before.items() if r == DRAFTER)
    assert drafters, "long tail with an eligible idle worker, yet no drafter"
    assert before["busy"] == ROLLOUT
    # the next rollout's prompts arrive: every drafter comes back, nobody else moves
    after = plan_roles(JobProgress("rollout", 1, progress.workers), config)
    assert set(after.values()) == {ROLLOUT}
    assert role_changes(before, after) == [(n, DRAFTER, ROLLOUT) for n in drafters]


@settings(max_examples=300, deadline=None)
@given(progress_st)
def test_long_tail_needs_a_rollout_without_pending_prompts_and_healthy_idle_and_busy_workers(progress):
    tail = in_long_tail(progress)
    healthy = [w for w in progress.workers if w.healthy]
    if tail:
        assert progress.phase == "rollout" and progress.pending_prompts == 0
        assert any(w.running == 0 and w.queued == 0 for w in healthy)
        assert any(w.running or w.queued for w in healthy)
    # only healthy workers count, in any order
    assert in_long_tail(JobProgress(progress.phase, progress.pending_prompts, tuple(reversed(healthy)))) == tail
    # a healthy idle and a healthy busy worker put a pending-free rollout in the tail, whatever the others do
    extra = (WorkerProgress("idle", 0, 0, 0, 0), WorkerProgress("busy", 1, 0, 0, 0))
    assert in_long_tail(JobProgress("rollout", 0, progress.workers + extra))
    assert not in_long_tail(JobProgress("rollout", 1, progress.workers + extra))
    assert not in_long_tail(JobProgress("update", 0, progress.workers + extra))


@settings(max_examples=300, deadline=None)
@given(roles_st, roles_st)
def test_role_changes_lead_from_before_to_after(before: Mapping[str, str], after: Mapping[str, str]):
    changes = role_changes(before, after)
    names = [n for n, _, _ in changes]
    assert names == sorted(set(names)) and set(names) <= set(after)
    for name, old, new in changes:
        assert old == before.get(name, ROLLOUT) and new == after[name] and old != new
    # applied to `before` (absent workers start in rollout), the changes give `after`
    applied = {n: before.get(n, ROLLOUT) for n in after} | {n: new for n, _, new in changes}
    assert applied == dict(after)
    assert role_changes(after, after) == []


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
