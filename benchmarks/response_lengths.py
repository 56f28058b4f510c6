"""Response-length distribution of a model on held-out demo-task problems, as an ASCII histogram.

Samples one response per problem with the native engine (temperature 1 by default, as RL rollouts
do) and prints accuracy, mean / median / p90 / p99 / max length in tokens (EOS included) and a
fixed-width histogram. Lengths are long-tailed because the number of reasoning steps is.

    python benchmarks/response_lengths.py                      # the demo model, 200 problems
    python benchmarks/response_lengths.py --problems 500 --bin-width 32
    python benchmarks/response_lengths.py --summary            # print the build's recorded histogram
    python benchmarks/response_lengths.py --reference          # lengths of the correct traces instead
    python benchmarks/response_lengths.py --quick              # 48 problems

Every mode ends with a ``RESULT`` line: accuracy (sampled modes), median / p90 / max length, the tail ratios
p90 / median and max / median, and (sampled modes) the median length over that of the problems' correct
solution traces, computed here from the same problems (the baseline: what a perfect solver would write).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: the demo model)")
    ap.add_argument("--problems", type=int, default=None, help="held-out problems (default 200, --quick 48)")
    ap.add_argument("--quick", action="store_true", help="fewer problems (48), same measurement")
    ap.add_argument("--seed", type=int, default=0, help="problems come from seed + 1_000_000_007 (held out)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--bin-width", type=int, default=16)
    ap.add_argument("--width", type=int, default=50, help="length of the longest bar")
    ap.add_argument("--summary", action="store_true", help="print the histogram recorded in training_summary.json")
    ap.add_argument("--reference", action="store_true", help="lengths of the correct solution traces (no model)")
    return ap.parse_args()


def result_line(stats: dict, accuracy: float | None = None, reference: dict | None = None) -> str:
    """The closing ``RESULT`` line: length quantiles, tail ratios and, if given, accuracy and the median's ratio
    to the reference traces' median."""
    fields = [] if accuracy is None else [f"accuracy={accuracy:.3f}"]
    fields += [f"median={stats['median']:g}", f"p90={stats['p90']}", f"max={stats['max']}",
               f"p90_over_median={stats['p90'] / stats['median']:.2f}",
               f"max_over_median={stats['max'] / stats['median']:.2f}"]
    if reference is not None:
        fields.append(f"median_vs_reference={stats['median'] / reference['median']:.2f}")
    return "RESULT " + " ".join(fields)


def main() -> int:
    args = parse_args()
    if args.problems is None:
        args.problems = 48 if args.quick else 200
    if args.problems < 1:
        raise SystemExit(f"--problems: must be at least 1 (got {args.problems})")
    import torch

    from tlt.data.demo_task import generate_problems, solution_trace
    from tlt.models.demo import ensure_demo_model
    from tlt.models.demo_training import EVAL_SEED_OFFSET, SUMMARY_FILE, ascii_histogram, evaluate, length_stats

    torch.set_num_threads(min(2, torch.get_num_threads()))
    problems = generate_problems(args.problems, args.seed + EVAL_SEED_OFFSET)
    reference = length_stats([len(solution_trace(p)) + 1 for p in problems], args.bin_width)
    if args.reference:
        print(f"reference traces of {args.problems} held-out problems")
        print(ascii_histogram(reference, args.width))
        print(result_line(reference))
        return 0
    model_dir = args.model or ensure_demo_model()
    if args.summary:
        path = model_dir / SUMMARY_FILE
        if not path.exists():
            print(f"{path} does not exist", file=sys.stderr)
            return 2
        ev = json.loads(path.read_text())["eval"]
        print(f"{model_dir}: sampled at T=1 on {ev['problems']} held-out problems, "
              f"accuracy {ev['sampled_accuracy_t1']:.1%} (greedy {ev['greedy_accuracy']:.1%})")
        print(ascii_histogram(ev["sampled_response_lengths_t1"], args.width))
        print(result_line(ev["sampled_response_lengths_t1"], ev["sampled_accuracy_t1"]))
        return 0

    from tlt.models import load_model

    model = load_model(model_dir, dtype=args.dtype)
    result = evaluate(model, problems, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                      seed=args.seed)
    print(f"{model_dir}: T={args.temperature} on {args.problems} held-out problems, accuracy {result.accuracy:.1%}, "
          f"{result.truncated} hit max_new_tokens")
    stats = length_stats(result.lengths, args.bin_width)
    print(ascii_histogram(stats, args.width))
    print(result_line(stats, result.accuracy, reference))
    return 0


if __name__ == "__main__":
    sys.exit(main())
