"""Rollout of the long-tailed demo workload: TLT next to what users would run instead, in one run.

Arms (same model, prompts, sampling settings and per-request seeds; every prompt admitted at once):

    hf              transformers ``generate``: one left-padded batch, sampling, EOS per sequence
    vllm            vLLM without speculative decoding (the baseline of the ratios)
    vllm-eagle3     vLLM, static EAGLE-3 SD: a chain of K drafts at every batch size, TLT's exported drafter
    vllm-schedule   vLLM with the batch-size SD schedule (``num_speculative_tokens_per_batch_size``) that
                    ``schedule_from_tuner`` derives from the bandit the tlt-adaptive arm learned in this run
    tlt-plain       TLT's native engine without SD (separates engine speed from SD)
    tlt-adaptive    TLT's native engine with adaptive SD (BEG-MAB over tree strategies, off above
                    ``--threshold`` running requests: by default 8, what a job on a CPU gets)

Both engines run compiled by default: vLLM with its own CPU default (dynamo traced once, inductor), TLT's
engine with ``torch.compile`` of its decode, verification and drafter forwards. ``--eager`` runs both
eagerly (vLLM ``enforce_eager``, which is also the TLT vLLM backend's default on CPU). Compilation happens
at engine start and in the warm-up and counts in the start time, not in the wall time. ``--quick`` runs
both eagerly unless ``--compile`` is given: compiling takes 25-40 s per TLT arm with a warm inductor cache
and ~3 min with a cold one, far more than the quick workload itself.

The workload is ``--steps`` rollout steps, each on new prompts (as successive RL steps; TLT's bandit
carries over from one to the next, as it does across RL steps). Each arm runs in a fresh process (the
vLLM arms share one, each with its own engine) so that imports, caches and freed memory of one arm do
not count for another. Wall time is the sum of the steps' generate calls after the engine started
and ran a short warm-up (both excluded; the start time is reported); summing over steps also averages
out which arm happened to sample the longest response (vLLM's samples differ from ours). Peak
memory is the highest proportional set size (PSS, so pages shared between processes count once)
summed over the arm's process tree (with ``--vllm-layout multiprocess``: vLLM's front end, engine core and
worker), sampled every 0.5 s from the engine start to the end of the timed steps.

``--rounds R`` repeats the whole comparison R times, interleaved: each round starts every arm's process
anew, in the opposite order to the round before (so a slow spell of the machine, which lasts minutes and
swings one arm's wall time up to 2x, does not fall on one arm). Ratios are then the median over rounds of
the round's own ratio (paired, as ``speculative.py`` does), and the table counts the rounds in which an
arm was slower than the baseline; wall time, acceptance and start time are medians, peak memory the
highest of any round. ``vllm-schedule`` takes the schedule from the latest ``tlt-adaptive`` run.

The vLLM arms need the ``vllm`` extra (run this in ``.venv-vllm``, README "vLLM backend"); without it
they are skipped and the ratios against vLLM are not printed. The baseline is vLLM at its fastest here:

* ``--vllm-layout one-process`` (default): front end, scheduler and model in this process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, vLLM's single-process executor). vLLM's default layout runs them as
  three processes (front end, engine core, worker), which on a 2-core machine fight over the cores: measured
  here, plain vLLM took 1.8-3.7 s on ``--quick`` that way and 1.31-1.47 s in one process (starts 17-22 s vs
  5-11 s). ``multiprocess`` keeps vLLM's default layout.
* vLLM's CPU default pins its model to all cores but one, which it keeps for the scheduler; on a 2-core
  machine that leaves it one, so by default this gives vLLM every core (``--vllm-cpus all``; ``auto`` keeps
  vLLM's own choice).

    python benchmarks/rollout_peers.py            # 3 steps x 64 prompts, up to 768 new tokens
    python benchmarks/rollout_peers.py --quick    # 2 steps x 16 prompts, up to 256 new tokens, eager engines
    python benchmarks/rollout_peers.py --rounds 3 # the comparison 3 times, interleaved; paired median ratios
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TLT_ARMS = ("tlt-adaptive", "tlt-plain")
VLLM_ARMS = ("vllm", "vllm-eagle3", "vllm-schedule")
ARMS = (*TLT_ARMS, *VLLM_ARMS, "hf")
BASELINE = "vllm"
# One sample (scan /proc, read smaps_rollup) costs ~3 ms of CPU, partly holding the GIL the native engine's
# decode loop needs: every 20 ms it slowed the in-process arms. Memory here grows and stays (weights, KV,
# allocator pools), so a coarse sample still sees the peak.
SAMPLE_INTERVAL_S = 0.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer prompts and tokens (same comparison)")
    ap.add_argument("--prompts", type=int, default=None, help="number of prompts (= the largest batch)")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--steps", type=int, default=None,
                    help="rollout steps, each on new prompts (default 3, --quick 2); the bandit learns across them")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the comparison this many times, arms interleaved; ratios are paired medians")
    ap.add_argument("--k", type=int, default=3, help="vLLM chain drafts (static arm; schedule buckets without data)")
    ap.add_argument("--threshold", type=int, default=None,
                    help="SD off above this many running requests (default: a job's CPU default, 8)")
    engines = ap.add_mutually_exclusive_group()
    engines.add_argument("--eager", action="store_true", help="run every engine eagerly (the default with --quick)")
    engines.add_argument("--compile", action="store_true",
                         help="compile every engine: TLT's torch.compile and vLLM's inductor compile (the default "
                              "without --quick)")
    ap.add_argument("--vllm-layout", choices=("one-process", "multiprocess"), default="one-process",
                    help="one-process: vLLM's front end, scheduler and model in one process (fastest on few cores); "
                         "multiprocess: vLLM's default three processes")
    ap.add_argument("--vllm-cpus", choices=("all", "auto"), default="all",
                    help="all: vLLM's engine uses every core; auto: vLLM's default (one kept for its scheduler)")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    ap.add_argument("--model", help="target model dir (default: the demo model, built once)")
    ap.add_argument("--drafter", help="EAGLE-3 drafter dir (default: the demo drafter, warmed up once)")
    ap.add_argument("--run-arms", help=argparse.SUPPRESS)  # internal: run these arms in this process
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def compiled_engines(args: argparse.Namespace) -> bool:
    """Whether the engines are compiled: ``--compile``, or a full run without ``--eager`` (``--quick`` runs
    eagerly, as compiling would take longer than its workload)."""
    return args.compile or not (args.eager or args.quick)


# ---- memory ---------------------------------------------------------------------------------------


def _descendants(root: int) -> list[int]:
    """``root`` and every process below it (from /proc's parent pids)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _pss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


class PeakMemory:
    """Highest PSS summed over this process and its descendants while the ``with`` block runs."""

    def __init__(self) -> None:
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self._take()
            if self._stop.wait(SAMPLE_INTERVAL_S):
                return

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._take()  # the end state too, however short the block was

    def _take(self) -> None:
        total = sum(_pss_bytes(pid) for pid in _descendants(os.getpid()))
        self.peak_bytes = max(self.peak_bytes, total)


# ---- arms (each in its own process) ----------------------------------------------------------------


def _timed(start_engine: Callable[[], Any], warm_up: Callable[[Any], Any], run: Callable[[Any, int], list[list[int]]],
           stats: Callable[[Any], dict[str, Any]], steps: int) -> dict[str, Any]:
    """Start an engine, warm it up, time ``run`` on it for each step; with the peak memory over all of it."""
    walls, tokens = [], []
    with PeakMemory() as memory:
        start = time.perf_counter()
        engine = start_engine()
        warm_up(engine)
        started = time.perf_counter()
        for step in range(steps):
            begin = time.perf_counter()
            tokens.extend(run(engine, step))
            walls.append(time.perf_counter() - begin)
    return {"wall_s": sum(walls), "walls": walls, "start_s": started - start, "tokens": tokens,
            "peak_mb": memory.peak_bytes / 2**20, **stats(engine)}


def _step_runner(work: Any) -> Callable[[Any, int], list[list[int]]]:
    """Generate step ``i`` of ``work`` on an engine with the native interface (ours or our vLLM wrapper)."""
    return lambda engine, step: [o.token_ids for o in engine.generate(*work.step(step))]


def _native_arm(arm: str, cfg: dict) -> dict[str, Any]:
    from workload import Workload

    from tlt.models import load_model
    from tlt.models.drafter_io import load_drafter
    from tlt.rollout.engine import RolloutEngine
    from tlt.rollout.tuner import BegMabTuner, TunerConfig

    work = Workload(**cfg["workload"])
    n = work.batch_size

    def start() -> RolloutEngine:
        target = load_model(work.model_dir, dtype=cfg["dtype"])
        if arm == "tlt-plain":
            return RolloutEngine(target, max_running=n, max_seq_len=work.max_seq_len(), compile=cfg["compile"])
        return RolloutEngine(target, max_running=n, max_seq_len=work.max_seq_len(), compile=cfg["compile"],
                             drafter=load_drafter(work.drafter_dir, target),
                             tuner=BegMabTuner(TunerConfig(sd_batch_threshold=cfg["threshold"])))

    def warm_up(engine: RolloutEngine) -> None:  # every step kind once (compiles the graphs); the bandit learns nothing
        engine.warm_up(work.prompts[0])

    def stats(engine: RolloutEngine) -> dict[str, Any]:
        tuner = engine.tuner
        return {"accept_len": engine.stats.acceptance_length if tuner else None,
                "tuner_state": tuner.export_state() if tuner else None,
                "tuner_best": {b: s["best"] for b, s in tuner.summary().items()} if tuner else None}

    return _timed(start, warm_up, _step_runner(work), stats, work.steps)


def _vllm_arm(arm: str, cfg: dict) -> dict[str, Any]:
    from workload import Workload

    from tlt.rollout.backends.vllm import VllmRolloutEngine, schedule_from_tuner
    from tlt.rollout.sampling import SamplingParams
    from tlt.rollout.tuner import BegMabTuner, TunerConfig

    work = Workload(**cfg["workload"])
    n, k = work.batch_size, cfg["k"]
    sd: dict[str, Any] = {}
    if arm == "vllm-eagle3":
        sd = {"drafter_dir": work.drafter_dir, "num_speculative_tokens": k}
    elif arm == "vllm-schedule":
        if cfg.get("tuner_state") is None:
            raise SystemExit("vllm-schedule derives its schedule from the tlt-adaptive arm's bandit: run that arm too")
        tuner = BegMabTuner.from_state(TunerConfig(sd_batch_threshold=cfg["threshold"]), cfg["tuner_state"])
        top_k, schedule = schedule_from_tuner(tuner, n, k, max_k=k)
        sd = {"drafter_dir": work.drafter_dir, "num_speculative_tokens": max(top_k, 1), "schedule": schedule}
    # KV room for every request at full length, as the native engine's static cache has (our vLLM default on
    # CPU is 1 GiB); vLLM's CPU blocks are 128 tokens, so one spare block per request
    kv_bytes = n * (work.max_seq_len() + 128) * kv_bytes_per_token(work.model_dir, cfg["dtype"], extra_layers=1)

    def start() -> VllmRolloutEngine:
        return VllmRolloutEngine(work.model_dir, max_running=n, max_seq_len=work.max_seq_len(), dtype=cfg["dtype"],
                                 seed=work.seed, kv_cache_bytes=kv_bytes, enforce_eager=not cfg["compile"], **sd)

    def warm_up(engine: VllmRolloutEngine) -> None:
        engine.generate(work.prompts[:4], SamplingParams(max_new_tokens=8))
        engine.stats.__init__()

    def stats(engine: VllmRolloutEngine) -> dict[str, Any]:
        out = {"accept_len": engine.stats.acceptance_length if engine.speculative else None,
               "schedule": engine.schedule, "k": engine.num_speculative_tokens}
        engine.close()
        return out

    return _timed(start, warm_up, _step_runner(work), stats, work.steps)


def kv_bytes_per_token(model_dir: str | Path, dtype: str, extra_layers: int = 0) -> int:
    """KV-cache bytes one token takes in the target's layers (+ ``extra_layers`` more of the same shape)."""
    import torch

    from tlt.models.config import ModelConfig
    from tlt.models.loader import parse_dtype

    config = ModelConfig.from_dir(model_dir)
    return (config.num_hidden_layers + extra_layers) * 2 * config.kv_size * torch.finfo(parse_dtype(dtype)).bits // 8


def _hf_arm(cfg: dict) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM
    from workload import Workload

    from tlt.models.loader import parse_dtype

    work = Workload(**cfg["workload"])

    eos: set[int] = set()

    def start() -> Any:
        model = AutoModelForCausalLM.from_pretrained(str(work.model_dir), dtype=parse_dtype(cfg["dtype"])).eval()
        ids = model.generation_config.eos_token_id
        eos.update([ids] if isinstance(ids, int) else ids or [])
        return model

    def generate(model: Any, prompts: list[list[int]], max_new: int, step: int = 0) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        pad = min(eos) if eos else 0
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        sampling = ({"do_sample": True, "temperature": work.temperature, "top_k": 0, "top_p": 1.0}
                    if work.temperature > 0 else {"do_sample": False})
        torch.manual_seed(work.seed + step)  # transformers has one random stream per batch, not per request
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, pad_token_id=pad, **sampling)
        responses = []
        for row in out[:, width:].tolist():  # up to and with the first EOS, as the other arms return them
            ends = [i for i, t in enumerate(row) if t in eos]
            responses.append(row[:ends[0] + 1] if ends else row)
        return responses

    return _timed(start, lambda model: generate(model, work.prompts[:4], 8),
                  lambda model, step: generate(model, work.step(step)[0], work.max_new_tokens, step),
                  lambda model: {"accept_len": None}, work.steps)


def run_arms(arms: list[str], cfg: dict) -> dict[str, dict[str, Any]]:
    """Run ``arms`` one after another in this process (the parent gives each family its own process)."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if cfg["vllm_layout"] == "one-process" else "1"
    if cfg["vllm_cpus"] == "all":
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}")
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    torch.manual_seed(cfg["workload"]["seed"])
    results = {}
    for arm in arms:
        if arm in TLT_ARMS:
            results[arm] = _native_arm(arm, cfg)
        elif arm in VLLM_ARMS:
            results[arm] = _vllm_arm(arm, cfg)
        else:
            results[arm] = _hf_arm(cfg)
    return results


# ---- the parent: one process per arm family, then the table -----------------------------------------


def _in_subprocess(arms: list[str], cfg: dict, tmp: Path) -> dict[str, dict[str, Any]]:
    config, out = tmp / "config.json", tmp / "out.json"
    config.write_text(json.dumps(cfg))
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--run-arms", ",".join(arms), "--config", str(config), "--out", str(out)]
    print(f"  running {', '.join(arms)} ...", flush=True)
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"arm(s) {', '.join(arms)} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def _have_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def main() -> int:
    args = parse_args()
    if args.run_arms:
        cfg = json.loads(Path(args.config).read_text())
        Path(args.out).write_text(json.dumps(run_arms(args.run_arms.split(","), cfg)))
        return 0

    sys.path.insert(0, str(Path(__file__).parent))
    from workload import long_tail_workload

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"--arms: unknown arm(s) {unknown}; choose from {','.join(ARMS)}")
    if "vllm-schedule" in arms and "tlt-adaptive" not in arms:
        raise SystemExit("--arms: vllm-schedule needs tlt-adaptive (its schedule comes from that arm's bandit)")
    if args.rounds < 1:
        raise SystemExit(f"--rounds: must be at least 1 (got {args.rounds})")
    if not _have_vllm() and any(a in VLLM_ARMS for a in arms):
        print("vLLM is not installed here: skipping the vLLM arms (install the vllm extra, README 'vLLM backend')")
        arms = [a for a in arms if a not in VLLM_ARMS]

    from tlt.rollout.tuner import default_sd_batch_threshold

    threshold = args.threshold if args.threshold is not None else default_sd_batch_threshold("cpu")
    compiled = compiled_engines(args)
    n_prompts = args.prompts or (16 if args.quick else 64)
    max_new = args.max_new_tokens or (256 if args.quick else 768)
    steps = args.steps or (2 if args.quick else 3)
    work = long_tail_workload(n_prompts, max_new, temperature=args.temperature, seed=args.seed,
                              model_dir=args.model, drafter_dir=args.drafter, steps=steps)
    cfg: dict[str, Any] = {
        "workload": {"model_dir": str(work.model_dir), "drafter_dir": str(work.drafter_dir),
                     "prompts": work.prompts, "temperature": work.temperature,
                     "max_new_tokens": work.max_new_tokens, "seed": work.seed, "steps": work.steps},
        "dtype": args.dtype, "k": args.k,
        "threshold": threshold, "vllm_cpus": args.vllm_cpus, "vllm_layout": args.vllm_layout,
        "tuner_state": None,
        "compile": compiled}
    print(f"model={work.model_dir} drafter={work.drafter_dir} dtype={args.dtype} cpus={os.cpu_count()} "
          f"vllm_cpus={args.vllm_cpus} vllm_layout={args.vllm_layout}")
    print(f"steps={steps} x prompts={n_prompts} (a step's prompts admitted at once) temperature={args.temperature} "
          f"max_new_tokens={max_new} K={args.k} threshold={threshold} "
          f"engines={'compiled' if compiled else 'eager'} rounds={args.rounds}")

    rounds = []
    for r in range(args.rounds):
        if args.rounds > 1:
            print(f"round {r + 1}/{args.rounds}", flush=True)
        rounds.append(run_round(arms, cfg, reverse=r % 2 == 1))
    print_report(rounds, args)
    return 0


def run_round(arms: list[str], cfg: dict, reverse: bool) -> dict[str, dict[str, Any]]:
    """Every arm once, each family in its own process, in ``ARMS`` order or (``reverse``) the opposite.

    ``cfg["tuner_state"]`` is updated by each tlt-adaptive run: vllm-schedule derives its schedule from it."""
    families = [[arm] for arm in ARMS if arm in arms and arm not in VLLM_ARMS]
    vllm_arms = [arm for arm in VLLM_ARMS if arm in arms]
    if vllm_arms:
        families.append(vllm_arms)
    if reverse:
        families.reverse()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            results.update(_in_subprocess(family, cfg, Path(tmp)))
            if "tlt-adaptive" in family:
                cfg["tuner_state"] = results["tlt-adaptive"]["tuner_state"]
    return results


def _median_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(rounds: list[dict[str, dict[str, Any]]], base_arm: str) -> dict[str, dict[str, Any]]:
    """Per arm over the rounds: median wall, start and acceptance, highest peak memory, and the ratios of the
    baseline's wall time to the arm's within each round (paired: a slow spell slows a round's arms alike)."""
    summary = {}
    for arm in rounds[0]:
        runs = [r[arm] for r in rounds]
        summary[arm] = {
            "wall_s": statistics.median(run["wall_s"] for run in runs),
            "walls": runs[0]["walls"] if len(runs) == 1 else [run["wall_s"] for run in runs],
            "ratios": [r[base_arm]["wall_s"] / r[arm]["wall_s"] for r in rounds],
            "tok_s": statistics.median(sum(map(len, run["tokens"])) / run["wall_s"] for run in runs),
            "tokens": runs[0]["tokens"],
            "accept_len": _median_or_none([run["accept_len"] for run in runs]),
            "peak_mb": max(run["peak_mb"] for run in runs),
            "start_s": statistics.median(run["start_s"] for run in runs),
        }
    return summary


def print_report(rounds: list[dict[str, dict[str, Any]]], args: argparse.Namespace) -> None:
    """The table of arms, the bandit's choices, the schedule vLLM got and the RESULT line."""
    last = rounds[-1]
    order = [a for a in ARMS if a in last]
    base_arm = BASELINE if BASELINE in last else order[0]
    results = summarize(rounds, base_arm)
    lengths = sorted(len(t) for t in results[order[0]]["tokens"])
    print(f"response lengths ({order[0]}): median {statistics.median(lengths):.0f}, "
          f"p90 {lengths[int(0.9 * len(lengths))]}, max {lengths[-1]}, total {sum(lengths)}")
    if "tlt-adaptive" in last:
        print(f"tlt-adaptive bandit, best arm per batch-size bucket (last round): {last['tlt-adaptive']['tuner_best']}")
    if "vllm-schedule" in last:
        sched = last["vllm-schedule"]
        print(f"vllm-schedule: K={sched['k']}, (first, last, K) = {sched['schedule']}")
    n = len(rounds)
    if n > 1:
        print(f"{n} interleaved rounds: wall s, tok/s, accept len and start s are medians, vs {base_arm} the median "
              f"of the per-round ratios, peak MB the highest; 'per round s' lists each round's wall time")
    spread_head = "per step s" if n == 1 else "per round s"
    print(f"{'arm':<14} | {'wall s':>7} | {spread_head:>14} | {'vs ' + base_arm:>12} | {'slower rounds':>13} | "
          f"{'tok/s':>7} | {'tokens':>6} | {'accept len':>10} | {'peak MB':>7} | {'start s':>7} | same tokens as")
    for arm in order:
        r = results[arm]
        total = sum(len(t) for t in r["tokens"])
        twin = "tlt-plain" if arm.startswith("tlt") else "vllm" if arm.startswith("vllm") else None
        same = (f"{twin} {sum(a == b for a, b in zip(r['tokens'], results[twin]['tokens'])) / len(r['tokens']):.0%}"
                if twin and twin != arm and twin in results else "")
        accept = f"{r['accept_len']:.2f}" if r["accept_len"] is not None else "-"
        spread = "/".join(f"{w:.1f}" for w in r["walls"])
        slower = "-" if arm == base_arm else f"{sum(x < 1 for x in r['ratios'])}/{n}"
        print(f"{arm:<14} | {r['wall_s']:>7.2f} | {spread:>14} | {statistics.median(r['ratios']):>11.2f}x | "
              f"{slower:>13} | {r['tok_s']:>7.1f} | {total:>6} | {accept:>10} | {r['peak_mb']:>7.0f} | "
              f"{r['start_s']:>7.1f} | {same}")
    fields = [f"speedup_{arm.replace('-', '_')}={statistics.median(results[arm]['ratios']):.2f}" for arm in order
              if arm != base_arm]
    if "tlt-adaptive" in last and "vllm-eagle3" in last:
        versus = [r["vllm-eagle3"]["wall_s"] / r["tlt-adaptive"]["wall_s"] for r in rounds]
        fields.append(f"tlt_vs_vllm_eagle3={statistics.median(versus):.2f}")
        if n > 1:
            print("tlt-adaptive vs vllm-eagle3 per round: " + " ".join(f"{v:.2f}" for v in versus))
    for arm in order:
        if results[arm]["accept_len"] is not None:
            fields.append(f"accept_len_{arm.replace('-', '_')}={results[arm]['accept_len']:.2f}")
    print(f"RESULT baseline={base_arm} rounds={n} " + " ".join(fields))


if __name__ == "__main__":
    sys.exit(main())
