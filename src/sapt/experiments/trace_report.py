"""The routing traces of a run (each task folder's `routing_trace.jsonl`) as a table and a figure.

The table: the own-block weight of each task's probe inputs at the last record of each task's
training (rows: after training task i; columns: the task whose inputs are routed). The figure: the
own-block weight over the optimizer steps of the whole run, one line per task, with a mark where each
task's training starts.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..run_files import ROUTING_TRACE_FILE, task_dir_name
from ..utils.fileio import read_jsonl_prefix as read_trace


def png_bytes(fig) -> bytes:
    """A finished figure as PNG bytes, rendered in memory (a failure leaves no file behind)."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()


def read_run_traces(outputs: Path, tasks: list[str]) -> list[list[dict]] | None:
    """The trace records of each task folder, in order (None when the run has no trace at all)."""
    traces = []
    for position, task in enumerate(tasks, 1):
        path = Path(outputs) / task_dir_name(position, task) / ROUTING_TRACE_FILE
        traces.append(read_trace(path) if path.is_file() else [])
    return traces if any(traces) else None


def final_own_weights(traces: list[list[dict]], tasks: list[str]) -> np.ndarray:
    """(after task i, task j) own-block weight of task j's probes at the end of task i's training."""
    table = np.full((len(tasks), len(tasks)), np.nan)
    for i, records in enumerate(traces):
        if records:
            for j, task in enumerate(tasks[: i + 1]):
                entry = records[-1]["tasks"].get(task)
                if entry is not None:
                    table[i, j] = entry["own_weight"]
    return table


def format_trace_table(tasks: list[str], table: np.ndarray, labels: list[str]) -> list[str]:
    lines = ["", "routing trace: own-block weight of each task's dev probes at the end of each task's training",
             "(row: after training task i; column: the task whose inputs are routed)"]
    width = max(len(label) for label in labels) + 2
    lines.append(" " * 16 + "".join(label.rjust(width) for label in labels))
    for i, row in enumerate(table):
        cells = "".join(("-" if np.isnan(v) else f"{v:.3f}").rjust(width) for v in row)
        lines.append(f"after task {i + 1}".ljust(16) + cells)
    return lines


def render_trace(traces: list[list[dict]], tasks: list[str], title: str) -> bytes:
    """PNG bytes: each task's own-block weight over the run's optimizer steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    try:
        offset, series = 0, {task: ([], []) for task in tasks}
        for i, records in enumerate(traces):
            if i:
                ax.axvline(offset, color="grey", linewidth=0.6, linestyle=":")
            for record in records:
                for task, entry in record["tasks"].items():
                    series[task][0].append(offset + record["step"])
                    series[task][1].append(entry["own_weight"])
            offset += max((r["step"] for r in records), default=0)
        for task, (steps, weights) in series.items():
            if steps:
                ax.plot(steps, weights, marker=".", markersize=3, linewidth=1, label=task)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("optimizer step (whole run; dotted: a new task starts)")
        ax.set_ylabel("mean weight on its own block")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, ncol=max(1, len(tasks) // 8 + 1))
        return png_bytes(fig)
    finally:
        plt.close(fig)
