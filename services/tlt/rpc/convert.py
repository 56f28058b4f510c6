"""Conversions between TLT's dataclasses and the tlt.v1 protobuf messages.

Every ``*_from_proto`` validates through the dataclass it builds, so a malformed request fails with
the same field-naming error as a bad config (and the server maps it to INVALID_ARGUMENT).
"""

from __future__ import annotations

import math

from tlt.drafter.spot import SpotReport
from tlt.errors import InvalidRequestError
from tlt.rollout.sampling import SamplingParams
from tlt.rollout.speculative import SpecDecodeStats
from tlt.rpc.v1 import common_pb2, rollout_pb2, trainer_pb2
from tlt.trainer.policy import Sample
from tlt_operator.planner import DRAFTER, ROLLOUT, Role

ROLE_TO_PROTO = {ROLLOUT: common_pb2.ROLE_ROLLOUT, DRAFTER: common_pb2.ROLE_DRAFTER}
ROLE_FROM_PROTO = {v: k for k, v in ROLE_TO_PROTO.items()}
# GRPO normalises rewards in float32 over the batch: beyond this, sums overflow into NaN advantages (and weights).
MAX_ABS_REWARD = 1e9


def role_from_proto(value: int) -> Role:
    if value not in ROLE_FROM_PROTO:
        raise InvalidRequestError(f"role must be ROLE_ROLLOUT or ROLE_DRAFTER, got {value}")
    return ROLE_FROM_PROTO[value]


def params_to_proto(p: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                                    max_new_tokens=p.max_new_tokens, stop_token_ids=list(p.stop_token_ids),
                                    ignore_eos=p.ignore_eos)
    if p.seed is not None:
        msg.seed = p.seed
    return msg


def params_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(temperature=msg.temperature, top_p=msg.top_p or 1.0, top_k=msg.top_k,
                          max_new_tokens=msg.max_new_tokens, stop_token_ids=tuple(msg.stop_token_ids),
                          ignore_eos=msg.ignore_eos, seed=msg.seed if msg.HasField("seed") else None)


def stats_to_proto(s: SpecDecodeStats) -> common_pb2.SpecDecodeStats:
    return common_pb2.SpecDecodeStats(
        num_drafts=s.num_drafts, num_draft_tokens=s.num_draft_tokens, num_accepted_tokens=s.num_accepted_tokens,
        accepted_per_position=list(s.accepted_per_position), sd_seconds=s.sd_seconds,
        plain_seconds=s.plain_seconds, sd_iterations=s.sd_iterations, plain_iterations=s.plain_iterations)


def stats_from_proto(msg: common_pb2.SpecDecodeStats) -> SpecDecodeStats:
    return SpecDecodeStats(
        num_drafts=msg.num_drafts, num_draft_tokens=msg.num_draft_tokens, num_accepted_tokens=msg.num_accepted_tokens,
        accepted_per_position=list(msg.accepted_per_position), sd_seconds=msg.sd_seconds,
        plain_seconds=msg.plain_seconds, sd_iterations=msg.sd_iterations, plain_iterations=msg.plain_iterations)


def report_to_proto(r: SpotReport) -> rollout_pb2.DrafterTrainingReport:
    msg = rollout_pb2.DrafterTrainingReport(steps=r.steps, tokens=r.tokens, pushes=r.pushes, seconds=r.seconds,
                                            preemptions=int(r.preempted), failed_pushes=r.failed_pushes)
    if r.last_loss is not None:
        msg.last_loss = r.last_loss
    return msg


def report_from_proto(msg: rollout_pb2.DrafterTrainingReport) -> SpotReport:
    return SpotReport(steps=msg.steps, tokens=msg.tokens, pushes=msg.pushes, seconds=msg.seconds,
                      last_loss=msg.last_loss if msg.HasField("last_loss") else None,
                      preempted=msg.preemptions > 0, failed_pushes=msg.failed_pushes)


def sample_to_proto(s: Sample) -> trainer_pb2.Sample:
    return trainer_pb2.Sample(prompt_ids=s.prompt_ids, response_ids=s.response_ids, reward=s.reward, group=s.group)


def sample_from_proto(msg: trainer_pb2.Sample) -> Sample:
    if not (math.isfinite(msg.reward) and abs(msg.reward) <= MAX_ABS_REWARD):
        raise InvalidRequestError(f"sample reward must be a finite number in [-{MAX_ABS_REWARD:g}, "
                                  f"{MAX_ABS_REWARD:g}], got {msg.reward}")
    return Sample(list(msg.prompt_ids), list(msg.response_ids), msg.reward, msg.group)
