"""The ``tlt`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tlt.cli_export import add_export
from tlt.cli_run import add_report, add_run, add_serve
from tlt.data.demo_task import format_prompt
from tlt.drafter.train_config import DrafterTrainConfig
from tlt.errors import ConfigError, TLTError

# Demo-task problems (tlt.data.demo_task): left-to-right arithmetic, answered with a chain of thought.
DEMO_PROMPTS = tuple(format_prompt(start, ops) for start, ops in
                     ((5, ["+7"]), (3, ["*4", "+5"]), (9, ["-2", "*2", "+6", "-1"])))


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate completions for prompts with the native engine")
    p.add_argument("--model", type=Path, help="HF model directory (default: the demo model, built on first use)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompts", type=Path, help="file with one prompt per line, or JSONL with a 'prompt' field")
    src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-running", type=int, default=64, help="continuous-batching slots")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (default on CPU) or float32")
    p.add_argument("--drafter", type=Path,
                   help="EAGLE-3 drafter directory (tlt export-drafter, tlt train-drafter): lossless speculative "
                        "decoding, adaptive (BEG-MAB) unless --sd-strategy")
    p.add_argument("--sd-strategy", metavar="D_K_N",
                   help="with --drafter: speculate at every batch size with this tree, e.g. 3_2_6")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.set_defaults(func=cmd_generate)


def _add_build_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build-demo-model", help="build the small demo model and tokenizer locally (no download)")
    p.add_argument("--out", type=Path, help="output directory (default: $TLT_HOME/models/demo)")
    p.add_argument("--force", action="store_true", help="rebuild even if it exists")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default: $TLT_DEMO_TRAIN_STEPS, else the full build, ~9 min on 2 cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, training data and evaluation")
    p.add_argument("--eval-problems", type=int, default=None,
                   help="held-out problems to evaluate after training (default: $TLT_DEMO_EVAL_PROBLEMS, else 200)")
    p.set_defaults(func=cmd_build_demo_model)


def _add_train_drafter(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-drafter", help="offline EAGLE-3 drafter warm-up on the target's own responses")
    p.add_argument("--model", type=Path, help="target HF model directory (default: the demo model)")
    p.add_argument("--out", type=Path, help="output EAGLE-3 directory (default: $TLT_HOME/models/demo-drafter)")
    p.add_argument("--prompts", type=Path, help="prompt file (text or JSONL); default: demo-task prompts")
    p.add_argument("--num-prompts", type=int, default=512, help="demo-task prompts to answer")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--steps", type=int, default=DrafterTrainConfig.steps)
    p.add_argument("--batch-size", type=int, default=DrafterTrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=DrafterTrainConfig.lr)
    p.add_argument("--ttt-steps", type=int, default=DrafterTrainConfig.ttt_steps,
                   help="unrolled draft steps in the loss (training-time test)")
    p.add_argument("--aux-layers", help="three target layer ids, e.g. 2,4,5 (default: vLLM's (2, L//2, L-3))")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_drafter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tlt",
        description="TLT: lossless long-tail acceleration of RL training for reasoning LLMs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(sub)
    _add_build_demo(sub)
    _add_train_drafter(sub)
    add_run(sub)
    add_report(sub)
    add_serve(sub)
    add_export(sub)
    return parser


def read_prompts(path: Path) -> list[str]:
    """Prompts from a text file (one per line) or JSONL (objects with a 'prompt' string)."""
    if not path.is_file():
        raise ConfigError(f"--prompts: file {path} does not exist")
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if path.suffix != ".jsonl":
        return lines
    prompts = []
    for n, line in enumerate(lines, 1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--prompts: {path} line {n} is not JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise ConfigError(f"--prompts: {path} line {n} needs a string field 'prompt'")
        prompts.append(obj["prompt"])
    return prompts


def cmd_generate(args: argparse.Namespace) -> int:
    # Imports follow the checks that need them: a mistyped argument is reported before transformers loads (~5 s).
    from tlt.models import load_model
    from tlt.models.demo import ensure_demo_model
    from tlt.rollout.sampling import SamplingParams

    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        max_new_tokens=args.max_new_tokens, seed=args.seed,
    )
    speculative = _speculative_spec(args)
    prompts = read_prompts(args.prompts) if args.prompts else list(args.prompt or DEMO_PROMPTS)
    if not prompts:
        raise ConfigError("no prompts given: --prompts file is empty")
    model_dir = args.model or ensure_demo_model()
    model = load_model(model_dir, dtype=args.dtype)
    from transformers import AutoTokenizer

    from tlt.rollout.engine import RolloutEngine

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--model: could not load a tokenizer from {model_dir} ({exc})") from None
    drafter = tuner = None
    if speculative is not None:
        from tlt.models.drafter_io import load_drafter
        from tlt.rollout.worker import make_tuner

        drafter, tuner = load_drafter(args.drafter, model), make_tuner(speculative, model.device.type)
    engine = RolloutEngine(model, max_running=args.max_running, drafter=drafter, tuner=tuner)
    token_ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    start = time.perf_counter()
    outputs = engine.generate(token_ids, [params] * len(prompts))
    elapsed = time.perf_counter() - start
    for prompt, out in zip(prompts, outputs):
        text = tokenizer.decode(out.token_ids, skip_special_tokens=True)
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": text, "token_ids": out.token_ids,
                              "finish_reason": out.finish_reason}))
        else:
            print(f"{prompt!r} -> {text!r} [{len(out.token_ids)} tokens, {out.finish_reason}]")
    total = sum(len(o.token_ids) for o in outputs)
    sd = f"; speculative decoding: acceptance length {engine.stats.acceptance_length:.2f}" if drafter else ""
    print(f"generated {total} tokens for {len(prompts)} prompts in {elapsed:.2f}s "
          f"({total / max(elapsed, 1e-9):.1f} tok/s){sd}", file=sys.stderr)
    return 0


def _speculative_spec(args: argparse.Namespace):
    """The job spec whose ``rollout.speculative`` says how `tlt generate` speculates (None: it does not)."""
    if args.drafter is None:
        if args.sd_strategy:
            raise ConfigError("--sd-strategy needs --drafter DIR (the EAGLE-3 drafter to speculate with)")
        return None
    from tlt.config import job_spec_from_dict

    speculative = {"mode": "always", "strategy": args.sd_strategy} if args.sd_strategy else {"mode": "adaptive"}
    try:
        return job_spec_from_dict({"seed": args.seed, "rollout": {"speculative": speculative}})
    except ConfigError as exc:  # only the strategy can be wrong here
        raise ConfigError(f"--sd-strategy: {exc}") from None


def cmd_build_demo_model(args: argparse.Namespace) -> int:
    import shutil

    from tlt.models.demo import default_demo_dir, ensure_demo_model
    from tlt.models.demo_training import SUMMARY_FILE

    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    if args.eval_problems is not None and args.eval_problems < 0:
        raise ConfigError(f"--eval-problems must be >= 0, got {args.eval_problems}")
    out = args.out or default_demo_dir()
    if args.force:
        shutil.rmtree(out, ignore_errors=True)
    path = ensure_demo_model(out, steps=args.steps, seed=args.seed, eval_problems=args.eval_problems)
    summary_path = path / SUMMARY_FILE
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        ev = summary.get("eval", {})
        line = f"trained {summary['train']['steps']} steps, final loss {summary['train']['final_loss']}"
        if ev:
            line += (f"; held-out greedy accuracy {ev['greedy_accuracy']:.1%}, "
                     f"sampled (T=1) {ev['sampled_accuracy_t1']:.1%} on {ev['problems']} problems")
        print(line)
    print(f"demo model ready at {path}")
    return 0


def parse_layer_ids(text: str | None) -> tuple[int, ...] | None:
    """'2,4,5' -> (2, 4, 5), with an error naming the option."""
    if not text:
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--aux-layers must be comma-separated integers, got {text!r}") from None


def cmd_train_drafter(args: argparse.Namespace) -> int:
    for name in ("steps", "batch_size", "ttt_steps", "num_prompts", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.lr > 0:
        raise ConfigError(f"--lr must be > 0, got {args.lr}")
    # Imported after the checks above, as in cmd_generate: a mistyped option need not wait for torch.
    from transformers import AutoTokenizer

    from tlt.drafter.warmup import warmup_drafter
    from tlt.models.demo import ensure_demo_model, tlt_home

    model_dir = args.model or ensure_demo_model()
    out = args.out or tlt_home() / "models" / "demo-drafter"
    prompts = None
    if args.prompts:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        prompts = [tokenizer.encode(p, add_special_tokens=False) for p in read_prompts(args.prompts)]
    cfg = DrafterTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, ttt_steps=args.ttt_steps,
                             seed=args.seed)
    summary = warmup_drafter(model_dir, out, prompts=prompts, num_prompts=args.num_prompts,
                             max_new_tokens=args.max_new_tokens, train=cfg,
                             aux_layer_ids=parse_layer_ids(args.aux_layers))
    acc = ", ".join(f"{a:.2f}" for a in summary["final_step_accuracy"])
    print(f"drafter saved to {out} (EAGLE-3 format); final loss {summary['final_loss']:.3f}, "
          f"top-1 agreement per draft step [{acc}], {summary['total_s']:.0f}s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tlt`` command; user errors print one line and exit with status 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TLTError as exc:
        print(f"tlt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tlt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
