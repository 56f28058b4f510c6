"""`tlt export-drafter` / `tlt export-policy`: published versions out of a job's store as deployable directories,
verified, atomically, with clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tlt.cli import main
from tlt.drafter.aggregator import publish_drafter
from tlt.drafter.warmup import new_drafter
from tlt.models import load_model
from tlt.models.drafter_io import drafter_state_dict, load_drafter
from tlt.store import ArtifactStore
from tlt.store.manifest import MANIFEST


@pytest.fixture(scope="module")
def tiny_target(peaky_model_dir):
    return load_model(peaky_model_dir, dtype="float32")


@pytest.fixture
def drafter_store(tmp_path, tiny_target) -> tuple[Path, list]:
    """A store with drafter v0 and v1 (different random weights), as the drafter service publishes them."""
    store = ArtifactStore(tmp_path / "store")
    drafters = [new_drafter(tiny_target, seed=seed) for seed in (0, 1)]
    for version, drafter in enumerate(drafters):
        publish_drafter(store, drafter, version, {"step": version} if version else {"source": "random"})
    return tmp_path / "store", drafters


def _export(kind: str, *args: str) -> int:
    return main([f"export-{kind}", *args])


def _same_weights(exported: Path, drafter, target) -> bool:
    loaded = drafter_state_dict(load_drafter(exported, target, dtype=torch.float32))
    expected = drafter_state_dict(drafter)
    # published in bf16: compare at that precision
    return loaded.keys() == expected.keys() and all(
        torch.equal(loaded[k].to(torch.bfloat16), expected[k].to(torch.bfloat16)) for k in expected)


def test_the_newest_drafter_exports_as_an_eagle3_model_and_any_version_on_request(drafter_store, tiny_target,
                                                                                   tmp_path, capsys):
    store, drafters = drafter_store
    assert _export("drafter", "--store", str(store), "--out", str(tmp_path / "newest")) == 0
    printed = capsys.readouterr().out
    assert f"exported drafter v1 (step 1) from {store}" in printed and '"method": "eagle3"' in printed
    config = json.loads((tmp_path / "newest" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert json.loads((tmp_path / "newest" / MANIFEST).read_text())["version"] == 1  # provenance kept
    assert _same_weights(tmp_path / "newest", drafters[1], tiny_target)
    assert not _same_weights(tmp_path / "newest", drafters[0], tiny_target)

    assert _export("drafter", "--store", str(store), "--version", "0", "--out", str(tmp_path / "v0")) == 0
    assert _same_weights(tmp_path / "v0", drafters[0], tiny_target)


def test_the_store_comes_from_the_job_spec_like_tlt_run(drafter_store, tmp_path):
    store, _ = drafter_store
    # `tlt run --output-dir D` publishes to D/store; the same flag finds it
    assert _export("drafter", "--output-dir", str(tmp_path), "--out", str(tmp_path / "a")) == 0
    config = tmp_path / "job.yaml"
    config.write_text(f"store:\n  uri: {store}\noutput_dir: {tmp_path / 'elsewhere'}\n")
    assert _export("drafter", str(config), "--out", str(tmp_path / "b")) == 0
    assert _export("drafter", "--set", f"store.uri={store}", "--out", str(tmp_path / "c")) == 0
    assert {(tmp_path / d / "model.safetensors").read_bytes() for d in "abc"} == {
        (store / "drafter" / "v00000001" / "model.safetensors").read_bytes()}


def test_an_existing_out_is_kept_unless_forced(drafter_store, tmp_path, capsys):
    store, _ = drafter_store
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert _export("drafter", "--store", str(store), "--out", str(out)) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    assert _export("drafter", "--store", str(store), "--out", str(out), "--force") == 0
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "config.json", "model.safetensors"]
    (tmp_path / "empty").mkdir()  # an empty directory is fine without --force
    assert _export("drafter", "--store", str(store), "--out", str(tmp_path / "empty")) == 0


def test_a_damaged_version_leaves_nothing_behind(drafter_store, tmp_path, capsys):
    store, _ = drafter_store
    weights = store / "drafter" / "v00000001" / "model.safetensors"
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert _export("drafter", "--store", str(store), "--out", str(tmp_path / "out")) == 2
    assert "does not match the manifest" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # no out, no staging directory


@pytest.mark.parametrize(("args", "message"), [
    (["--store", "{tmp}/nowhere"], "store {tmp}/nowhere does not exist; run the job first"),
    (["--store", "{tmp}/empty-store"], "holds no drafter versions (the drafter service publishes them when "
                                       "rollout.speculative.mode is adaptive or always)"),
    (["--store", "{store}", "--version", "5"], "drafter v5 is not in {store} (complete versions: [0, 1])"),
    (["--store", "{store}", "--version", "-1"], "--version must be >= 0, got -1"),
    (["--store", "{store}", "--out", "{tmp}/a-file/sub"], "--out: cannot write {tmp}/a-file/sub (File exists: "),
], ids=["missing-store", "no-versions", "unknown-version", "negative-version", "out-under-a-file"])
def test_bad_requests_are_one_clear_line(drafter_store, tmp_path, capsys, args, message):
    store, _ = drafter_store
    (tmp_path / "empty-store").mkdir()
    (tmp_path / "a-file").write_text("")
    fill = {"tmp": tmp_path, "store": store}
    assert _export("drafter", "--out", str(tmp_path / "out"), *[a.format(**fill) for a in args]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("tlt export-drafter: error: ") and message.format(**fill) in line
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "nowhere").exists()  # a mistyped store is not created


@pytest.fixture
def policy_store(tmp_path, demo_model_dir) -> tuple[Path, dict]:
    """A store with the demo model as policy v0 and a changed copy as v1, as the trainer publishes them."""
    store = ArtifactStore(tmp_path / "store")
    tensors = load_file(demo_model_dir / "model.safetensors")
    changed = {name: (t + 0.01 if name.endswith("norm.weight") else t) for name, t in tensors.items()}
    for version, state in enumerate((tensors, changed)):
        weights = tmp_path / f"w{version}.safetensors"
        save_file(state, weights)
        store.publish("policy", version, {"config.json": demo_model_dir / "config.json", "model.safetensors": weights},
                      metadata={"step": version})
    return tmp_path / "store", changed


def test_a_policy_exports_as_a_hugging_face_model_with_its_tokenizer(policy_store, demo_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store, changed = policy_store
    out = tmp_path / "policy"
    # the demo job (model.path: demo) trained it, so the tokenizer comes from the demo model
    assert _export("policy", "--store", str(store), "--out", str(out)) == 0
    assert f"exported policy v1 (step 1) from {store} to {out}: Hugging Face model (Qwen2ForCausalLM, tokenizer " \
           f"from {demo_model_dir})" in capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    reference = AutoTokenizer.from_pretrained(str(demo_model_dir))
    text = "Compute 3 *4 +5."
    assert tokenizer.encode(text) == reference.encode(text)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    norm = model.state_dict()["model.norm.weight"]
    assert torch.equal(norm, changed["model.norm.weight"].to(norm.dtype))
    assert (out / "generation_config.json").read_bytes() == (demo_model_dir / "generation_config.json").read_bytes()


def test_a_policy_from_another_model_is_refused_unless_without_tokenizer(policy_store, peaky_model_dir, tmp_path,
                                                                         capsys):
    store, _ = policy_store
    args = ["--store", str(store), "--set", f"model.path={peaky_model_dir}"]
    assert _export("policy", *args, "--out", str(tmp_path / "out")) == 2
    error = capsys.readouterr().err
    assert f"model.path: {peaky_model_dir} is not the model this policy was trained from (vocab_size" in error
    assert "--no-tokenizer" in error and not (tmp_path / "out").exists()
    assert _export("policy", *args, "--no-tokenizer", "--out", str(tmp_path / "out")) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MANIFEST, "config.json", "model.safetensors"]


def test_a_base_model_without_a_tokenizer_is_named(policy_store, demo_model_dir, tmp_path, capsys):
    store, _ = policy_store
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copyfile(demo_model_dir / "config.json", bare / "config.json")
    assert _export("policy", "--store", str(store), "--set", f"model.path={bare}", "--out", str(tmp_path / "o")) == 2
    assert f"model.path: {bare} has no tokenizer" in capsys.readouterr().err


def test_a_missing_base_model_names_no_tokenizer(policy_store, tmp_path, capsys):
    store, _ = policy_store
    args = ["--store", str(store), "--set", f"model.path={tmp_path / 'gone'}", "--out", str(tmp_path / "o")]
    assert _export("policy", *args) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert f"model.path: {tmp_path / 'gone'} is not a Hugging Face model directory" in line and "--no-tokenizer" in line
    assert _export("policy", *args, "--no-tokenizer") == 0
