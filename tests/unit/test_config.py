"""Job spec parsing: defaults, YAML, overrides, and errors that name the field."""

import dataclasses

import pytest

from tlt.config import JobSpec, apply_overrides, job_spec_from_dict, load_job_spec
from tlt.errors import ConfigError


def test_defaults_round_trip():
    spec = job_spec_from_dict({})
    assert spec == JobSpec()
    assert job_spec_from_dict(spec.to_dict()) == spec


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("steps: 3\nrollout:\n  workers: 3\n  speculative: {mode: always, strategy: '4_2_8'}\n"
                    "trainer:\n  grpo: {lr: 2.0e-5}\n")
    spec = load_job_spec(path, {"rollout.max_new_tokens": 64, "drafter.online_training": False})
    assert spec.steps == 3 and spec.rollout.workers == 3 and spec.rollout.max_new_tokens == 64
    assert spec.rollout.speculative.mode == "always" and spec.trainer.grpo.lr == 2e-5
    assert spec.drafter.online_training is False


@pytest.mark.parametrize(("data", "needle"), [
    ({"rollout": {"workers": 0}}, "rollout.workers must be >= 1"),
    ({"rollout": {"wokers": 2}}, "rollout.wokers: unknown field; did you mean 'workers'?"),
    ({"rollout": {"speculative": {"mode": "sometimes"}}}, "rollout.speculative.mode must be one of"),
    ({"rollout": {"speculative": {"strategy": "4-2-8"}}}, "rollout.speculative.strategy '4-2-8' is invalid"),
    ({"rollout": {"temperature": "hot"}}, "rollout.temperature must be a number"),
    ({"data": {"group_size": 1}}, "data.group_size must be >= 2"),
    ({"steps": True}, "steps must be an integer"),
    ({"drafter": {"online_training": "yes"}}, "drafter.online_training must be true or false"),
    ({"trainer": {"grpo": {"clip_ratio_low": 1.5}}}, "clip_ratio_low"),
    ({"rollout": []}, "rollout must be a mapping"),
])
def test_errors_name_the_field(data, needle):
    with pytest.raises(ConfigError) as info:
        job_spec_from_dict(data)
    assert needle in str(info.value)


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_job_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job_spec(bad)


def test_unquoted_strategy_gets_a_hint():
    with pytest.raises(ConfigError, match="quote it"):
        job_spec_from_dict({"rollout": {"speculative": {"strategy": 428}}})


def test_yaml_1_1_quirks_are_understood(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("rollout:\n  speculative: {mode: off}\ntrainer:\n  grpo: {lr: 1e-4}\n")
    spec = load_job_spec(path)
    assert spec.rollout.speculative.mode == "off" and spec.trainer.grpo.lr == 1e-4


def test_a_partial_section_keeps_the_other_defaults():
    # `--set trainer.grpo.lr=...` used to reset the job's mini-batches of 128 to one update a step.
    default = JobSpec().trainer.grpo
    assert (default.lr, default.mini_batch_size) == (1e-5, 128)
    spec = job_spec_from_dict(apply_overrides({}, {"trainer.grpo.lr": 2e-5}))
    assert spec.trainer.grpo == dataclasses.replace(default, lr=2e-5)
    spec = job_spec_from_dict({"trainer": {"workers": 2, "grpo": {"ppo_epochs": 2}}})
    assert spec.trainer.workers == 2 and spec.trainer.grpo == dataclasses.replace(default, ppo_epochs=2)


def test_an_unset_sd_batch_threshold_is_picked_by_device():
    from tlt.rollout.worker import make_tuner

    sd = JobSpec().rollout.speculative
    assert sd.sd_batch_threshold is None
    assert (sd.threshold_on("cpu"), sd.threshold_on("cuda")) == (8, 32)
    spec = job_spec_from_dict({})
    assert make_tuner(spec, "cpu").config.sd_batch_threshold == 8
    assert make_tuner(spec, "cuda").config.sd_batch_threshold == 32
    # a value that is set holds on every device; null is the default spelled out
    spec = job_spec_from_dict({"rollout": {"speculative": {"sd_batch_threshold": 20}}})
    assert make_tuner(spec, "cpu").config.sd_batch_threshold == make_tuner(spec, "cuda").config.sd_batch_threshold == 20
    assert job_spec_from_dict({"rollout": {"speculative": {"sd_batch_threshold": None}}}) == JobSpec()
    with pytest.raises(ConfigError, match=r"rollout.speculative.sd_batch_threshold must be >= 1 or null"):
        job_spec_from_dict({"rollout": {"speculative": {"sd_batch_threshold": 0}}})
