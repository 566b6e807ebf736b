"""The audit's outputs: a Markdown table, JSON rows and the privacy-utility plot (matplotlib, optional)."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from audit.simulation import TABLE_HEADER, AuditRow, format_row, recovery_note


def table(rows: list[AuditRow]) -> str:
    return "\n".join([TABLE_HEADER, *(format_row(r) for r in rows), "", recovery_note(rows)])


def write_json(rows: list[AuditRow], path: Path, extra: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**(extra or {}), "rows": [{**asdict(r), "privacy": r.privacy.to_dict()}
                                                          for r in rows]}, indent=1))


def plot(rows: list[AuditRow], path: Path) -> Path:
    """Learned-attack token recovery (x) against utility (y: accuracy, or eval loss), one line per K."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("the plot needs matplotlib: pip install 'ringtune[bench]'") from None
    matplotlib.use("Agg")
    from matplotlib import pyplot

    use_accuracy = all(r.accuracy is not None for r in rows)
    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    for k in sorted({r.owner_blocks for r in rows}):
        points = sorted((r for r in rows if r.owner_blocks == k), key=lambda r: r.learned_recovery)
        points = [r for r in points if (r.accuracy if use_accuracy else r.eval_loss) is not None]
        xs = [100 * r.learned_recovery for r in points]
        ys = [100 * r.accuracy if use_accuracy else r.eval_loss for r in points]
        axes.plot(xs, ys, marker="o", label=f"owner keeps {k} block(s) at each end")
        for r, x, y in zip(points, xs, ys):
            axes.annotate("off" if r.noise_to_signal is None else f"{r.noise_to_signal:.2g}", (x, y),
                          textcoords="offset points", xytext=(4, 4), fontsize=7)
    axes.set_xlabel("tokens recovered by the learned inverter (%)")
    axes.set_ylabel("held-out accuracy (%)" if use_accuracy else "held-out loss")
    axes.set_title("privacy-utility (labels: E noise norm / E hidden-state norm)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return path
