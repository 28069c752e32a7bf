"""PNG plots of a run, drawn from its event log alone."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from downpour.metrics.sinks import Event



def plot_run(events: Iterable[Event], out_dir: str | Path, title: str = "") -> list[Path]:
    """Draw loss and accuracy against wall time and steps; return the PNG paths.

    Writes ``loss.png`` (training loss of every worker, and evaluation loss)
    and ``accuracy.png`` (evaluation accuracy), each with a time panel and a
    step panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = list(events)
    out_dir = Path(out_dir)
    written = []
    for name, keys in (("loss", ("train/loss", "eval/loss")), ("accuracy", ("eval/accuracy",))):
        fig, (ax_time, ax_step) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
        for key in keys:
            roles = sorted({(e.get("role"), e.get("rank")) for e in events if e.get(key) is not None})
            for role, rank in roles:
                pts = [e for e in events if e.get(key) is not None and e.get("role") == role and e.get("rank") == rank]
                label = key if role == "coordinator" else f"{key} ({role} {rank})"
                ax_time.plot([e["time"] for e in pts], [e[key] for e in pts], label=label, lw=1)
                ax_step.plot([e["step"] for e in pts], [e[key] for e in pts], label=label, lw=1)
        for ax, xlabel in ((ax_time, "seconds"), (ax_step, "step")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        if title:
            fig.suptitle(title)
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
