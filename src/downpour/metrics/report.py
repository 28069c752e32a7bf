"""Comparison reports: the table, the figures and a self-contained HTML page.

Everything here is rebuilt from run directories alone (their ``config.json``
and ``events.jsonl``), so ``downpour report`` can redo it at any time.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from downpour.metrics.rundir import RunDir
from downpour.metrics.sinks import Event, read_events
from downpour.metrics.summary import summarize

#: Columns of a comparison table, in order, with their headings.
COLUMNS = (
    ("strategy", "strategy"),
    ("workers", "workers"),
    ("time_to_target", "time to target (s)"),
    ("accuracy", "final accuracy"),
    ("best_accuracy", "best accuracy"),
    ("samples_per_second", "samples/s"),
    ("speedup", "speedup"),
    ("bytes_total", "bytes on the wire"),
    ("bytes_per_sample", "bytes/sample"),
    ("rounds", "rounds"),
    ("staleness_mean", "staleness mean"),
    ("staleness_p95", "staleness p95"),
    ("staleness_max", "staleness max"),
    ("dropped_gradients", "dropped gradients"),
    ("seconds", "seconds"),
)


class RunRecord:
    """One run of a comparison: its directory, configuration, events and summary."""

    def __init__(self, path: Path) -> None:
        run = RunDir(path)
        self.path = Path(path)
        self.config = run.read_config()
        self.config["run_dir"] = str(self.path)
        self.events: list[Event] = list(read_events(self.path / RunDir.EVENTS))
        self.summary = summarize(self.events, self.config)

    @property
    def label(self) -> str:
        return f"{self.summary['strategy']} ×{self.summary['workers']}"


def comparison_rows(records: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """One row per run; speedup against the single-process run when there is one."""
    baseline = next((r.summary["samples_per_second"] for r in records if r.summary["strategy"] == "single"), None)
    rows = []
    for record in records:
        s = record.summary
        total = s["bytes_sent"] + s["bytes_received"]
        row = {key: s.get(key) for key, _ in COLUMNS if key in s}
        row.update({
            "bytes_total": total,
            "bytes_per_sample": total / s["samples"] if s["samples"] else 0.0,
            "speedup": s["samples_per_second"] / baseline if baseline else None,
            "run_dir": str(record.path),
        })
        rows.append(row)
    return rows


def format_cell(key: str, value: Any) -> str:
    """A table cell: every column filled, "not reached" or "n/a" where there is no number."""
    if value is None:
        return "not reached" if key == "time_to_target" else "n/a"
    if key in ("bytes_total",):
        return _human_bytes(value)
    if key == "bytes_per_sample":
        return f"{value:,.0f}"
    if key in ("accuracy", "best_accuracy"):
        return f"{value:.4f}"
    if key == "samples_per_second":
        return f"{value:,.0f}"
    if key == "speedup":
        return f"{value:.2f}×"
    if isinstance(value, float):
        return f"{value:.3g}" if key.startswith("staleness") else f"{value:.1f}"
    return str(value)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def print_table(rows: Sequence[dict[str, Any]], title: str = "comparison") -> None:
    """The comparison table in the terminal (rich)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for _, heading in COLUMNS:
        table.add_column(heading, justify="right")
    for row in rows:
        table.add_row(*(format_cell(key, row.get(key)) for key, _ in COLUMNS))
    Console(width=220).print(table)


def _bytes_timeline(events: list[Event]) -> tuple[np.ndarray, np.ndarray]:
    """Total bytes on the wire (sent by every role) over time."""
    latest: dict[tuple[str, int], float] = {}
    times, totals = [0.0], [0.0]
    for e in sorted((e for e in events if e.get("comm/bytes_sent") is not None), key=lambda e: e["time"]):
        latest[(e["role"], e["rank"])] = e["comm/bytes_sent"] + (e.get("comm/bytes_received") or 0)
        times.append(e["time"])
        totals.append(sum(latest.values()))
    return np.asarray(times), np.asarray(totals)


def _staged_events(events: list[Event]) -> list[tuple[float, str]]:
    marks = []
    for e in events:
        for key, verb in (("fault/killed", "killed"), ("fault/died", "died")):
            if e.get(key):
                marks.append((e["time"], f"{e[key].replace(':', ' ')} {verb}"))
    return marks


def comparison_figures(records: Sequence[RunRecord], out_dir: Path) -> list[Path]:
    """Accuracy against time and bytes, staleness histograms, and throughput against workers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    written = []

    fig, (ax_time, ax_bytes) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for record in records:
        evals = [e for e in record.events if e.get("role") == "coordinator" and e.get("eval/accuracy") is not None]
        if not evals:
            continue
        start = next((e["time"] for e in record.events if e.get("event") == "start"), 0.0)
        t = np.array([e["time"] for e in evals]) - start
        acc = np.array([e["eval/accuracy"] for e in evals])
        (line,) = ax_time.plot(t, acc, marker=".", label=record.label)
        times, totals = _bytes_timeline(record.events)
        ax_bytes.plot(np.interp(t + start, times, totals) / 1e6, acc, marker=".", label=record.label, color=line.get_color())
        for when, what in _staged_events(record.events):
            when -= start
            ax_time.axvline(when, color=line.get_color(), ls="--", lw=0.8)
            ax_time.annotate(what, (when, ax_time.get_ylim()[0]), rotation=90, fontsize=7, color=line.get_color(),
                             va="bottom")
    ax_time.set(xlabel="seconds of training", ylabel="test accuracy", title="accuracy against time")
    ax_bytes.set(xlabel="MB on the wire (all roles)", ylabel="test accuracy", title="accuracy against bytes")
    for ax in (ax_time, ax_bytes):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    path = out_dir / "accuracy.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    stale = [(r.label, _staleness(r.events)) for r in records]
    stale = [(label, values) for label, values in stale if values]
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    if stale:
        top = max(max(v) for _, v in stale)
        bins = np.arange(-0.5, top + 1.5, 1.0)
        for label, values in stale:
            ax.hist(values, bins=bins, histtype="step", lw=1.5, label=label, density=True)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no strategy here has stale updates", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="staleness of applied updates (versions)", ylabel="fraction", title="staleness")
    path = out_dir / "staleness.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    rows = comparison_rows(records)
    fig, (ax_rate, ax_speed) = plt.subplots(1, 2, figsize=(12, 4), constrained_layout=True)
    for strategy in dict.fromkeys(row["strategy"] for row in rows):
        mine = sorted((row for row in rows if row["strategy"] == strategy), key=lambda row: row["workers"])
        workers = [row["workers"] for row in mine]
        ax_rate.plot(workers, [row["samples_per_second"] for row in mine], marker="o", label=strategy)
        if all(row["speedup"] is not None for row in mine):
            ax_speed.plot(workers, [row["speedup"] for row in mine], marker="o", label=strategy)
    ax_rate.set(xlabel="workers", ylabel="samples/s", title="throughput")
    ax_speed.set(xlabel="workers", ylabel="speedup over single", title="speedup")
    for ax in (ax_rate, ax_speed):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    path = out_dir / "throughput.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    return written


def _staleness(events: list[Event]) -> list[int]:
    values: list[int] = []
    for e in events:
        for stale, count in (e.get("ps/staleness_counts") or {}).items():
            values.extend([int(stale)] * int(count))
    return values


def html_page(rows: Sequence[dict[str, Any]], figures: Sequence[Path], meta: dict[str, Any]) -> str:
    """A self-contained HTML report: figures embedded as data URIs, the table, command and environment."""
    head = "".join(f"<th>{html.escape(heading)}</th>" for _, heading in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(format_cell(key, row.get(key)))}</td>" for key, _ in COLUMNS) + "</tr>"
        for row in rows
    )
    images = "".join(
        f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(Path(p).read_bytes()).decode()}"><figcaption>{html.escape(p.stem)}</figcaption></figure>'
        for p in figures
    )
    environment = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in meta.get("environment", {}).items()
    )
    staged = meta.get("staged") or "none"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>downpour comparison</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f4f4f4; }}
img {{ max-width: 100%; }}
figure {{ margin: 1em 0; }}
code {{ background: #f4f4f4; padding: 2px 4px; }}
</style></head><body>
<h1>downpour comparison: {html.escape(str(meta.get("title", "")))}</h1>
<p>Command: <code>{html.escape(str(meta.get("command", "")))}</code></p>
<p>Staged stragglers and failures: {html.escape(str(staged))}</p>
<table id="summary"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
{images}
<h2>Environment</h2><table id="environment">{environment}</table>
</body></html>
"""


def write_comparison_report(directory: Path, run_dirs: Sequence[Path], meta: dict[str, Any]) -> dict[str, Any]:
    """Rebuild a comparison's summary, figures and page from its runs' event logs; return the summary."""
    directory = Path(directory)
    records = [RunRecord(directory / p if not Path(p).is_absolute() else Path(p)) for p in run_dirs]
    rows = comparison_rows(records)
    figures = comparison_figures(records, directory)
    summary = {"runs": [str(p) for p in run_dirs], "rows": rows, **meta}
    (directory / "comparison.json").write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
    (directory / "report.html").write_text(html_page(rows, figures, meta), encoding="utf-8")
    return summary


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)
