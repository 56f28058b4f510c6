"""The end-of-run report: Markdown plus PNG plots from one or more ``steps.jsonl`` logs.

With one run it describes the run; with several (a benchmark's arms, e.g. "TLT", "SD off",
"frozen drafter") every plot overlays them and a comparison table gives time ratios against the
first run (``this run's time / first run's time``: above 1 means slower than the first run).

The log has one JSON object per RL step (see :meth:`tlt.controller.loop.Controller.run_step`), an
optional ``{"event": "start", ...}`` first line and ``{"event": "end", ...}`` last line; other
events are skipped and every key except ``step`` is optional.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlt.errors import ConfigError
from tlt.models.demo_training import ascii_histogram, length_stats

ROLE_COLOURS = {"rollout": "tab:blue", "drafter": "tab:orange", "idle": "lightgrey"}
PHASE_COLOURS = {"rollout_s": "tab:blue", "train_s": "tab:green", "publish_s": "tab:purple"}
RUN_HATCHES = ("", "//", "..", "xx", "\\\\", "++")
IMAGES = {
    "response_lengths.png": "Response lengths (first vs last step)",
    "reward.png": "Reward",
    "rollout_time.png": "Rollout time per step",
    "acceptance_length.png": "Acceptance length",
    "roles.png": "Worker roles",
    "step_time.png": "Step time breakdown",
}


# ---- the log ----------------------------------------------------------------------------------

@dataclass
class RunLog:
    """The parsed log of one run: step records in order, plus the start and end events if present."""

    steps: list[dict] = field(default_factory=list)
    start: dict | None = None
    end: dict | None = None

    def series(self, key: str, default: Any = None) -> list:
        """``key`` of every step record (``default`` where missing or null)."""
        return [default if s.get(key) is None else s[key] for s in self.steps]

    @property
    def step_numbers(self) -> list[int]:
        """The 1-based step numbers."""
        return [s.get("step", i + 1) for i, s in enumerate(self.steps)]

    @property
    def steps_s(self) -> float:
        """Sum of the steps' wall times."""
        return sum(self.series("wall_s", 0.0))

    @property
    def total_s(self) -> float:
        """The run's wall time: the end event's ``total_s``, else the sum of step times."""
        total = (self.end or {}).get("total_s")
        return self.steps_s if total is None else total

    @property
    def rollout_s(self) -> float:
        """Sum of the steps' rollout times."""
        return sum(self.series("rollout_s", 0.0))

    @property
    def sd_mode(self) -> str:
        """The speculative-decoding mode of the run ("off" when no step records one)."""
        modes = [(s.get("sd") or {}).get("mode") for s in self.steps]
        return next((m for m in modes if m), "off")

    def acceptance_points(self) -> list[tuple[int, float]]:
        """``(step, acceptance length)`` for steps with speculative decoding on and a measured length."""
        points = []
        for n, s in zip(self.step_numbers, self.steps):
            sd = s.get("sd") or {}
            if sd.get("mode", "off") != "off" and sd.get("acceptance_length"):
                points.append((n, sd["acceptance_length"]))
        return points

    @property
    def baseline_heldout(self) -> float | None:
        """Held-out reward before training (from the start event)."""
        return (self.start or {}).get("baseline_heldout_reward")

    @property
    def final_heldout(self) -> float | None:
        """Held-out reward after training: the end event's, else the last one evaluated during the run."""
        final = (self.end or {}).get("final_heldout_reward")
        if final is not None:
            return final
        return next((v for v in reversed(self.series("heldout_reward")) if v is not None), None)

    def drafter_versions_published(self) -> int:
        """Drafter versions published during the run (``new_drafter_version``, else changes of ``drafter_version``)."""
        new = [v for v in self.series("new_drafter_version") if v is not None]
        if new:
            return len(set(new))
        seen = [v for v in self.series("drafter_version") if v is not None]
        return sum(1 for a, b in itertools.pairwise(seen) if b != a)

    def drafter_total(self, key: str) -> int:
        """Sum of ``drafter_train[key]`` over the steps."""
        return sum((s.get("drafter_train") or {}).get(key) or 0 for s in self.steps)


def _parse_line(path: Path, n: int, line: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} line {n}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise ConfigError(f"{path} line {n}: expected a JSON object, got {type(row).__name__}")
    return row


def read_log(path: str | Path) -> RunLog:
    """Parse a ``steps.jsonl`` file; a malformed line raises :class:`ConfigError` naming its number."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"step log {path} does not exist") from None
    log = RunLog()
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        row = _parse_line(path, n, line)
        event = row.get("event")
        if event == "start":
            log.start = row
        elif event == "end":
            log.end = row
        elif event is None:
            if "step" not in row:
                raise ConfigError(f"{path} line {n}: a step record needs a 'step' key")
            log.steps.append(row)
    return log


# ---- formatting helpers -----------------------------------------------------------------------

def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "-"


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _bin_width(max_len: int, bins: int = 24) -> int:
    """A power of two giving at most about ``bins`` histogram bins up to ``max_len``."""
    return max(1, 2 ** math.ceil(math.log2(max(1, max_len) / bins))) if max_len > bins else 1


def _drafter_seconds(step: dict) -> dict[str, float]:
    """Seconds each worker spent in the drafter role during a step (from its role spans)."""
    return {w.get("worker", "?"): sum(e - s for s, e, role in w.get("spans", []) if role == "drafter")
            for w in step.get("roles") or []}


# ---- plots ------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _patch(label: str, colour: str = "white", hatch: str = ""):
    """A legend entry for a bar colour or hatching."""
    from matplotlib.patches import Patch

    edge = "black" if hatch or colour == "white" else colour
    return Patch(facecolor=colour, edgecolor=edge, hatch=hatch, label=label)


def _finish(ax, xlabel: str, ylabel: str, title: str, extra: Sequence = ()) -> None:
    """Label the axes, add a grid, integer ticks for RL steps and a legend (plus ``extra`` legend entries)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if xlabel == "RL step":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles = ax.get_legend_handles_labels()[0] + list(extra)
    if handles:
        ax.legend(handles=handles, fontsize=8)


def _no_data(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="grey")


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    _pyplot().close(fig)
    return out


def plot_lengths(runs: Mapping[str, RunLog], out: Path) -> Path:
    """Histogram of response lengths of the first (solid) and last (dashed) step of each run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    everything = [n for run in runs.values() for s in run.steps for n in s.get("response_lengths") or []]
    top = max([1, *everything])
    edges = [top * i / 30 for i in range(31)]
    for k, (label, run) in enumerate(runs.items()):
        picks = [("first", run.steps[0]), ("last", run.steps[-1])] if len(run.steps) > 1 else \
            [("only", s) for s in run.steps]
        for which, step in picks:
            lengths = step.get("response_lengths") or []
            if lengths:
                ax.hist(lengths, bins=edges, histtype="step", color=f"C{k}", linewidth=1.5,
                        linestyle="--" if which == "last" else "-", label=f"{label}: step {step['step']} ({which})")
    if everything:
        ax.set_yscale("log")
    else:
        _no_data(ax, "no response lengths recorded")
    _finish(ax, "response length (tokens)", "responses (log scale)", "Response-length distribution")
    return _save(fig, out)


def _heldout_points(run: RunLog) -> list[tuple[float, float]]:
    points = [(n, s["heldout_reward"]) for n, s in zip(run.step_numbers, run.steps)
              if s.get("heldout_reward") is not None]
    if run.baseline_heldout is not None:
        points.insert(0, (0, run.baseline_heldout))
    final = (run.end or {}).get("final_heldout_reward")
    if final is not None and run.steps:
        points.append((run.step_numbers[-1], final))
    return points


def plot_reward(runs: Mapping[str, RunLog], out: Path) -> Path:
    """Train reward mean ± std per step (line and band) and held-out rewards (square markers)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, (label, run) in enumerate(runs.items()):
        rows = [(n, s["reward_mean"], s.get("reward_std") or 0.0)
                for n, s in zip(run.step_numbers, run.steps) if s.get("reward_mean") is not None]
        if rows:
            x, mean, std = zip(*rows)
            ax.plot(x, mean, marker="o", color=f"C{k}", label=f"{label}: train reward (± std)")
            ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=f"C{k}", alpha=0.15)
        held = _heldout_points(run)
        if held:
            ax.scatter(*zip(*held), marker="s", s=40, color=f"C{k}", edgecolors="black", zorder=3,
                       label=f"{label}: held-out (step 0 = before training)")
    if not ax.get_legend_handles_labels()[0]:
        _no_data(ax, "no rewards recorded")
    _finish(ax, "RL step", "reward", "Reward")
    return _save(fig, out)


def _sd_fraction(step: dict) -> float | None:
    sd = step.get("sd") or {}
    on, plain = sd.get("sd_seconds"), sd.get("plain_seconds")
    if on is None or plain is None or on + plain <= 0:
        return None
    return on / (on + plain)


def plot_rollout_time(runs: Mapping[str, RunLog], out: Path) -> Path:
    """Rollout wall time per step, one bar per run; hatched part = share of engine time with SD on."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(runs))
    split_shown = False
    for k, (label, run) in enumerate(runs.items()):
        x = [n - 0.4 + width * (k + 0.5) for n in run.step_numbers]
        total = run.series("rollout_s", 0.0)
        fractions = [_sd_fraction(s) for s in run.steps]
        on = [t * (f or 0.0) for t, f in zip(total, fractions)]
        ax.bar(x, [t - o for t, o in zip(total, on)], width=width, color=f"C{k}", label=f"{label} (SD {run.sd_mode})")
        if any(on):
            split_shown = True
            ax.bar(x, on, width=width, bottom=[t - o for t, o in zip(total, on)], color=f"C{k}", alpha=0.55,
                   hatch="//", edgecolor="white")
    if not any(run.steps for run in runs.values()):
        _no_data(ax, "no steps recorded")
    extra = [_patch("hatched: SD-on share of engine time", hatch="//")] if split_shown else []
    _finish(ax, "RL step", "rollout wall time (s)", "Rollout time per step", extra)
    return _save(fig, out)


def plot_acceptance(runs: Mapping[str, RunLog], out: Path) -> Path:
    """Mean acceptance length per step for every run with speculative decoding on."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, (label, run) in enumerate(runs.items()):
        points = run.acceptance_points()
        if points:
            ax.plot(*zip(*points), marker="o", color=f"C{k}", label=f"{label} (SD {run.sd_mode})")
    if not ax.get_legend_handles_labels()[0]:
        _no_data(ax, "no run with speculative decoding on")
    _finish(ax, "RL step", "acceptance length (tokens per verification)", "Acceptance length")
    return _save(fig, out)


def _gantt(ax, step: dict) -> None:
    workers = step.get("roles") or []
    for row, worker in enumerate(workers):
        for start, end, role in worker.get("spans", []):
            ax.barh(row, end - start, left=start, color=ROLE_COLOURS.get(role, "black"), edgecolor="none")
    ax.set_yticks(range(len(workers)), [w.get("worker", "?") for w in workers])
    if not workers:
        _no_data(ax, "no worker roles recorded")
    _finish(ax, "seconds since step start", "worker", f"Worker roles during step {step.get('step', '-')}",
            [_patch(role, colour) for role, colour in ROLE_COLOURS.items()])


def _drafter_panel(ax, run: RunLog) -> None:
    per_step = [_drafter_seconds(s) for s in run.steps]
    for worker in sorted({w for d in per_step for w in d}):
        ax.plot(run.step_numbers, [d.get(worker, 0.0) for d in per_step], marker="o", label=worker)
    if not any(any(d.values()) for d in per_step):
        _no_data(ax, "no drafter training")
    _finish(ax, "RL step", "drafter-role seconds", "Drafter training time per worker")


def plot_roles(label: str, run: RunLog, out: Path) -> Path:
    """Gantt chart of worker roles in the last step of ``run`` and drafter seconds per worker per step."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6.5), height_ratios=[3, 2])
    _gantt(top, run.steps[-1] if run.steps else {})
    top.set_title(f"{label}: {top.get_title()}")
    _drafter_panel(bottom, run)
    return _save(fig, out)


def plot_step_time(runs: Mapping[str, RunLog], out: Path) -> Path:
    """Stacked rollout / train / publish seconds per step; several runs side by side, told apart by hatching."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(runs))
    for k, run in enumerate(runs.values()):
        x = [n - 0.4 + width * (k + 0.5) for n in run.step_numbers]
        bottom = [0.0] * len(x)
        for key, colour in PHASE_COLOURS.items():
            values = run.series(key, 0.0)
            ax.bar(x, values, width=width, bottom=bottom, color=colour, hatch=RUN_HATCHES[k % len(RUN_HATCHES)],
                   edgecolor="white")
            bottom = [b + v for b, v in zip(bottom, values)]
    extra = [_patch(key.removesuffix("_s"), colour) for key, colour in PHASE_COLOURS.items()]
    if len(runs) > 1:
        extra += [_patch(label, hatch=RUN_HATCHES[k % len(RUN_HATCHES)]) for k, label in enumerate(runs)]
    _finish(ax, "RL step", "seconds", "Step time breakdown", extra)
    return _save(fig, out)


def write_plots(runs: Mapping[str, RunLog], out_dir: Path) -> list[Path]:
    """Write every PNG of the report into ``out_dir`` (names as in :data:`IMAGES`)."""
    first_label, first = next(iter(runs.items()))
    return [
        plot_lengths(runs, out_dir / "response_lengths.png"),
        plot_reward(runs, out_dir / "reward.png"),
        plot_rollout_time(runs, out_dir / "rollout_time.png"),
        plot_acceptance(runs, out_dir / "acceptance_length.png"),
        plot_roles(first_label, first, out_dir / "roles.png"),
        plot_step_time(runs, out_dir / "step_time.png"),
    ]


# ---- markdown ---------------------------------------------------------------------------------

SUMMARY_HEADER = ("run", "SD mode", "steps", "total s", "mean step s", "rollout share", "train reward first → last",
                  "held-out baseline → final", "mean acc. len", "drafter versions published",
                  "drafter train steps", "preemptions")
COMPARISON_HEADER = ("run", "total s", "step time s", "rollout s", "total time ratio", "step time ratio",
                     "rollout time ratio", "final held-out", "mean acc. len")
STEP_HEADER = ("step", "wall s", "rollout s", "train s", "publish s", "tail s", "reward mean ± std", "held-out",
               "acc. len", "policy v", "drafter v", "drafter steps", "preemptions")


def summary_row(label: str, run: RunLog) -> list[str]:
    """The summary-table row of one run."""
    rewards = run.series("reward_mean")
    share = run.rollout_s / run.steps_s if run.steps_s else None
    mean_step = run.steps_s / len(run.steps) if run.steps else None
    acceptance = _mean([a for _, a in run.acceptance_points()])
    return [label, run.sd_mode, str(len(run.steps)), f"{run.total_s:.1f}", _fmt(mean_step, ".2f"),
            "-" if share is None else f"{100 * share:.0f}%",
            f"{_fmt(rewards[0] if rewards else None)} → {_fmt(rewards[-1] if rewards else None)}",
            f"{_fmt(run.baseline_heldout)} → {_fmt(run.final_heldout)}", _fmt(acceptance, ".2f"),
            str(run.drafter_versions_published()), str(run.drafter_total("steps")),
            str(run.drafter_total("preemptions"))]


def comparison_row(label: str, run: RunLog, base: RunLog) -> list[str]:
    """The comparison-table row of ``run``; ratios are ``run / base`` (above 1: slower than ``base``)."""
    acceptance = _mean([a for _, a in run.acceptance_points()])
    return [label, f"{run.total_s:.1f}", f"{run.steps_s:.1f}", f"{run.rollout_s:.1f}",
            _ratio(run.total_s, base.total_s), _ratio(run.steps_s, base.steps_s), _ratio(run.rollout_s, base.rollout_s),
            _fmt(run.final_heldout), _fmt(acceptance, ".2f")]


def step_row(step: dict) -> list[str]:
    """The per-step-table row of one step record."""
    sd, drafter = step.get("sd") or {}, step.get("drafter_train") or {}
    reward = _fmt(step.get("reward_mean"))
    if step.get("reward_std") is not None:
        reward += f" ± {step['reward_std']:.3f}"
    cells = [_fmt(step.get(k), ".2f") for k in ("wall_s", "rollout_s", "train_s", "publish_s", "tail_s")]
    return [str(step["step"]), *cells, reward, _fmt(step.get("heldout_reward")),
            _fmt(sd.get("acceptance_length"), ".2f"), _fmt(step.get("policy_version"), "d"),
            _fmt(step.get("drafter_version"), "d"), _fmt(drafter.get("steps"), "d"),
            _fmt(drafter.get("preemptions"), "d")]


def length_section(label: str, run: RunLog) -> list[str]:
    """ASCII histograms of the response lengths of the first and last step of ``run``."""
    picks = {"first": run.steps[0], "last": run.steps[-1]} if run.steps else {}
    lengths = {which: s.get("response_lengths") or [] for which, s in picks.items()}
    top = max((n for values in lengths.values() for n in values), default=0)
    if not top:
        return []
    lines = [f"### {label}: response lengths", ""]
    for which, values in lengths.items():
        if values and (which == "first" or len(run.steps) > 1):
            step = picks[which]["step"]
            lines += [f"Step {step} ({which}):", "", "```",
                      ascii_histogram(length_stats(values, bin_width=_bin_width(top)), width=40), "```", ""]
    return lines


def render_markdown(runs: Mapping[str, RunLog], images: Sequence[Path], title: str) -> str:
    """The report's Markdown; ``images`` are linked relative to the report's directory."""
    first_label = next(iter(runs))
    lines = [f"# {title}", "", "## Summary", "", *_table(SUMMARY_HEADER, [summary_row(k, r) for k, r in runs.items()])]
    if len(runs) > 1:
        base = runs[first_label]
        lines += ["", "## Comparison", "",
                  f"Time ratios are this run's time divided by **{first_label}**'s (above 1: slower than "
                  f"{first_label}).", "",
                  *_table(COMPARISON_HEADER, [comparison_row(k, r, base) for k, r in runs.items()])]
    lines += ["", "## Plots", ""]
    for image in images:
        lines += [f"### {IMAGES.get(image.name, image.stem)}", "", f"![{image.stem}]({image.name})", ""]
    if len(runs) > 1:
        lines += [f"The worker-role chart shows **{first_label}**.", ""]
    for label, run in runs.items():
        lines += [f"## {label}: per step", "", *_table(STEP_HEADER, [step_row(s) for s in run.steps]), ""]
        lines += length_section(label, run)
    return "\n".join(lines).rstrip() + "\n"


def write_report(runs: Mapping[str, RunLog], out_dir: str | Path, title: str = "TLT run report") -> Path:
    """Write ``report.md`` and its PNGs into ``out_dir`` (created if needed); returns the report's path.

    The first run is the reference of the comparison table and the one whose worker roles are drawn.
    """
    if not runs:
        raise ConfigError("write_report needs at least one run")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = write_plots(runs, out)
    report = out / "report.md"
    report.write_text(render_markdown(runs, images, title))
    return report


def _default_labels(log_paths: Sequence[Path]) -> list[str]:
    """Each log's directory name (its file stem where directory names clash), made unique."""
    labels = [Path(p).parent.name or Path(p).stem for p in log_paths]
    if len(set(labels)) < len(labels):
        labels = [Path(p).stem for p in log_paths]
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return unique


def main_report(log_paths: list[Path], labels: list[str] | None, out_dir: Path) -> int:
    """`tlt report`: one report comparing ``log_paths`` (the first is the reference); returns the exit code.

    ``labels`` default to the logs' directory names. Raises :class:`ConfigError` for a label count
    that does not match, duplicate labels, or a missing or malformed log.
    """
    if not log_paths:
        raise ConfigError("tlt report needs at least one steps.jsonl log")
    labels = list(labels) if labels else _default_labels(log_paths)
    if len(labels) != len(log_paths):
        raise ConfigError(f"--labels gives {len(labels)} names for {len(log_paths)} logs")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--labels must be distinct, got {labels}")
    runs = {label: read_log(path) for label, path in zip(labels, log_paths)}
    title = "TLT run report" if len(runs) == 1 else "TLT comparison: " + " vs ".join(runs)
    print(f"report: {write_report(runs, out_dir, title)}")
    return 0
