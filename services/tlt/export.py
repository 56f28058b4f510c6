"""Export a job's published versions as deployable model directories (`tlt export-drafter`, `tlt export-policy`).

A drafter version is an EAGLE-3 draft model (``LlamaForCausalLMEagle3``: config.json + model.safetensors) that
vLLM loads as it is. A policy version is the trained model's config.json + model.safetensors; the export
adds the tokenizer and generation files of the job's base model, so that the directory is a complete Hugging Face
model. Files are fetched with the store's verification (each against its manifest, which is kept as provenance)
into a hidden sibling directory, renamed into place only when complete: an interrupted export leaves nothing at
``out``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from tlt.errors import ConfigError
from tlt.store import ArtifactStore
from tlt.store.kinds import DRAFTER_KIND, POLICY_KIND
from tlt.store.manifest import Manifest

# What a Hugging Face model directory holds besides its config and weights; copied from the base model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
_PUBLISHER = {
    DRAFTER_KIND: "the drafter service publishes them when rollout.speculative.mode is adaptive or always",
    POLICY_KIND: "the trainer publishes one per step",
}


def pick_version(store: ArtifactStore, kind: str, version: int | None) -> Manifest:
    """The manifest of ``version``, else of the newest complete version; a store without any is a ConfigError."""
    if version is not None:
        if version < 0:
            raise ConfigError(f"--version must be >= 0, got {version}")
        return store.manifest(kind, version)
    manifest = store.latest(kind)
    if manifest is None:
        raise ConfigError(f"the store {store.uri} holds no {kind} versions ({_PUBLISHER[kind]}); run the job first, "
                          "or point at its store (the job's CONFIG, --set store.uri=... or --store)")
    return manifest


def stored_config(store: ArtifactStore, manifest: Manifest) -> dict[str, Any]:
    """A version's config.json (verified), read before anything is fetched."""
    return json.loads(store.read_bytes(manifest.kind, manifest.version, "config.json"))


def export_drafter(store: ArtifactStore, out: str | Path, *, version: int | None = None,
                   force: bool = False) -> tuple[Manifest, dict[str, Any]]:
    """Export a drafter version (default: the newest) to ``out`` after checking it is an EAGLE-3 draft model;
    returns its manifest and config."""
    from tlt.models.drafter import DrafterConfig

    manifest = pick_version(store, DRAFTER_KIND, version)
    config = stored_config(store, manifest)
    DrafterConfig.from_hf_dict(config, f"{DRAFTER_KIND} v{manifest.version}/config.json")
    fetch_into(store, manifest, out, {}, force)
    return manifest, config


def export_policy(store: ArtifactStore, out: str | Path, base_model: Path | None, *, version: int | None = None,
                  force: bool = False) -> tuple[Manifest, dict[str, Any], list[str]]:
    """Export a policy version (default: the newest) to ``out`` with the tokenizer files of ``base_model`` (the
    job's model directory; None: weights and config alone); returns its manifest, config and the files added."""
    manifest = pick_version(store, POLICY_KIND, version)
    config = stored_config(store, manifest)
    extra = tokenizer_files(base_model, config) if base_model is not None else {}
    fetch_into(store, manifest, out, extra, force)
    return manifest, config, sorted(extra)


def fetch_into(store: ArtifactStore, manifest: Manifest, out: str | Path, extra_files: dict[str, Path],
               force: bool) -> Path:
    """Fetch ``manifest``'s version into ``out`` (verified) with ``extra_files`` (name -> source) added, atomically;
    ``force`` replaces an ``out`` that is not an empty directory."""
    out = Path(out)
    if out.exists() and not force and not (out.is_dir() and not any(out.iterdir())):
        raise ConfigError(f"--out: {out} exists and is not an empty directory; choose another directory or pass "
                          "--force to replace it")
    staging = out.parent / f".{out.name}.export-{uuid.uuid4().hex}"
    try:
        _stage_and_swap(store, manifest, out, staging, extra_files)
    except OSError as exc:
        raise ConfigError(f"--out: cannot write {out} ({exc.strerror or exc}: {exc.filename or out}); choose a "
                          "directory you can write to, with room for the model") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _stage_and_swap(store: ArtifactStore, manifest: Manifest, out: Path, staging: Path,
                    extra_files: dict[str, Path]) -> None:
    """Fetch into ``staging``, add ``extra_files``, then put ``staging`` in the place of ``out``."""
    store.fetch(manifest.kind, manifest.version, staging)
    for name, source in extra_files.items():
        shutil.copyfile(source, staging / name)
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex}"
        os.rename(out, old)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    os.rename(staging, out)


def tokenizer_files(model_dir: Path, policy_config: dict[str, Any]) -> dict[str, Path]:
    """The tokenizer and generation files of ``model_dir``, after checking that the policy was trained from that
    model (same architecture and vocabulary size), so that its tokenizer is the policy's."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"model.path: {model_dir} is not a Hugging Face model directory (no config.json), so the "
                          "policy's tokenizer cannot come from it; give the job's CONFIG, or pass --no-tokenizer")
    base = json.loads(config_path.read_text())
    for key in ("architectures", "vocab_size"):
        if base.get(key) != policy_config.get(key):
            raise ConfigError(
                f"model.path: {model_dir} is not the model this policy was trained from ({key} {base.get(key)!r} "
                f"there, {policy_config.get(key)!r} in the policy), so its tokenizer would be wrong; give the job's "
                "CONFIG (or --set model.path=...), or pass --no-tokenizer")
    files = {name: model_dir / name for name in TOKENIZER_FILES if (model_dir / name).is_file()}
    if not {"tokenizer.json", "tokenizer.model", "vocab.json"} & files.keys():
        raise ConfigError(f"model.path: {model_dir} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json); "
                          "pass --no-tokenizer to export the weights and config alone")
    return files


def origin(manifest: Manifest) -> str:
    """``"drafter v3 (step 3)"``."""
    step = manifest.metadata.get("step")
    return f"{manifest.kind} v{manifest.version}" + (f" (step {step})" if step is not None else "")
