"""The typed RL job spec: one source of truth for `tlt run CONFIG`, the RLJob CRD and the services.

Every section is a frozen dataclass validated on construction; :func:`load_job_spec` reads YAML and
reports the first problem with its full field path (``rollout.workers must be >= 1, got 0``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tlt.errors import ConfigError
from tlt.rollout.tuner import DEFAULT_STRATEGIES, SpecStrategy, default_sd_batch_threshold
from tlt.specparse import from_dict, to_dict
from tlt.trainer.grpo import GRPOConfig

SpecMode = Literal["adaptive", "always", "off"]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class ModelSpec:
    """The policy to train: ``path`` is an HF model directory, or ``demo`` (built locally on first use).

    ``device``: where the native rollout workers run the policy (and their drafter): ``auto`` picks a CUDA
    device when torch sees one, else the CPU. The trainer and the drafter service compute on the CPU.
    """

    path: str = "demo"
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass(frozen=True)
class DataSpec:
    """Prompts: ``source`` is ``demo`` (the synthetic task) or a JSONL/Parquet file (veRL layout).

    The held-out reward is measured with one seeded sample per held-out prompt at ``eval_temperature``
    (default: the rollout temperature, i.e. the policy RL optimises; 0 = greedy).
    """

    source: str = "demo"
    prompts_per_step: int = 32
    group_size: int = 8
    heldout: int = 256
    eval_every: int = 4
    reward: Literal["auto", "demo", "math"] = "auto"
    eval_temperature: float | None = None

    def __post_init__(self) -> None:
        _require(self.prompts_per_step >= 1, f"prompts_per_step must be >= 1, got {self.prompts_per_step}")
        _require(self.group_size >= 2, f"group_size must be >= 2 (GRPO compares responses), got {self.group_size}")
        _require(self.heldout >= 0, f"heldout must be >= 0, got {self.heldout}")
        _require(self.eval_every >= 0, f"eval_every must be >= 0 (0 = only before and after), got {self.eval_every}")
        _require(self.eval_temperature is None or self.eval_temperature >= 0,
                 f"eval_temperature must be >= 0 (0 = greedy) or null, got {self.eval_temperature}")


@dataclass(frozen=True)
class SpeculativeSpec:
    """Speculative decoding: ``adaptive`` (BEG-MAB), ``always`` (fixed ``strategy``) or ``off``.

    ``sd_batch_threshold``: SD is off while more requests than this decode at once (``adaptive`` only).
    Null (the default) picks it by the device the target runs on: 32 on a GPU (the paper's setting), 8 on
    a CPU (measured: README, *Benchmarks*).
    """

    mode: SpecMode = "adaptive"
    strategy: str = "3_2_6"
    sd_batch_threshold: int | None = None
    strategies: tuple[str, ...] = DEFAULT_STRATEGIES

    def __post_init__(self) -> None:
        for name in (self.strategy, *self.strategies):
            try:
                SpecStrategy.parse(name)
            except (ConfigError, ValueError) as exc:
                raise ConfigError(f"strategy '{name}' is invalid: {exc} (write depth_topk_verify, e.g. 3_2_6)"
                                  ) from None
        _require(self.sd_batch_threshold is None or self.sd_batch_threshold >= 1,
                 f"sd_batch_threshold must be >= 1 or null (by device: 32 on a GPU, 8 on a CPU), "
                 f"got {self.sd_batch_threshold}")

    def threshold_on(self, device_type: str) -> int:
        """The effective ``sd_batch_threshold`` for a target on ``device_type`` (``torch.device.type``)."""
        if self.sd_batch_threshold is not None:
            return self.sd_batch_threshold
        return default_sd_batch_threshold(device_type)


@dataclass(frozen=True)
class RolloutSpec:
    """Rollout workers and sampling. ``backend``: ``native`` (our engine) or ``vllm`` (the optional vLLM
    backend: chain drafts on a fixed batch-size schedule, no drafter training on its workers). ``compile``:
    the native engine ``torch.compile``s its decode and verification forwards, drafter catch-up and tree
    expansion when a worker starts; the vLLM backend runs vLLM compiled (``enforce_eager=False``: dynamo and
    inductor, plus CUDA graphs on GPU). False keeps each backend's default: native eager; vLLM eager on CPU
    (faster start), compiled on GPU."""

    workers: int = 2
    max_running: int = 64
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    speculative: SpeculativeSpec = field(default_factory=SpeculativeSpec)
    backend: Literal["native", "vllm"] = "native"
    compile: bool = False

    def __post_init__(self) -> None:
        _require(self.workers >= 1, f"workers must be >= 1, got {self.workers}")
        _require(self.max_running >= 1, f"max_running must be >= 1, got {self.max_running}")
        _require(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _require(self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        _require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class DrafterSpec:
    """The Adaptive Drafter: initial weights and online training on idle rollout workers.

    ``init``: ``demo`` (offline warm-up on the demo model, cached), ``random``, or an EAGLE-3 directory.
    """

    init: str = "demo"
    online_training: bool = True
    lr: float = 5e-4
    batch_size: int = 8
    push_every: int = 8
    min_responses: int = 4
    buffer_responses: int = 512
    ttt_steps: int = 4
    train_during_update: bool = False
    outer_lr: float = 1.0

    def __post_init__(self) -> None:
        _require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _require(self.push_every >= 1, f"push_every must be >= 1, got {self.push_every}")
        _require(self.min_responses >= 1, f"min_responses must be >= 1, got {self.min_responses}")
        _require(self.buffer_responses >= self.batch_size,
                 f"buffer_responses must be >= batch_size ({self.batch_size}), got {self.buffer_responses}")
        _require(1 <= self.ttt_steps <= 8, f"ttt_steps must be in [1, 8], got {self.ttt_steps}")
        _require(0 < self.outer_lr <= 2, f"outer_lr must be in (0, 2], got {self.outer_lr}")


@dataclass(frozen=True)
class TrainerSpec:
    """Policy training: GRPO settings and the number of data-parallel workers.

    The default GRPO settings (lr 1e-5, two optimizer updates per step) are set for the small demo
    model; real models want lr around 1e-6.
    """

    workers: int = 1
    grpo: GRPOConfig = field(default_factory=GRPOConfig)

    def __post_init__(self) -> None:
        _require(self.workers >= 1, f"workers must be >= 1, got {self.workers}")


@dataclass(frozen=True)
class StoreSpec:
    """Where policy and drafter versions live: a path / ``file://`` URL (default: under output_dir) or ``s3://``."""

    uri: str = ""
    keep: int = 3

    def __post_init__(self) -> None:
        _require(self.keep >= 1, f"keep must be >= 1, got {self.keep}")


@dataclass(frozen=True)
class JobSpec:
    """A whole RL job."""

    name: str = "demo"
    seed: int = 0
    steps: int = 8
    output_dir: str = "runs/demo"
    threads: int = 0
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    rollout: RolloutSpec = field(default_factory=RolloutSpec)
    drafter: DrafterSpec = field(default_factory=DrafterSpec)
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    store: StoreSpec = field(default_factory=StoreSpec)

    def __post_init__(self) -> None:
        _require(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        _require(self.threads >= 0, f"threads must be >= 0 (0 = all cores), got {self.threads}")
        _require(bool(self.name.strip()), "name must not be empty")

    @property
    def store_uri(self) -> str:
        return self.store.uri or str(Path(self.output_dir) / "store")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def job_spec_from_dict(data: Any) -> JobSpec:
    """Validate a spec given as a dict (YAML document, CRD ``spec``, RPC payload)."""
    return from_dict(JobSpec, data)


def load_job_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> JobSpec:
    """Read a YAML job spec; ``overrides`` (dotted keys such as ``rollout.workers``) win over the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path} is not valid YAML: nested too deeply") from None
    except (ValueError, LookupError, AttributeError, TypeError) as exc:  # not UTF-8; PyYAML on `!!int x`, huge ints
        raise ConfigError(f"{path} is not valid YAML: {type(exc).__name__}: {exc}") from None
    return job_spec_from_dict(apply_overrides(data, overrides or {}))


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``rollout.speculative.mode``) in a nested dict, creating sections as needed."""
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a mapping of sections, got {type(data).__name__}")
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = dotted.split(".")
        for key in parents:
            child = node.get(key)
            node[key] = dict(child) if isinstance(child, dict) else {}
            node = node[key]
        node[leaf] = value
    return out
