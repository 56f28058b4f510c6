"""`tlt run` (an RL job on this machine) and `tlt report` (Markdown + plots from step logs)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from tlt.errors import ConfigError


def add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run an RL job (GRPO + adaptive SD + adaptive drafter) on this machine")
    p.add_argument("config", nargs="?", type=Path, help="job spec YAML (default: the built-in demo job)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set rollout.workers=3 (repeatable; value parsed as YAML)")
    p.add_argument("--output-dir", type=Path, help="where logs, checkpoints, the store and the report go")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (one line per step)")
    p.add_argument("--no-report", action="store_true", help="skip the Markdown/PNG report at the end")
    p.set_defaults(func=cmd_run)


def add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write a Markdown report with plots from one or more steps.jsonl logs")
    p.add_argument("logs", nargs="+", type=Path, help="steps.jsonl files (several: compared side by side)")
    p.add_argument("--labels", help="comma-separated run labels (default: the parent directory names)")
    p.add_argument("--out", type=Path, default=Path("report"), help="output directory")
    p.set_defaults(func=cmd_report)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["rollout.workers=3"]`` -> ``{"rollout.workers": 3}`` (values parsed as YAML scalars/lists)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: write KEY=VALUE, e.g. --set rollout.workers=3")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc})") from None
    return out


def cmd_run(args: argparse.Namespace) -> int:
    from tlt.config import job_spec_from_dict, load_job_spec
    from tlt.controller.display import ProgressDisplay
    from tlt.controller.loop import Controller

    overrides = parse_overrides(args.overrides)
    if args.output_dir is not None:
        overrides["output_dir"] = str(args.output_dir)
    if args.config is not None:
        spec = load_job_spec(args.config, overrides)
    else:
        from tlt.config import apply_overrides

        spec = job_spec_from_dict(apply_overrides({}, overrides))
    display = ProgressDisplay(spec.steps, enabled=not args.no_progress)
    try:
        controller = Controller(spec, on_event=display if not args.no_progress else _print_steps)
        controller.run()
    finally:
        display.close()
    log = Path(spec.output_dir) / "steps.jsonl"
    print(f"step log: {log}")
    if not args.no_report:
        from tlt.controller.report import read_log, write_report

        report = write_report({spec.name: read_log(log)}, Path(spec.output_dir) / "report",
                              title=f"TLT run: {spec.name}")
        print(f"report: {report}")
    return 0


def _print_steps(event: dict) -> None:
    from tlt.controller.display import ProgressDisplay

    if event["event"] == "step_end":
        print(ProgressDisplay.step_line(event["record"]), flush=True)


def cmd_report(args: argparse.Namespace) -> int:
    from tlt.controller.report import main_report

    labels = args.labels.split(",") if args.labels else None
    return main_report(args.logs, labels, args.out)
