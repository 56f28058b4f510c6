"""Rollout wall time on a long-tailed workload: no SD vs SD always on vs adaptive SD (one run).

The workload (``workload.py``) is a batch of demo-task prompts (chain-of-thought lengths are
heavy-tailed) sampled at temperature 1 with the trained demo model and its warmed-up EAGLE-3 drafter
(both built once and cached under $TLT_HOME). All arms use the same prompts and per-request seeds; because speculative
acceptance consumes the request's random stream exactly like plain sampling, the arms generate the
same tokens (reported), so wall times compare equal work.

Arm (d), "adaptive SD, warm bandit", is (c) as it runs from the second RL step on: its bandit first learns
on a different set of prompts of the same size (untimed, as the previous step), then its exported state
starts the timed run on the same prompts as the other arms.

    python benchmarks/speculative.py            # 64 prompts, up to 768 new tokens
    python benchmarks/speculative.py --quick    # 24 prompts, up to 384 new tokens
    python benchmarks/speculative.py --compile  # engines torch.compiled, as with rollout.compile: true
    python benchmarks/speculative.py --device cuda   # on a GPU, engines with CUDA graphs

With ``--compile`` every engine is warmed up before its timed run (untimed): the first warm-up compiles the
graphs (~30 s), later engines in the process reuse them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prompts", type=int, default=None, help="number of prompts (= max batch)")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--strategy", default="4_2_8", help="fixed strategy of the SD-always arm")
    ap.add_argument("--threshold", type=int, default=None,
                    help="adaptive arm: SD off above this batch size (default: a job's default on --device, "
                         "8 on cpu, 32 on cuda)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (on cuda every engine replays CUDA graphs)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile every engine (rollout.compile); warm-ups, untimed, compile the graphs")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--repeats", type=int, default=3,
                    help="rounds over all arms (interleaved, each engine fresh); the median wall time is reported")
    ap.add_argument("--model", help="target model dir (default: the demo model, built once)")
    ap.add_argument("--drafter", help="EAGLE-3 drafter dir (default: the demo drafter, warmed up once)")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    from workload import long_tail_workload

    from tlt.models import load_model
    from tlt.models.drafter_io import load_drafter
    from tlt.rollout.engine import RolloutEngine
    from tlt.rollout.sampling import SamplingParams
    from tlt.rollout.tuner import BegMabTuner, SpecStrategy, TunerConfig, default_sd_batch_threshold

    if args.threshold is None:
        args.threshold = default_sd_batch_threshold(torch.device(args.device).type)
    n_prompts = args.prompts or (24 if args.quick else 64)
    max_new = args.max_new_tokens or (384 if args.quick else 768)
    work = long_tail_workload(n_prompts, max_new, temperature=args.temperature, seed=args.seed,
                              model_dir=args.model, drafter_dir=args.drafter)
    model_dir, drafter_dir, prompts, params = work.model_dir, work.drafter_dir, work.prompts, work.sampling_params()
    target = load_model(model_dir, dtype=args.dtype, device=args.device)
    drafter = load_drafter(drafter_dir, target)

    def new_engine(**kwargs) -> RolloutEngine:
        made = RolloutEngine(target, max_running=n_prompts, compile=args.compile, **kwargs)
        if args.compile:
            made.warm_up(prompts[0])
        return made

    arms = {
        "no SD": lambda: new_engine(),
        f"SD always ({args.strategy})": lambda: new_engine(
            drafter=drafter,
            tuner=BegMabTuner(TunerConfig(sd_batch_threshold=10**6, strategies=[SpecStrategy.parse(args.strategy)],
                                          allow_sd_off_arm=False))),
        "adaptive SD": lambda: new_engine(drafter=drafter,
                                          tuner=BegMabTuner(TunerConfig(sd_batch_threshold=args.threshold))),
        "adaptive SD, warm bandit": lambda: new_engine(
            drafter=drafter,
            tuner=BegMabTuner.from_state(TunerConfig(sd_batch_threshold=args.threshold),
                                         previous_step_bandit(new_engine, drafter, n_prompts, max_new, args))),
    }
    RolloutEngine(target, max_running=4).generate(prompts[:4], SamplingParams(max_new_tokens=8))  # warm-up
    print(f"model={model_dir} drafter={drafter_dir} dtype={args.dtype} device={args.device} "
          f"threads={torch.get_num_threads()} threshold={args.threshold} "
          f"engines={'compiled' if args.compile else 'eager'}")
    print(f"prompts={n_prompts} (all admitted at once) temperature={args.temperature} max_new_tokens={max_new}")
    walls: dict[str, list[float]] = {name: [] for name in arms}
    results = {}
    reference = None
    # Interleaved rounds: a noisy neighbour slows every arm of a round alike, and the median drops outliers.
    for _ in range(args.repeats):
        for name, make in arms.items():
            engine = make()
            start = time.perf_counter()
            outs = engine.generate(prompts, params)
            walls[name].append(time.perf_counter() - start)
            tokens = [o.token_ids for o in outs]
            reference = reference or tokens
            same = sum(a == b for a, b in zip(tokens, reference)) / n_prompts
            results[name] = (statistics.median(walls[name]), engine.stats, tokens, same)
    lengths = sorted(len(t) for t in reference)
    print(f"response lengths: median {statistics.median(lengths):.0f}, p90 {lengths[int(0.9 * len(lengths))]}, "
          f"max {lengths[-1]}, total {sum(lengths)}")
    # Speedup: the median over rounds of (no-SD wall / arm wall) within the round, so that a slow spell of
    # the machine, which slows one round's arms alike, cancels; "slower rounds" counts rounds below 1.
    speedups = {name: [b / w for b, w in zip(walls["no SD"], ws)] for name, ws in walls.items()}
    print(f"wall s: median of {args.repeats} interleaved rounds; speedup: median of the per-round ratios; "
          "stats of the last round")
    print(f"{'arm':<24} | {'wall s':>7} | {'speedup':>7} | {'slower rounds':>13} | {'tok/s':>7} | "
          f"{'accept len':>10} | {'SD time':>7} | same tokens as no SD | all rounds s")
    for name, (wall, stats, tokens, same) in results.items():
        total = sum(len(t) for t in tokens)
        sd_share = stats.sd_seconds / max(stats.sd_seconds + stats.plain_seconds, 1e-9)
        slower = f"{sum(r < 1 for r in speedups[name])}/{args.repeats}" if name != "no SD" else "-"
        print(f"{name:<24} | {wall:>7.2f} | {statistics.median(speedups[name]):>7.2f} | {slower:>13} | "
              f"{total / wall:>7.1f} | "
              f"{stats.acceptance_length:>10.2f} | {sd_share:>6.0%} | {same:>19.0%} | "
              + " ".join(f"{w:.2f}" for w in walls[name]))
    (always_name, always), (adaptive_name, adaptive), (warm_name, _) = list(results.items())[1:]
    print(f"RESULT speedup_always={statistics.median(speedups[always_name]):.2f} "
          f"speedup_adaptive={statistics.median(speedups[adaptive_name]):.2f} "
          f"speedup_adaptive_warm={statistics.median(speedups[warm_name]):.2f} "
          f"accept_len_always={always[1].acceptance_length:.2f} "
          f"accept_len_adaptive={adaptive[1].acceptance_length:.2f}")


def previous_step_bandit(new_engine, drafter, n_prompts: int, max_new: int, args: argparse.Namespace) -> dict:
    """The adaptive arm's bandit state after a rollout of ``n_prompts`` other prompts (an earlier RL step), on
    an engine from ``new_engine(**kwargs)`` (eager or compiled like the timed ones: the bandit learns their speeds)."""
    from workload import long_tail_workload

    from tlt.rollout.tuner import BegMabTuner, TunerConfig

    earlier = long_tail_workload(n_prompts, max_new, temperature=args.temperature, seed=args.seed + 1,
                                 model_dir=args.model, drafter_dir=args.drafter)
    tuner = BegMabTuner(TunerConfig(sd_batch_threshold=args.threshold))
    new_engine(drafter=drafter, tuner=tuner).generate(earlier.prompts, earlier.sampling_params())
    return tuner.export_state()


if __name__ == "__main__":
    main()
