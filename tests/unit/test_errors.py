"""Bad input gives a clear TLTError naming the problem, never a traceback from deep inside."""

from __future__ import annotations

import json
import shutil

import pytest

from tlt.errors import InvalidRequestError, ModelLoadError
from tlt.models import load_model
from tlt.rollout.engine import RolloutEngine
from tlt.rollout.sampling import SamplingParams


@pytest.fixture(scope="module")
def engine(peaky_model_dir):
    return RolloutEngine(load_model(peaky_model_dir, dtype="float32"), max_running=2, max_seq_len=64)


def test_empty_prompt(engine):
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        engine.submit([])


def test_prompt_longer_than_context(engine):
    with pytest.raises(InvalidRequestError, match=r"prompt has 80 tokens but max_seq_len is 64"):
        engine.submit([3] * 80)


def test_token_outside_vocabulary(engine):
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        engine.submit([3, 10_000])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"seed": "abc"}, "seed"),
        ({"stop_token_ids": (-4,)}, "stop_token_ids"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError, match=rf"sampling\.{field} must be"):
        SamplingParams(**kwargs)


def test_failed_submit_leaves_engine_usable(engine):
    with pytest.raises(InvalidRequestError):
        engine.submit([])
    out = engine.generate([[4, 5]], SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True))
    assert len(out[0].token_ids) == 2


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_model_dir(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_dir_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match=r"config\.json not found"):
        load_model(tmp_path)


def test_corrupt_config(peaky_model_dir, tmp_path):
    d = _copy(peaky_model_dir, tmp_path / "m")
    (d / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="is not valid JSON"):
        load_model(d)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("model_type", "gpt2", "model_type 'gpt2' is not supported"),
        ("hidden_size", None, "required field 'hidden_size' is missing"),
        ("num_key_value_heads", 3, "must be a multiple of num_key_value_heads"),
        ("hidden_act", "gelu", "hidden_act 'gelu' is not supported"),
    ],
)
def test_unsupported_config_fields(peaky_model_dir, tmp_path, field, value, message):
    d = _copy(peaky_model_dir, tmp_path / "m")
    raw = json.loads((d / "config.json").read_text())
    raw[field] = value
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match=message):
        load_model(d)


def test_missing_weights(peaky_model_dir, tmp_path):
    d = _copy(peaky_model_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"holds no .*safetensors"):
        load_model(d)


def test_truncated_weights(peaky_model_dir, tmp_path):
    d = _copy(peaky_model_dir, tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        load_model(d)


def test_weights_that_do_not_fit_the_config(peaky_model_dir, tmp_path):
    d = _copy(peaky_model_dir, tmp_path / "m")
    raw = json.loads((d / "config.json").read_text())
    raw["intermediate_size"] = raw["intermediate_size"] * 2
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match=r"has shape .* config\.json implies"):
        load_model(d)


def test_missing_tensor_is_named(peaky_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy(peaky_model_dir, tmp_path / "m")
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(d)


def test_unknown_dtype(peaky_model_dir):
    with pytest.raises(ModelLoadError, match="dtype 'float8' is not supported"):
        load_model(peaky_model_dir, dtype="float8")
