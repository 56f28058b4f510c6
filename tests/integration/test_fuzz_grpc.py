"""Bad-input fuzzing of every gRPC method of the rollout, drafter and trainer services (hypothesis).

The three servicers run in this process on loopback (``tlt.rpc.server.start_server``) around a rollout worker,
a drafter aggregator and a trainer endpoint on a tiny random model. Every call with malformed values must
answer OK or a status code that is neither INTERNAL nor UNKNOWN (nor a hang) with a non-empty message, and
afterwards every service still answers a good request — and holds finite weights.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context, event
from prometheus_client import CollectorRegistry
from safetensors.torch import save as save_safetensors

from tests.conftest import MODEL_VARIANTS, _save_random
from tlt.config import job_spec_from_dict
from tlt.drafter.aggregator import DrafterAggregator
from tlt.drafter.service import DrafterServicer, RemoteDrafter, open_aggregator
from tlt.drafter.warmup import new_drafter
from tlt.models.loader import load_model
from tlt.rollout.sampling import SamplingParams
from tlt.rollout.service import RolloutServicer
from tlt.rollout.worker import RequestQueue, RolloutRequest, RolloutWorker
from tlt.rpc.client import open_channel
from tlt.rpc.errors import RpcError
from tlt.rpc.server import GrpcServer, start_server
from tlt.rpc.v1 import (
    common_pb2,
    drafter_pb2,
    drafter_pb2_grpc,
    rollout_pb2,
    rollout_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from tlt.store import ArtifactStore
from tlt.trainer.service import TrainerEndpoint, TrainerServicer

# The tiny random model of the `hf_model_dir` fixture (qwen2, GQA, tied embeddings) with a 64-token context, so
# a request asking for 2**31 new tokens costs at most a few dozen decode steps.
ARCH, OVERRIDES = MODEL_VARIANTS["qwen2-gqa-tied"]
CONTEXT = 64
VOCAB = 96
TIMEOUT_S = 30.0
INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
# codes that mean a bug (INTERNAL, UNKNOWN), a hang (DEADLINE_EXCEEDED) or a dead service
BAD_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED}


def fuzz(n: int):
    """``n`` examples (times $TLT_FUZZ_SCALE, for a longer hunt), no deadline: a call may wait on a step."""
    return settings(max_examples=n * int(os.environ.get("TLT_FUZZ_SCALE", "1")), deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


@dataclass
class Cluster:
    """The three services on loopback, their stubs, and the objects they serve (for white-box checks)."""

    tmp: Path
    worker: RolloutWorker
    aggregator: DrafterAggregator
    endpoint: TrainerEndpoint
    servers: dict[str, GrpcServer]
    channels: dict[str, grpc.Channel]
    rollout: rollout_pb2_grpc.RolloutStub
    drafter: drafter_pb2_grpc.DrafterStub
    trainer: trainer_pb2_grpc.TrainerStub


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("fuzz-grpc")
    model_dir = _save_random(tmp / "model", ARCH, 0.02, max_position_embeddings=CONTEXT, **OVERRIDES)
    spec = job_spec_from_dict({
        "name": "fuzz", "output_dir": str(tmp / "run"), "model": {"path": str(model_dir), "dtype": "float32"},
        "rollout": {"max_running": 4, "max_new_tokens": 4,
                    "speculative": {"mode": "adaptive", "strategies": ["2_1_3", "3_2_6"]}},
        "drafter": {"init": "random", "online_training": False},
        "trainer": {"grpo": {"lr": 1e-4, "micro_batch_tokens": 256}},
        "store": {"uri": str(tmp / "store")},
    })
    store = ArtifactStore(spec.store_uri)
    endpoint = TrainerEndpoint(spec, model_dir, store)
    endpoint.publish_policy(0)
    aggregator = open_aggregator(spec, model_dir, load_model(model_dir, dtype="float32"), store)  # drafter v0
    model = load_model(model_dir, dtype="float32")
    worker = RolloutWorker("fuzz-worker", model, spec, new_drafter(model, seed=1), store)
    worker.load_policy(-1)
    worker.load_drafter(-1)
    assert worker.speculative and worker.engine.max_seq_len < CONTEXT
    servers = {
        "rollout": start_server([(rollout_pb2_grpc.add_RolloutServicer_to_server,
                                  RolloutServicer(worker, CollectorRegistry()), "tlt.v1.Rollout")]),
        "drafter": start_server([(drafter_pb2_grpc.add_DrafterServicer_to_server,
                                  DrafterServicer(aggregator, CollectorRegistry()), "tlt.v1.Drafter")]),
        "trainer": start_server([(trainer_pb2_grpc.add_TrainerServicer_to_server,
                                  TrainerServicer(endpoint, CollectorRegistry()), "tlt.v1.Trainer")]),
    }
    channels = {name: open_channel(f"127.0.0.1:{s.port}") for name, s in servers.items()}
    yield Cluster(tmp, worker, aggregator, endpoint, servers, channels,
                  rollout_pb2_grpc.RolloutStub(channels["rollout"]), drafter_pb2_grpc.DrafterStub(channels["drafter"]),
                  trainer_pb2_grpc.TrainerStub(channels["trainer"]))
    for channel in channels.values():
        channel.close()
    for server in servers.values():
        server.stop(0)
    endpoint.close()


# ---- the property ---------------------------------------------------------------------------------------


def answer(call: Callable[[], Any]) -> tuple[grpc.StatusCode, Any]:
    """Run one call: (OK, its result) or (the status code, its details) for a status the property allows."""
    try:
        result = call()
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()
        _event(f"{code.name}: {re.sub(r'[0-9]+', 'N', (details or '')[:40])}")
        assert code not in BAD_CODES, f"{code.name}: {details}"
        assert details and details.strip(), f"{code.name} without a message"
        return code, details
    _event("OK")
    return grpc.StatusCode.OK, result


def _event(name: str) -> None:
    """Count outcomes per fuzz test (pytest --hypothesis-show-statistics)."""
    if currently_in_test_context():
        event(name)


_ids = itertools.count()


def good_generate(c: Cluster) -> None:
    """One tiny request through a fresh Generate stream (the worker takes a new step)."""
    rid = f"good-{next(_ids)}"
    params = common_pb2.SamplingParams(temperature=1.0, max_new_tokens=2, seed=7)
    events = list(c.rollout.Generate(iter([rollout_pb2.GenerateRequest(request_id=rid, prompt_ids=[5, 6, 7],
                                                                       params=params)]), timeout=TIMEOUT_S))
    assert [e.completion.request_id for e in events[:-1]] == [rid] and events[-1].HasField("summary")
    assert 1 <= len(events[0].completion.token_ids) <= 2


def still_serving(c: Cluster) -> None:
    """Every service answers a good request, and no weights went NaN."""
    progress = c.rollout.Progress(rollout_pb2.ProgressRequest(), timeout=TIMEOUT_S)
    assert progress.name == "fuzz-worker" and progress.running == 0
    c.drafter.Status(drafter_pb2.DrafterStatusRequest(), timeout=TIMEOUT_S)
    c.trainer.Status(trainer_pb2.TrainerStatusRequest(), timeout=TIMEOUT_S)
    for name, module in (("rollout policy", c.worker.model), ("master drafter", c.aggregator.drafter),
                         ("trainer policy", c.endpoint.trainer.model)):
        assert all(torch.isfinite(p).all() for p in module.parameters()), f"the {name} holds NaN or inf"


# ---- message strategies ------------------------------------------------------------------------------------

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=16)  # protobuf strings are UTF-8
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-2, 3),
                   st.sampled_from([0.0, -0.0, 1e-300, 5e-324, 1e-45, 1e38, 1e300, float("nan"), float("inf")]))
GOOD_IDS = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8)
BAD_IDS = st.one_of(
    st.just([]),
    st.lists(st.integers(0, VOCAB - 1), min_size=CONTEXT - 16, max_size=CONTEXT + 8),  # around the context limit
    st.lists(st.one_of(st.integers(0, VOCAB - 1), INT32, st.sampled_from([-1, VOCAB, 2**31 - 1, -(2**31)])),
             min_size=1, max_size=8),  # negative, out of the vocabulary
)


def maybe_bad(good: st.SearchStrategy, bad: st.SearchStrategy, bad_one_in: int = 4) -> st.SearchStrategy:
    """Mostly a good value, sometimes a malformed one (so most messages get past the first check)."""
    return st.one_of(*[good] * (bad_one_in - 1), bad)


def faults(names: list[str]) -> st.SearchStrategy[list[str]]:
    """Which fields to break in one message stream: none (a good stream) or one or two of ``names``."""
    return st.one_of(st.just([]), st.lists(st.sampled_from(names), min_size=1, max_size=2))


@st.composite
def good_params(draw) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(
        temperature=draw(st.one_of(st.just(0.0), st.floats(0, 2))),
        top_p=draw(st.one_of(st.just(0.0), st.floats(0.05, 1))),  # 0 reads as 1
        top_k=draw(st.integers(0, VOCAB + 2)), max_new_tokens=draw(st.one_of(st.integers(1, 4), st.just(2**31 - 1))),
        stop_token_ids=draw(st.lists(st.integers(0, VOCAB - 1), max_size=3)), ignore_eos=draw(st.booleans()))
    if draw(st.booleans()):
        msg.seed = draw(st.one_of(st.integers(0, 10), st.integers(0, 2**64 - 1)))
    return msg


REQUEST_FAULTS = {
    "request_id": st.one_of(st.sampled_from(["", " "]), TEXT),
    "prompt_ids": BAD_IDS,
    "group": INT32,
    "temperature": FLOATS, "top_p": FLOATS, "top_k": INT32, "max_new_tokens": INT32,
    "stop_token_ids": st.lists(INT32, min_size=1, max_size=3),
    "seed": st.integers(0, 2**64 - 1),
    "params": st.just(None),  # unset: all zeros, max_new_tokens 0
    "duplicate_id": st.just(None),  # the id of another request of the stream
}


@st.composite
def generate_streams(draw) -> list[rollout_pb2.GenerateRequest]:
    """Good requests (unique ids, prompts inside the vocabulary and context, sane sampling), with faults."""
    requests = [rollout_pb2.GenerateRequest(request_id=f"r{i}", prompt_ids=draw(GOOD_IDS),
                                            group=draw(st.integers(0, 3)), params=draw(good_params()))
                for i in range(draw(st.integers(0, 4)))]
    for fault in draw(faults(sorted(REQUEST_FAULTS))) if requests else []:
        msg = draw(st.sampled_from(requests))
        value = draw(REQUEST_FAULTS[fault])
        if fault == "duplicate_id":
            msg.request_id = draw(st.sampled_from(requests)).request_id
        elif fault == "params":
            msg.ClearField("params")
        elif fault == "prompt_ids":
            msg.prompt_ids[:] = value
        elif fault in ("request_id", "group"):
            setattr(msg, fault, value)
        elif fault == "stop_token_ids":
            msg.params.stop_token_ids[:] = value
        else:
            setattr(msg.params, fault, value)
    return requests


# ---- Rollout ----------------------------------------------------------------------------------------------


@fuzz(50)
@given(requests=generate_streams(), cancel_after=st.one_of(st.none(), st.none(), st.integers(0, 1)))
def test_generate(cluster, requests, cancel_after):
    c = cluster
    if cancel_after is None:
        code, result = answer(lambda: list(c.rollout.Generate(iter(requests), timeout=TIMEOUT_S)))
        if code == grpc.StatusCode.OK:
            completions = [e.completion for e in result[:-1]]
            assert result[-1].HasField("summary") and all(e.HasField("completion") for e in result[:-1])
            assert sorted(x.request_id for x in completions) == sorted(r.request_id for r in requests)
            for x in completions:
                assert len(x.logprobs) == len(x.token_ids) >= 1 and x.finish_reason in ("stop", "length")
                assert all(0 <= t < VOCAB for t in x.token_ids)
    else:  # the client goes away mid-step
        call = c.rollout.Generate(iter(requests), timeout=TIMEOUT_S)
        try:
            for _ in range(cancel_after):
                next(call)
        except (StopIteration, grpc.RpcError):
            pass
        call.cancel()
    good_generate_after_cancel(c)
    still_serving(c)


def good_generate_after_cancel(c: Cluster) -> None:
    """A good step right after a cancelled one: "already running" is fair while the old step winds down."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return good_generate(c)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def test_a_cancelled_step_ends_before_the_next_one_starts(cluster):
    """The client goes away after the first result while the step still decodes long requests: the next step
    must not run next to the old one on the same worker (it would lose its requests and hang)."""
    c = cluster
    long = common_pb2.SamplingParams(temperature=1.0, max_new_tokens=2**31 - 1, ignore_eos=True, seed=3)
    short = common_pb2.SamplingParams(temperature=0.0, max_new_tokens=1)
    for attempt in range(5):
        requests = [rollout_pb2.GenerateRequest(request_id=f"short-{attempt}", prompt_ids=[4], params=short),
                    *[rollout_pb2.GenerateRequest(request_id=f"long-{attempt}-{i}", prompt_ids=[5, i], params=long)
                      for i in range(3)]]
        call = c.rollout.Generate(iter(requests), timeout=TIMEOUT_S)
        assert next(call).completion.request_id == f"short-{attempt}"
        call.cancel()
        good_generate_after_cancel(c)
        still_serving(c)


@fuzz(30)
@given(role=st.one_of(st.sampled_from([0, 1, 2, 3, -1]), INT32))
def test_set_role(cluster, role):
    code, _ = answer(lambda: cluster.rollout.SetRole(rollout_pb2.SetRoleRequest(role=role), timeout=TIMEOUT_S))
    assert (code == grpc.StatusCode.OK) == (role in (common_pb2.ROLE_ROLLOUT, common_pb2.ROLE_DRAFTER))
    still_serving(cluster)
    cluster.rollout.SetRole(rollout_pb2.SetRoleRequest(role=common_pb2.ROLE_ROLLOUT), timeout=TIMEOUT_S)


VERSIONS = st.one_of(st.integers(-3, 3), INT64, st.sampled_from([2**63 - 1, -(2**63), 10**12]))


@fuzz(30)
@given(version=VERSIONS, drafter=st.booleans())
def test_load_policy_and_drafter(cluster, version, drafter):
    method = cluster.rollout.LoadDrafter if drafter else cluster.rollout.LoadPolicy
    code, result = answer(lambda: method(rollout_pb2.LoadVersionRequest(version=version), timeout=TIMEOUT_S))
    if code == grpc.StatusCode.OK:
        assert result.version >= 0 and (version < 0 or result.version == version)
    still_serving(cluster)


def _tuner_states(worker: RolloutWorker) -> st.SearchStrategy[str]:
    """JSON text for DrafterTraining.load_tuner_state_json: junk, and the real state with one part replaced."""
    state = worker.tuner_state()
    assert state is not None
    leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), TEXT)
    junk = st.recursive(leaf, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                     st.dictionaries(TEXT, kids, max_size=3)), max_leaves=10)

    def paths(node, prefix=()):
        yield prefix
        if isinstance(node, dict):
            for k, v in node.items():
                yield from paths(v, (*prefix, k))
        elif isinstance(node, list):
            for i, v in enumerate(node[:3]):
                yield from paths(v, (*prefix, i))

    def replaced(path, value):
        out = json.loads(json.dumps(state))
        if not path:
            return value
        node = out
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return out

    mutated = st.builds(replaced, st.sampled_from(list(paths(state))), junk)
    return st.one_of(mutated.map(json.dumps), junk.map(json.dumps), TEXT,
                     st.sampled_from(["", "{", "NaN", "[Infinity]", '{"version": 1e999}', "[" * 100_000,
                                      '{"a":' * 50_000, json.dumps(state), json.dumps(state) + "x"]))


@pytest.fixture(scope="module")
def tuner_states(cluster):
    return _tuner_states(cluster.worker)


@fuzz(40)
@given(data=st.data())
def test_drafter_training(cluster, tuner_states, data):
    text = data.draw(st.one_of(st.none(), tuner_states))
    request = rollout_pb2.DrafterTrainingRequest()
    if text is not None:
        request.load_tuner_state_json = text
    code, result = answer(lambda: cluster.rollout.DrafterTraining(request, timeout=TIMEOUT_S))
    if code == grpc.StatusCode.OK:
        json.loads(result.tuner_state_json)
    still_serving(cluster)
    good_generate(cluster)  # the tuner state it holds now still drives a step


# ---- Drafter ----------------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int16, torch.int32,
          torch.int64, torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.bool, torch.float8_e4m3fn,
          torch.float8_e5m2, torch.float8_e4m3fnuz, torch.complex64]


@st.composite
def delta_payloads(draw, shapes: dict[str, tuple[int, ...]]) -> bytes:
    """The safetensors of a delta for the drafter, good or with one fault: random bytes, names missing or
    unknown, a wrong shape, another dtype, NaN / inf, huge values."""
    fault = draw(maybe_bad(st.just("none"), st.sampled_from(
        ["bytes", "missing", "unknown", "shape", "dtype", "dtypes", "nonfinite", "huge"]), 2))
    if fault == "bytes":
        return draw(st.one_of(st.binary(max_size=64), st.sampled_from([
            b"", b"\x00" * 8, b"\xff" * 8 + b"{}", (2).to_bytes(8, "little") + b"{}",
            (10**6).to_bytes(8, "little") + b"{}",
            (60).to_bytes(8, "little") + b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}',
            (44).to_bytes(8, "little") + b'{"a":{"dtype":"X9","shape":[],"data_offsets":[0,0]}}'])))
    names = sorted(shapes)
    tensors = {name: torch.randn(shapes[name]) * 1e-3 for name in names}
    victim = draw(st.sampled_from(names))
    if fault == "missing":
        for name in draw(st.lists(st.sampled_from(names), min_size=1, unique=True)):
            del tensors[name]
    elif fault == "unknown":
        tensors[draw(st.one_of(TEXT.filter(bool), st.just(victim + ".x")))] = torch.zeros(2)
    elif fault == "shape":
        tensors[victim] = torch.zeros(draw(st.lists(st.integers(0, 3), max_size=3)))
    elif fault == "dtype":
        tensors[victim] = tensors[victim].to(draw(st.sampled_from(DTYPES)))
    elif fault == "dtypes":
        dtype = draw(st.sampled_from(DTYPES))
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    elif fault == "nonfinite" and tensors[victim].numel():
        tensors[victim].view(-1)[draw(st.integers(0, tensors[victim].numel() - 1))] = draw(
            st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    elif fault == "huge":
        tensors[victim] = tensors[victim] * 1e30
    return save_safetensors(tensors)


@st.composite
def delta_streams(draw, shapes: dict[str, tuple[int, ...]]) -> list[drafter_pb2.DeltaChunk]:
    payload = draw(delta_payloads(shapes))
    cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=3)))
    pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)])]
    size = draw(maybe_bad(st.just(len(payload)), st.one_of(
        INT64, st.sampled_from([0, len(payload) + 1, max(len(payload) - 1, 0), -1, 2**40]))))
    worker = draw(maybe_bad(st.sampled_from(["w1", "w2"]), st.one_of(st.just(""), TEXT)))
    header = drafter_pb2.DeltaHeader(worker=worker, tokens=draw(maybe_bad(st.integers(1, 100), INT64)),
                                     base_version=draw(maybe_bad(st.just(0), INT64)), size_bytes=size)
    chunks = [drafter_pb2.DeltaChunk(data=p) for p in pieces]
    at = draw(maybe_bad(st.just("first"), st.sampled_from(["none", "middle", "last", "twice"])))
    if at == "first":
        chunks.insert(0, drafter_pb2.DeltaChunk(header=header))
    elif at == "middle":
        chunks.insert(len(chunks) // 2, drafter_pb2.DeltaChunk(header=header))
    elif at == "last":
        chunks.append(drafter_pb2.DeltaChunk(header=header))
    elif at == "twice":
        chunks[:0] = [drafter_pb2.DeltaChunk(header=header)] * 2
    if draw(st.integers(0, 7)) == 0:
        chunks.insert(draw(st.integers(0, len(chunks))), drafter_pb2.DeltaChunk())  # neither header nor data
    return chunks


@pytest.fixture(scope="module")
def drafter_shapes(cluster) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in cluster.aggregator.drafter.named_parameters()}


@fuzz(50)
@given(data=st.data())
def test_push_delta_and_publish(cluster, drafter_shapes, data):
    chunks = data.draw(delta_streams(drafter_shapes))
    answer(lambda: cluster.drafter.PushDelta(iter(chunks), timeout=TIMEOUT_S))
    still_serving(cluster)
    if data.draw(st.integers(0, 3)) == 0:
        before = cluster.drafter.LatestVersion(drafter_pb2.LatestVersionRequest(), timeout=TIMEOUT_S).version
        code, reply = answer(lambda: cluster.drafter.Publish(
            drafter_pb2.PublishDrafterRequest(step=data.draw(INT64)), timeout=TIMEOUT_S))
        assert code == grpc.StatusCode.OK
        assert reply.version == before + reply.published
        still_serving(cluster)


def _spot_worker(cluster: Cluster, drafter: RemoteDrafter, drafter_base=None) -> RolloutWorker:
    """A worker that trains its drafter online and pushes every step's delta to ``drafter`` over gRPC."""
    spec = job_spec_from_dict({
        "name": "spot", "output_dir": str(cluster.tmp / "spot"),
        "model": {"path": str(cluster.tmp / "model"), "dtype": "float32"},
        "rollout": {"max_running": 2, "speculative": {"mode": "adaptive", "strategies": ["2_1_3"]}},
        "drafter": {"init": "random", "online_training": True, "push_every": 1, "batch_size": 2,
                    "min_responses": 1},
        "store": {"uri": str(cluster.tmp / "store")},
    })
    model = load_model(cluster.tmp / "model", dtype="float32")
    worker = RolloutWorker("spot-worker", model, spec, new_drafter(model, seed=1), ArtifactStore(spec.store_uri),
                           push_delta=drafter.push_delta, drafter_base=drafter_base)
    worker.load_policy(-1)
    worker.load_drafter(-1)
    return worker


def _drafter_stint(worker: RolloutWorker, until: Callable[[], bool]) -> None:
    """One rollout step: two requests, then the drafter role (training on them) until ``until()``; re-raises
    what the step raised."""
    params = SamplingParams(max_new_tokens=6, seed=3)
    queue = RequestQueue([RolloutRequest(f"r{i}", [3, 4, 5 + i], params, 0) for i in range(2)])
    step_over = threading.Event()
    done: list[str] = []
    failed: list[BaseException] = []

    def on_result(request: RolloutRequest, out) -> None:
        done.append(request.request_id)
        if len(done) == 2:
            worker.set_role("drafter")  # the engine is empty: train on the two responses

    def run() -> None:
        try:
            worker.run_rollout(queue, on_result, step_over)
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while thread.is_alive() and not until() and time.monotonic() < deadline:
        time.sleep(0.05)
    step_over.set()
    thread.join(60)
    worker.set_role("rollout")
    assert not thread.is_alive(), "the step did not end"
    if failed:
        raise failed[0]
    assert until(), "the drafter stint did not get there within 60 s"


def test_push_delta_names_its_base_version_and_an_unpublished_one_is_refused(cluster, drafter_shapes):
    stub = cluster.drafter
    # The fuzz tests above may have merged huge (finite, so accepted) deltas into the master, on which training
    # overflows, and left more pending, which any Publish merges. So the pending ones are merged first, then
    # the master starts afresh; the Publish below makes it the version the spot workers start from.
    stub.Publish(drafter_pb2.PublishDrafterRequest(step=0), timeout=TIMEOUT_S)
    cluster.aggregator.drafter.reset_parameters(generator=torch.Generator().manual_seed(0))
    latest = cluster.aggregator.version
    payload = save_safetensors({name: torch.zeros(shape) for name, shape in drafter_shapes.items()})

    def push(base_version: int) -> drafter_pb2.PushDeltaResponse:
        header = drafter_pb2.DeltaHeader(worker="w-base", tokens=5, base_version=base_version, size_bytes=len(payload))
        return stub.PushDelta(iter([drafter_pb2.DeltaChunk(header=header), drafter_pb2.DeltaChunk(data=payload)]),
                              timeout=TIMEOUT_S)

    rejected = stub.Status(drafter_pb2.DrafterStatusRequest(), timeout=TIMEOUT_S).deltas_rejected
    with pytest.raises(grpc.RpcError) as info:
        push(latest + 1)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert f"base_version {latest + 1} is newer than the latest drafter version {latest}" in info.value.details()
    assert stub.Status(drafter_pb2.DrafterStatusRequest(), timeout=TIMEOUT_S).deltas_rejected == rejected + 1
    with pytest.raises(grpc.RpcError) as info:
        push(-1)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "base_version must be >= 0" in info.value.details()
    assert push(latest).pending_workers >= 1  # the current version, and an older one (asynchronous training)
    stub.Publish(drafter_pb2.PublishDrafterRequest(step=1), timeout=TIMEOUT_S)
    assert cluster.aggregator.version == latest + 1
    assert push(latest).pending_workers >= 1

    # a rollout worker's drafter-role stint sends the version it started from, through RemoteDrafter
    remote = RemoteDrafter(f"127.0.0.1:{cluster.servers['drafter'].port}")
    try:
        unpublished = cluster.aggregator.version + 5
        worker = _spot_worker(cluster, remote, drafter_base=lambda: (unpublished, cluster.aggregator.base()[1]))
        with pytest.raises(RpcError) as refused:
            _drafter_stint(worker, until=lambda: False)
        assert refused.value.code == grpc.StatusCode.NOT_FOUND
        assert f"base_version {unpublished} is newer" in str(refused.value)
        pushes = cluster.aggregator.status().total_pushes
        worker = _spot_worker(cluster, remote)  # starts from the newest version in the store
        _drafter_stint(worker, until=lambda: cluster.aggregator.status().total_pushes > pushes)
        assert cluster.aggregator.status().total_pushes > pushes
    finally:
        remote.close()


# ---- Trainer ----------------------------------------------------------------------------------------------


SAMPLE_FAULTS = {"prompt_ids": BAD_IDS, "response_ids": BAD_IDS, "group": INT32,
                 "reward": st.one_of(FLOATS, st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e300, 3e38])),
                 "num_samples": INT64, "header": st.sampled_from(["none", "middle", "last", "twice"]),
                 "empty_chunk": st.just(None)}


@st.composite
def train_streams(draw) -> list[trainer_pb2.TrainStepChunk]:
    """A header and good samples (ids inside the vocabulary, rewards in [-1, 1]), with faults."""
    samples = [trainer_pb2.Sample(prompt_ids=draw(GOOD_IDS), response_ids=draw(GOOD_IDS),
                                  reward=draw(st.one_of(st.floats(-1, 1), st.sampled_from([0.0, 1.0]))),
                                  group=draw(st.integers(0, 2))) for _ in range(draw(st.integers(0, 5)))]
    header = trainer_pb2.TrainStepHeader(step=draw(INT64), num_samples=len(samples))
    where, empty_chunk = "first", False
    for fault in draw(faults(sorted(SAMPLE_FAULTS))):
        value = draw(SAMPLE_FAULTS[fault])
        if fault == "num_samples":
            header.num_samples = draw(st.one_of(st.just(value), st.sampled_from(
                [0, -1, len(samples) + 1, max(len(samples) - 1, 0), 10**6, 10**6 + 1])))
        elif fault == "header":
            where = value
        elif fault == "empty_chunk":
            empty_chunk = True
        elif samples:
            sample = draw(st.sampled_from(samples))
            if fault in ("prompt_ids", "response_ids"):
                getattr(sample, fault)[:] = value
            else:
                setattr(sample, fault, value)
    chunks = [trainer_pb2.TrainStepChunk(sample=s) for s in samples]
    head = trainer_pb2.TrainStepChunk(header=header)
    if where == "first":
        chunks.insert(0, head)
    elif where == "middle":
        chunks.insert(len(chunks) // 2, head)
    elif where == "last":
        chunks.append(head)
    elif where == "twice":
        chunks[:0] = [head, head]
    if empty_chunk:
        chunks.insert(draw(st.integers(0, len(chunks))), trainer_pb2.TrainStepChunk())  # neither header nor sample
    return chunks


def _batch(*rewards: float) -> list[trainer_pb2.TrainStepChunk]:
    """One GRPO group with these rewards."""
    return [trainer_pb2.TrainStepChunk(header=trainer_pb2.TrainStepHeader(step=1, num_samples=len(rewards))),
            *[trainer_pb2.TrainStepChunk(sample=trainer_pb2.Sample(prompt_ids=[3, 4], response_ids=[5 + i, 6],
                                                                   reward=r, group=0)) for i, r in enumerate(rewards)]]


@fuzz(50)
@given(chunks=train_streams())
@example(chunks=_batch(float("inf"), 0.0, 1.0))  # NaN advantages would poison the policy
@example(chunks=_batch(1e300, 0.0, 1.0))
def test_train_step(cluster, chunks):
    code, reply = answer(lambda: cluster.trainer.TrainStep(iter(chunks), timeout=TIMEOUT_S))
    if code == grpc.StatusCode.OK:
        assert reply.optimizer_steps >= 1
    still_serving(cluster)


@fuzz(30)
@given(version=VERSIONS)
def test_publish_policy(cluster, version):
    code, reply = answer(lambda: cluster.trainer.PublishPolicy(trainer_pb2.PublishPolicyRequest(version=version),
                                                               timeout=TIMEOUT_S))
    assert (code == grpc.StatusCode.OK) <= (version >= 0)
    if code == grpc.StatusCode.OK:
        assert reply.version == version and reply.size_bytes > 0
    still_serving(cluster)


@pytest.fixture(scope="module")
def checkpoint_dirs(cluster) -> tuple[st.SearchStrategy[str], st.SearchStrategy[str]]:
    """(directories to save to, directories to load from): empty, NUL, too long, a file, below a file, garbage
    and half-written checkpoints, a non-empty directory that is no checkpoint, fresh directories.

    SaveCheckpoint replaces its directory, so it only ever gets paths inside this test's tmp directory (never a
    relative path either: the in-process trainer would write into the working directory); LoadCheckpoint
    only reads, so it also gets system paths."""
    root = cluster.tmp / "checkpoints"
    root.mkdir()
    (root / "a-file").write_text("not a directory")
    garbage = root / "garbage"
    garbage.mkdir()
    for name, content in (("model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}junk"),
                          ("optimizer.safetensors", b"junk"), ("trainer.json", b'{"format": 1, "step": "x"}')):
        (garbage / name).write_bytes(content)
    half = root / "half"
    half.mkdir()
    (half / "trainer.json").write_text(json.dumps({"format": 1, "step": 3}))
    other = root / "not-a-checkpoint"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    (root / "empty").mkdir()
    fixed = [str(p) for p in (root / "a-file", root / "a-file" / "below", garbage, half, other, root / "empty",
                              root / "missing", root, root / ("x" * 300), root / "nul\x00byte")]
    fixed += ["", "\x00", str(root) + "/" + "d/" * 2100]
    fresh = st.builds(lambda name: str(root / "fresh" / name), st.text("abc-_.é ", min_size=1, max_size=12))
    save = st.one_of(st.sampled_from(fixed), fresh)
    load = st.one_of(save, st.sampled_from(["/", "/dev/null", "/proc/self", "/proc/no-such-dir/ckpt", ".", "..",
                                            "relative/missing", "~"]), TEXT)
    return save, load


@fuzz(30)
@given(data=st.data())
def test_save_and_load_checkpoint(cluster, checkpoint_dirs, data):
    save_dirs, load_dirs = checkpoint_dirs
    precious = cluster.tmp / "checkpoints" / "not-a-checkpoint" / "precious.txt"
    directory = data.draw(save_dirs)
    saved, _ = answer(lambda: cluster.trainer.SaveCheckpoint(trainer_pb2.CheckpointRequest(directory=directory),
                                                             timeout=TIMEOUT_S))
    assert precious.read_text() == "keep me", "SaveCheckpoint replaced a directory that held no checkpoint"
    loaded, _ = answer(lambda: cluster.trainer.LoadCheckpoint(trainer_pb2.CheckpointRequest(directory=directory),
                                                              timeout=TIMEOUT_S))
    if saved == grpc.StatusCode.OK:
        assert loaded == grpc.StatusCode.OK, "a checkpoint just saved cannot be loaded"
    other = data.draw(load_dirs)
    answer(lambda: cluster.trainer.LoadCheckpoint(trainer_pb2.CheckpointRequest(directory=other), timeout=TIMEOUT_S))
    still_serving(cluster)


# ---- undecodable bytes on every method ---------------------------------------------------------------------

METHODS = {
    "rollout": {"Generate": "stream_stream", "SetRole": "unary_unary", "LoadPolicy": "unary_unary",
                "LoadDrafter": "unary_unary", "Progress": "unary_unary", "DrafterTraining": "unary_unary"},
    "drafter": {"PushDelta": "stream_unary", "LatestVersion": "unary_unary", "Publish": "unary_unary",
                "Status": "unary_unary"},
    "trainer": {"TrainStep": "stream_unary", "PublishPolicy": "unary_unary", "SaveCheckpoint": "unary_unary",
                "LoadCheckpoint": "unary_unary", "Status": "unary_unary"},
}
SERVICES = {"rollout": "tlt.v1.Rollout", "drafter": "tlt.v1.Drafter", "trainer": "tlt.v1.Trainer"}
# Not SaveCheckpoint: bytes that decode name an arbitrary directory, which it would replace (LoadCheckpoint takes
# the same message and only reads).
METHOD_LIST = [(s, m, kind) for s, methods in METHODS.items() for m, kind in methods.items() if m != "SaveCheckpoint"]
# Wire-format pieces: valid tags of every wire type, truncated varints / lengths, unknown field numbers.
WIRE = st.sampled_from([b"\x08\x01", b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x0a\x03abc", b"\x0a\x7f",
                        b"\x11" + b"\x00" * 8, b"\x15\x00\x00\xc0\x7f", b"\x12\x02\x08\x01", b"\x1a\x00",
                        b"\xf8\xff\xff\xff\x0f\x01", b"\x80", b"\x0b", b"\x0c", b"\x22\x80\x80\x80\x80\x10",
                        b"\xa2\x06\x01x", b"\x0a\x02\xc3\x28"])
RAW = st.one_of(st.binary(max_size=40), st.lists(WIRE, max_size=5).map(b"".join))


@fuzz(60)
@given(method=st.sampled_from(METHOD_LIST), messages=st.lists(RAW, min_size=1, max_size=3))
def test_undecodable_bytes_on_every_method(cluster, method, messages):
    """Raw bytes as requests. gRPC answers a message it cannot decode with INTERNAL "Exception deserializing
    request!" before any servicer code runs (the only INTERNAL allowed here); whatever decodes (unknown fields
    are skipped) must get a proper answer."""
    service, name, kind = method
    channel = cluster.channels[service]
    path = f"/{SERVICES[service]}/{name}"
    if kind == "unary_unary":
        def call():
            return channel.unary_unary(path)(messages[0], timeout=TIMEOUT_S)
    elif kind == "stream_unary":
        def call():
            return channel.stream_unary(path)(iter(messages), timeout=TIMEOUT_S)
    else:
        def call():
            return list(channel.stream_stream(path)(iter(messages), timeout=TIMEOUT_S))
    try:
        call()
        _event("OK")
    except grpc.RpcError as exc:
        _event(f"{exc.code().name}: {re.sub(r'[0-9]+', 'N', (exc.details() or '')[:40])}")
        decode_error = exc.code() == grpc.StatusCode.INTERNAL and "deserializ" in (exc.details() or "")
        if not decode_error:
            assert exc.code() not in BAD_CODES, f"{exc.code().name}: {exc.details()}"
            assert (exc.details() or "").strip()
    still_serving(cluster)
    cluster.rollout.SetRole(rollout_pb2.SetRoleRequest(role=common_pb2.ROLE_ROLLOUT), timeout=TIMEOUT_S)


def test_every_method_is_fuzzed():
    """A method added to a .proto must be added here (and get its own fuzz test above)."""
    for module, service in ((rollout_pb2, "rollout"), (drafter_pb2, "drafter"), (trainer_pb2, "trainer")):
        descriptor = module.DESCRIPTOR.services_by_name[SERVICES[service].split(".")[-1]]
        assert set(descriptor.methods_by_name) == set(METHODS[service])


def test_finite_weights_after_the_fuzzing(cluster):
    """Last: a good train step still gives finite numbers, and the policy and drafter versions the fuzzing left
    behind load into the worker and generate."""
    c = cluster
    samples = [trainer_pb2.Sample(prompt_ids=[3, 4, 5], response_ids=[6, 7], reward=float(i % 2), group=0)
               for i in range(4)]
    chunks = [trainer_pb2.TrainStepChunk(header=trainer_pb2.TrainStepHeader(step=1, num_samples=4)),
              *[trainer_pb2.TrainStepChunk(sample=s) for s in samples]]
    reply = c.trainer.TrainStep(iter(chunks), timeout=TIMEOUT_S)
    assert all(math.isfinite(v) for k, v in reply.metrics.items() if k != "lr"), dict(reply.metrics)
    for version in range(12_345, 12_400):  # the first version the fuzzing left free
        request = trainer_pb2.PublishPolicyRequest(version=version)
        code, _ = answer(lambda: c.trainer.PublishPolicy(request, timeout=TIMEOUT_S))  # noqa: B023 - called here
        if code == grpc.StatusCode.OK:
            break
    c.rollout.LoadPolicy(rollout_pb2.LoadVersionRequest(version=version), timeout=TIMEOUT_S)
    c.rollout.LoadDrafter(rollout_pb2.LoadVersionRequest(version=-1), timeout=TIMEOUT_S)  # what the pushes made
    assert c.worker.drafter_version == c.aggregator.version
    still_serving(c)
    for _ in range(3):
        good_generate(c)


def test_a_full_disk_is_resource_exhausted_and_publishes_nothing(cluster, monkeypatch):
    """The store's disk fills up (fsync reports ENOSPC, as delayed allocation does) under a trainer publish and
    a checkpoint: RESOURCE_EXHAUSTED with a message saying so, no version appears, and the service serves on."""
    import errno
    import os

    store = ArtifactStore(str(cluster.tmp / "store"))
    before = store.latest("policy").version

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    code, details = answer(lambda: cluster.trainer.PublishPolicy(
        trainer_pb2.PublishPolicyRequest(version=before + 1), timeout=TIMEOUT_S))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "No space left" in details, details
    monkeypatch.undo()
    assert store.latest("policy").version == before and before + 1 not in store.versions("policy")

    monkeypatch.setattr("tlt.trainer.policy.save_file", lambda *a, **k: no_space(0))
    code, details = answer(lambda: cluster.trainer.SaveCheckpoint(
        trainer_pb2.CheckpointRequest(directory=str(cluster.tmp / "full-disk-ckpt")), timeout=TIMEOUT_S))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "No space left" in details, details
    monkeypatch.undo()
    still_serving(cluster)
