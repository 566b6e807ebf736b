"""The audit's outputs: a Markdown table with the targets and the privacy-utility frontier, JSON rows, and a
plot of what was measured (matplotlib, optional)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from audit.simulation import TABLE_HEADER, AuditRow, format_row, recovery_note

RECOVERY_CUT = 0.6
"""Target: learned-inversion recovery at least this much lower than the default split's without privacy."""
ACCURACY_LOSS = 0.01
"""Target: held-out accuracy at most this far below the non-private fine-tune of the same length."""
LABEL_AUC = 0.6
"""Target: both label attacks' ROC-AUC at most this."""


@dataclass(frozen=True, slots=True)
class Assessment:
    row: AuditRow
    """The privatized setting assessed."""
    recovery_cut: float
    """1 - its learned recovery / the reference's (the default split without privacy)."""
    accuracy_change: float | None
    """Its accuracy minus the non-private fine-tune's (None without --test)."""
    label_auc: float | None
    """The largest of its label attacks' AUCs: norm, direction, aligned direction, hidden state (None without label
    data)."""
    frontier: bool
    """No other audited setting recovers fewer tokens and keeps more accuracy."""

    @property
    def meets(self) -> bool:
        return (self.recovery_cut >= RECOVERY_CUT and self.accuracy_change is not None
                and self.accuracy_change >= -ACCURACY_LOSS - 1e-9
                and self.label_auc is not None and self.label_auc <= LABEL_AUC)


def reference(rows: list[AuditRow]) -> AuditRow | None:
    """The default split without privacy: no privatization at the smallest K audited."""
    off = [r for r in rows if not r.privacy.active]
    return min(off, key=lambda r: r.owner_blocks) if off else None


def assess(rows: list[AuditRow]) -> list[Assessment]:
    """Every privatized row against the targets (empty without a row that has privacy off)."""
    base = reference(rows)
    if base is None:
        return []
    private = [r for r in rows if r.privacy.active]
    scored = [r for r in [base, *private] if r.accuracy is not None]

    def dominated(r: AuditRow) -> bool:
        return any(o is not r and o.learned_recovery <= r.learned_recovery and o.accuracy >= r.accuracy
                   and (o.learned_recovery, o.accuracy) != (r.learned_recovery, r.accuracy) for o in scored)

    return [Assessment(r, 1 - r.learned_recovery / base.learned_recovery,
                       None if r.accuracy is None or base.accuracy is None else r.accuracy - base.accuracy,
                       strongest_label_auc(r),
                       r.accuracy is not None and not dominated(r)) for r in private]


def strongest_label_auc(row: AuditRow) -> float | None:
    """The best of the label attacks run on a row (None without label data)."""
    found = [a for a in (row.norm_auc, row.direction_auc, row.aligned_direction_auc, row.forward_label_auc)
             if a is not None]
    return max(found) if found else None


def targets_note(rows: list[AuditRow]) -> str:
    """The targets, each privatized setting against them, the frontier and the presets, for under the table."""
    base, found = reference(rows), assess(rows)
    if base is None or not found:
        return ""
    accuracy = "" if base.accuracy is None else f", accuracy {base.accuracy:.1%}"
    lines = [f"Targets: at least {RECOVERY_CUT:.0%} less learned token recovery than the default split without "
             f"privacy (K={base.owner_blocks}: {base.learned_recovery:.1%}{accuracy}), at most "
             f"{ACCURACY_LOSS * 100:g} accuracy point lost, label AUC <= {LABEL_AUC:g} (the strongest of the norm, "
             f"direction, aligned direction and hidden-state attacks). "
             "Frontier: no other setting recovers fewer tokens and keeps more accuracy.", "",
             "| K | setting | recovery cut | accuracy change | label AUC (max) | frontier | meets all |",
             "|---|---|---|---|---|---|---|"]
    for a in found:
        change = "-" if a.accuracy_change is None else f"{a.accuracy_change * 100:+.1f} points"
        auc = "-" if a.label_auc is None else f"{a.label_auc:.3f}"
        lines.append(f"| {a.row.owner_blocks} | {a.row.privacy.describe()} | {a.recovery_cut:.0%} | {change} | {auc} | "
                     f"{'yes' if a.frontier else ''} | {'yes' if a.meets else 'no'} |")
    for a in (a for a in found if a.row.privacy.preset):
        lines += ["", f"Preset `{a.row.privacy.preset}` (K={a.row.owner_blocks}): "
                      f"{'meets every target' if a.meets else 'misses ' + ', '.join(_missed(a))}."]
    return "\n".join(lines)


def _missed(a: Assessment) -> list[str]:
    missed = []
    if a.recovery_cut < RECOVERY_CUT:
        missed.append(f"the recovery cut ({a.recovery_cut:.0%} < {RECOVERY_CUT:.0%})")
    if a.accuracy_change is None:
        missed.append("the accuracy target (not measured: add --test)")
    elif a.accuracy_change < -ACCURACY_LOSS - 1e-9:
        missed.append(f"the accuracy target ({a.accuracy_change * 100:+.1f} points)")
    if a.label_auc is None or a.label_auc > LABEL_AUC:
        missed.append("the label AUC target" + ("" if a.label_auc is None else f" ({a.label_auc:.3f})"))
    return missed


def table(rows: list[AuditRow]) -> str:
    return "\n".join([TABLE_HEADER, *(format_row(r) for r in rows), "", recovery_note(rows), "",
                      targets_note(rows)]).rstrip() + "\n"


def write_json(rows: list[AuditRow], path: Path, extra: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**(extra or {}), "rows": [{**asdict(r), "privacy": r.privacy.to_dict()}
                                                          for r in rows]}, indent=1))


def plot(rows: list[AuditRow], path: Path) -> Path | None:
    """With accuracy measured: learned recovery (x) against accuracy (y), one line per K, the target region
    shaded. Without: learned recovery and label AUC per K, one line per setting. None (and no file) when
    there is nothing to plot."""
    if not rows:
        return None
    try:
        import matplotlib
    except ImportError:
        raise ValueError("the plot needs matplotlib: pip install 'ringtune[bench]'") from None
    matplotlib.use("Agg")
    from matplotlib import pyplot

    if any(r.accuracy is not None for r in rows):
        figure = _frontier(pyplot, [r for r in rows if r.accuracy is not None])
    else:
        figure = _attacks(pyplot, rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return path


def _frontier(pyplot, rows: list[AuditRow]):
    figure, axes = pyplot.subplots(figsize=(7.5, 5))
    for k in sorted({r.owner_blocks for r in rows}):
        points = sorted((r for r in rows if r.owner_blocks == k), key=lambda r: r.learned_recovery)
        xs = [100 * r.learned_recovery for r in points]
        ys = [100 * r.accuracy for r in points]
        axes.plot(xs, ys, marker="o", label=f"owner keeps {k} block(s) at each end")
        for r, x, y in zip(points, xs, ys):
            axes.annotate(_point_label(r), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    frontier = sorted((a.row for a in assess(rows) if a.frontier), key=lambda r: r.learned_recovery)
    if frontier:
        axes.plot([100 * r.learned_recovery for r in frontier], [100 * r.accuracy for r in frontier], color="black",
                  lw=2, alpha=0.25, label="frontier (privatized settings)")
    base = reference(rows)
    if base is not None and base.accuracy is not None:  # the target: left of the recovery cut, above the loss
        low, high = axes.get_ylim()
        floor = 100 * (base.accuracy - ACCURACY_LOSS)
        axes.fill_between([0, 100 * (1 - RECOVERY_CUT) * base.learned_recovery], floor, max(high, floor + 1),
                          color="tab:green", alpha=0.12, label=f"target: >= {RECOVERY_CUT:.0%} less recovery than "
                          f"K={base.owner_blocks} off, <= {ACCURACY_LOSS * 100:g} point lost")
        axes.set_ylim(min(low, floor - 1), max(high, floor + 1))
    axes.set_xlabel("private tokens recovered by the learned inverter (%)")
    axes.set_ylabel("held-out accuracy (%)")
    axes.set_title("privacy against accuracy, after fine-tuning under each setting")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    return figure


def _attacks(pyplot, rows: list[AuditRow]):
    """Token recovery and label AUC against K, one line per setting (settings are matched across K by their
    noise level and mechanism)."""
    figure, (tokens, labels) = pyplot.subplots(1, 2, figsize=(11, 4.5))
    settings: dict[str, list[AuditRow]] = {}
    for r in rows:
        settings.setdefault(_point_label(r), []).append(r)
    for name, group in settings.items():
        group.sort(key=lambda r: r.owner_blocks)
        ks = [r.owner_blocks for r in group]
        line, = tokens.plot(ks, [100 * r.learned_recovery for r in group], marker="o", label=f"{name}: learned")
        tokens.plot(ks, [100 * r.nn_recovery for r in group], marker="x", ls=":", color=line.get_color(),
                    label=f"{name}: nearest neighbour")
        if all(r.norm_auc is not None for r in group):
            labels.plot(ks, [r.norm_auc for r in group], marker="o", color=line.get_color(), label=f"{name}: norm")
            labels.plot(ks, [r.direction_auc for r in group], marker="s", ls="--", color=line.get_color(),
                        label=f"{name}: direction")
    tokens.set_xlabel("blocks the owner keeps at each end (K)")
    tokens.set_ylabel("private tokens recovered (%)")
    tokens.set_title("token recovery from the hidden states sent")
    labels.axhline(LABEL_AUC, color="tab:red", lw=0.8, ls="--", label=f"target <= {LABEL_AUC:g}")
    labels.set_xlabel("blocks the owner keeps at each end (K)")
    labels.set_ylabel("label attack ROC-AUC (0.5 = no leak)")
    labels.set_title("label inference from the gradients sent")
    for axes in (tokens, labels):
        axes.set_xticks(sorted({r.owner_blocks for r in rows}))
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.tight_layout()
    return figure


def _point_label(r: AuditRow) -> str:
    return r.setting or ("off" if not r.privacy.active else r.privacy.describe())
