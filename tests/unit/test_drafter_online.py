"""Aggregator merging/publishing and the preemptible spot trainer, on a tiny random target."""

import threading

import pytest
import torch

from tlt.drafter.aggregator import DrafterAggregator, trainable_state
from tlt.drafter.spot import MICRO_BATCH, SpotDrafterTrainer
from tlt.drafter.warmup import new_drafter
from tlt.errors import InvalidRequestError
from tlt.models.loader import load_model


@pytest.fixture(scope="module")
def target(peaky_model_dir):
    return load_model(peaky_model_dir, dtype="float32")


def _delta(drafter, value):
    return {n: torch.full_like(p, value, dtype=torch.float32) for n, p in drafter.named_parameters()}


def test_token_weighted_merge_sums_a_workers_pushes(target):
    master = new_drafter(target, seed=0)
    before = trainable_state(master)
    agg = DrafterAggregator(master, store=None, version=3)
    agg.push_delta("a", _delta(master, 1.0), tokens=10)
    agg.push_delta("a", _delta(master, 1.0), tokens=10)  # sequential increments of one trajectory: 2.0
    agg.push_delta("b", _delta(master, -1.0), tokens=60)
    assert agg.publish() == 4
    # (20 * 2.0 + 60 * -1.0) / 80 = -0.25
    for name, value in trainable_state(master).items():
        torch.testing.assert_close(value - before[name], torch.full_like(value, -0.25))
    assert agg.publish() is None  # nothing pending
    assert agg.status().published == [4]


@pytest.mark.parametrize("bad", ["missing", "shape", "nan", "tokens"])
def test_bad_pushes_are_refused_and_leave_master_untouched(target, bad):
    master = new_drafter(target, seed=0)
    before = trainable_state(master)
    agg = DrafterAggregator(master)
    delta = _delta(master, 0.5)
    tokens = 5
    if bad == "missing":
        delta.pop("fc")
    elif bad == "shape":
        delta["fc"] = torch.zeros(3, 3)
    elif bad == "nan":
        delta["norm"][0] = float("nan")
    else:
        tokens = 0
    with pytest.raises(InvalidRequestError):
        agg.push_delta("a", delta, tokens)
    assert agg.publish() is None
    assert all(torch.equal(before[n], v) for n, v in trainable_state(master).items())


def test_a_push_that_would_overflow_the_published_drafter_is_refused_and_earlier_ones_stay(target):
    """Finite deltas can still add up past what a bf16 checkpoint holds (bf16 tops out near 3.39e38, below
    float32's 3.40e38): such a push is refused, the worker's earlier pushes stay pending, and the version
    published from them has only finite weights."""
    from tlt.drafter.aggregator import PUBLISH_DTYPE

    master = new_drafter(target, seed=0)
    agg = DrafterAggregator(master)
    agg.push_delta("a", _delta(master, 0.25), tokens=5)
    assert torch.finfo(PUBLISH_DTYPE).max < 3.40e38 < torch.finfo(torch.float32).max
    with pytest.raises(InvalidRequestError, match="would overflow"):
        agg.push_delta("a", _delta(master, 3.40e38), tokens=5)  # finite in float32, inf once published
    agg.push_delta("b", _delta(master, 2.0e38), tokens=5)
    with pytest.raises(InvalidRequestError, match="would overflow"):
        agg.push_delta("b", _delta(master, 2.0e38), tokens=5)  # the pending sum would be inf
    assert agg.status().pending_workers == 2 and agg.status().total_pushes == 2
    assert agg.publish() == 1
    assert all(torch.isfinite(v.to(PUBLISH_DTYPE)).all() for v in trainable_state(master).values())


def test_a_push_from_an_unpublished_version_is_refused_whatever_it_holds(target):
    from tlt.store import VersionNotFoundError

    master = new_drafter(target, seed=0)
    agg = DrafterAggregator(master, version=2)
    delta = _delta(master, float("nan"))
    with pytest.raises(VersionNotFoundError, match="base_version 3 is newer than the latest drafter version 2"):
        agg.push_delta("a", delta, tokens=5, base_version=3)
    with pytest.raises(InvalidRequestError, match="NaN"):
        agg.push_delta("a", delta, tokens=5, base_version=2)


def _examples(target, n=12, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(3, target.config.vocab_size, (n, length), generator=g).tolist()
    return [(r[:6], r[6:]) for r in rows]


def test_spot_trainer_pushes_every_n_and_on_preemption(target):
    template = new_drafter(target, seed=0)
    pushes = []
    spot = SpotDrafterTrainer(target, template, lambda d, t: pushes.append((d, t)), lr=1e-3, batch_size=4,
                              push_every=3, ttt_steps=2)
    for prompt, response in _examples(target):
        spot.add_response(prompt, response)
    spot.start_from(trainable_state(template))
    report = spot.train(should_stop=lambda: False, max_steps=7)
    assert report.steps == 7 and report.pushes == 3 and len(pushes) == 3  # after 3, 6 and the final one
    assert not report.preempted
    # the pushed deltas add up to the total change: nothing trained is lost
    total = {n: sum(d[n] for d, _ in pushes) for n in pushes[0][0]}
    start = trainable_state(template)
    for name, value in trainable_state(spot.drafter).items():
        torch.testing.assert_close(start[name] + total[name], value, atol=1e-5, rtol=0)
    assert sum(t for _, t in pushes) == report.tokens


def _stop_on_call(n: int):
    """A ``should_stop`` that turns true on its ``n``-th call and stays true."""
    stop = threading.Event()
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        if calls["n"] == n:
            stop.set()
        return stop.is_set()
    return should_stop


def test_spot_trainer_stops_promptly_when_preempted(target):
    template = new_drafter(target, seed=0)
    pushes = []
    spot = SpotDrafterTrainer(target, template, lambda d, t: pushes.append(t), lr=1e-3, batch_size=2,
                              push_every=100, ttt_steps=2)
    for prompt, response in _examples(target):
        spot.add_response(prompt, response)
    report = spot.train(_stop_on_call(3))  # one micro-batch a step: checked once per step
    assert report.preempted and report.steps == 2
    assert pushes == [report.tokens]  # the unpushed work went out on preemption


def test_preemption_mid_step_waits_one_micro_batch_and_keeps_what_ran(target):
    template = new_drafter(target, seed=0)
    pushes, forwards = [], []
    spot = SpotDrafterTrainer(target, template, lambda d, t: pushes.append(t), lr=1e-3, batch_size=4 * MICRO_BATCH,
                              push_every=100, ttt_steps=2)
    for prompt, response in _examples(target, n=4 * MICRO_BATCH):
        spot.add_response(prompt, response)
    spot.start_from(trainable_state(template))
    spot.target = lambda *args, **kwargs: forwards.append(1) or target(*args, **kwargs)
    report = spot.train(_stop_on_call(3))  # before the step, then before micro-batches 2 and 3
    assert report.preempted and report.steps == 1 and len(forwards) == 2
    # the step went through on the two micro-batches that ran: their tokens, pushed on the way out
    assert pushes == [report.tokens] and 0 < report.tokens < spot_tokens(target, template, 4 * MICRO_BATCH)
    assert report.last_loss is None  # a part-step reports no loss over the batch
    start = trainable_state(template)
    assert any(not torch.equal(start[n], v) for n, v in trainable_state(spot.drafter).items())


def spot_tokens(target, template, n: int) -> int:
    """Tokens one uninterrupted step on the first ``n`` examples trains on."""
    spot = SpotDrafterTrainer(target, template, lambda d, t: None, lr=1e-3, batch_size=n, push_every=100,
                              ttt_steps=2)
    for prompt, response in _examples(target, n=n):
        spot.add_response(prompt, response)
    return spot.train(lambda: False, max_steps=1).tokens


def test_a_micro_batched_step_has_the_whole_batch_gradient(target):
    from tlt.drafter.trainer import eagle3_loss, target_batch
    from tlt.drafter.warmup import Example, collate

    template = new_drafter(target, seed=0)
    # responses of different lengths, so micro-batches pad differently from the whole batch
    data = [(p, r[:4 + 3 * i]) for i, (p, r) in enumerate(_examples(target, n=3 * MICRO_BATCH + 1))]
    spot = SpotDrafterTrainer(target, template, lambda d, t: None, lr=1e-3, batch_size=len(data), push_every=100,
                              ttt_steps=3)
    for prompt, response in data:
        spot.add_response(prompt, response)
    spot.start_from(trainable_state(template))
    report = spot.train(lambda: False, max_steps=1)

    reference = template.copy_for(target).float()
    ids, mask = collate([Example(p, r) for p, r in data], 1024)
    whole = eagle3_loss(reference, target_batch(target, ids, mask, reference.config.aux_layer_ids), steps=3)
    whole.loss.backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    assert report.tokens == whole.tokens
    assert report.last_loss == pytest.approx(float(whole.loss.detach()), rel=1e-5)
    assert report.last_accuracy == pytest.approx(whole.step_accuracy, abs=1e-6)
    grads = dict(spot.drafter.named_parameters())
    for name, param in reference.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(grads[name].grad, param.grad, atol=1e-6, rtol=1e-4)


def test_training_on_responses_lowers_the_loss_through_the_aggregator(target):
    """End to end in memory: a spot trainer's pushes, merged, make the master drafter better."""
    from tlt.drafter.trainer import eagle3_loss, target_batch
    from tlt.drafter.warmup import Example, collate

    master = new_drafter(target, seed=0)
    agg = DrafterAggregator(master)
    spot = SpotDrafterTrainer(target, master, lambda d, t: agg.push_delta("w", d, t), lr=3e-3, batch_size=8,
                              push_every=5, ttt_steps=2)
    data = _examples(target, n=16)
    for prompt, response in data:
        spot.add_response(prompt, response)
    spot.start_from(agg.base()[1])
    ids, mask = collate([Example(p, r) for p, r in data], 64)
    batch = target_batch(target, ids, mask, master.config.aux_layer_ids)
    with torch.no_grad():
        before = float(eagle3_loss(master, batch, steps=2).loss)
    spot.train(lambda: False, max_steps=30)
    assert agg.publish() == 1
    with torch.no_grad():
        after = float(eagle3_loss(master, batch, steps=2).loss)
    assert after < before * 0.95, (before, after)
