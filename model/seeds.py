"""Several seeds of one simulator protocol -> mean and standard deviation, the issue's
targets checked, and plots with error bars and the val curve of every cycle.

    python -m model.seeds PARENT        # PARENT/seed<S>/rows/*.json -> PARENT/results.*

Each ``PARENT/seed<S>`` is one ``python -m model.simulate --seed S --out PARENT/seed<S>``
folder (its own start split). A row's figure at a cycle is averaged over the seeds that
finished that cycle; ``n`` says how many. "% of full" is the mean mIoU over the mean of the
``full`` row's last cycle. Standard deviations are sample ones (n - 1); with one seed they
are blank, and no target is judged on fewer than two.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from model.atomic import atomic_write, atomic_write_bytes
from model.report import ROW_ORDER, collect, full_reference_lines

TARGET_PCT_OF_FULL = 95.0
TARGET_MAX_LABELLED = 0.15


def gather(parent: str | Path) -> dict[str, dict[int, list[dict]]]:
    """{row: {cycle: [that cycle's record from each seed]}} over ``parent/seed*``."""
    rows: dict[str, dict[int, list[dict]]] = {}
    for folder in sorted(Path(parent).glob("seed*")):
        for row in collect(folder)["rows"]:
            for record in row["cycles"]:
                rows.setdefault(row["row"], {}).setdefault(record["cycle"], []).append(record)
    return dict(sorted(rows.items(), key=lambda kv: _order(kv[0])))


def _order(name: str) -> tuple:
    return (ROW_ORDER.index(name) if name in ROW_ORDER else len(ROW_ORDER), name)


def _stats(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else None


def summarise(rows: dict[str, dict[int, list[dict]]]) -> dict:
    """Per row and cycle: n, labelled fraction, mIoU mean / sd (teacher headline and
    student), and % of the full row's mean."""
    full = rows.get("full")
    full_miou = _stats([r["miou"] for r in full[max(full)]])[0] if full else None
    summary: dict[str, list[dict]] = {}
    for name, cycles in rows.items():
        summary[name] = []
        for cycle, records in sorted(cycles.items()):
            miou, sd = _stats([r["miou"] for r in records])
            student, student_sd = _stats([r["student"]["miou"] for r in records])
            summary[name].append({
                "cycle": cycle,
                "n": len(records),
                "labelled_fraction": statistics.fmean(r["labelled_fraction"] for r in records),
                "miou": miou,
                "miou_sd": sd,
                "student_miou": student,
                "student_miou_sd": student_sd,
                "pct_of_full": 100 * miou / full_miou if full_miou else None,
            })  # fmt: skip
    return {"full_miou": full_miou, "rows": summary}


def verdicts(summary: dict) -> list[str]:
    """The issue-12 targets on the last cycle of each row, in words."""
    rows = {name: cycles[-1] for name, cycles in summary["rows"].items() if cycles}
    lines = []
    s4al = rows.get("entropy-regions")
    if s4al and s4al["pct_of_full"] is not None and s4al["n"] > 1:
        ok = (
            s4al["pct_of_full"] >= TARGET_PCT_OF_FULL
            and s4al["labelled_fraction"] <= TARGET_MAX_LABELLED
        )
        lines.append(
            f"S4AL at {100 * s4al['labelled_fraction']:.1f}% of the pixels: "
            f"{s4al['pct_of_full']:.1f}% of full (target >= {TARGET_PCT_OF_FULL:.0f}% with "
            f"<= {100 * TARGET_MAX_LABELLED:.0f}%): {'met' if ok else 'MISSED'}"
        )
        for other in ("random-regions", "initial-only"):
            if other in rows and rows[other]["n"] > 1:
                gap = s4al["miou"] - rows[other]["miou"]
                sd = max(s4al["miou_sd"] or 0.0, rows[other]["miou_sd"] or 0.0)
                lines.append(
                    f"S4AL - {other}: {100 * gap:+.1f} mIoU points, larger sd "
                    f"{100 * sd:.1f}: {'met' if gap > sd else 'MISSED'} (> one sd)"
                )
    if "mean-teacher" in rows and "initial-only" in rows:
        gap = rows["mean-teacher"]["miou"] - rows["initial-only"]["miou"]
        lines.append(
            f"mean-teacher - initial-only: {100 * gap:+.1f} mIoU points: "
            f"{'met' if gap > 0 else 'MISSED'} (semi-supervision helps)"
        )
    return lines or ["No target can be judged yet (rows or seeds missing)."]


def _cell(mean: float | None, sd: float | None) -> str:
    if mean is None:
        return "-"
    return f"{100 * mean:.1f}" + ("" if sd is None else f" ± {100 * sd:.1f}")


def markdown(summary: dict) -> str:
    lines = [
        "# Label efficiency over seeds (model.seeds)",
        "",
        "| row | cycle | seeds | labelled px % | mIoU % (mean ± sd) | % of full | student mIoU % |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, cycles in summary["rows"].items():
        for c in cycles:
            pct = "-" if c["pct_of_full"] is None else f"{c['pct_of_full']:.1f}"
            lines.append(
                f"| {name} | {c['cycle']} | {c['n']} | {100 * c['labelled_fraction']:.2f} | "
                f"{_cell(c['miou'], c['miou_sd'])} | {pct} | "
                f"{_cell(c['student_miou'], c['student_miou_sd'])} |"
            )
    lines += ["", "Targets (issue 12), last cycle of each row:", ""]
    lines += [f"- {line}" for line in verdicts(summary)]
    return "\n".join([*lines, ""])


def plot(summary: dict, rows: dict[str, dict[int, list[dict]]], path: Path) -> None:
    """Left: mean mIoU against labelled pixels with one-sd error bars; right: every
    cycle's val curve (mIoU against the row's cumulative iteration), one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120)
    for name, cycles in summary["rows"].items():
        if name == "full":
            miou = 100 * cycles[-1]["miou"]
            full_reference_lines(left, miou, f"full: {miou:.1f}")
            continue
        x = [100 * c["labelled_fraction"] for c in cycles]
        y = [100 * c["miou"] for c in cycles]
        err = [100 * (c["miou_sd"] or 0.0) for c in cycles]
        left.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
    for index, (name, cycles) in enumerate(rows.items()):
        colour = f"C{index}"
        for seed in range(max(len(records) for records in cycles.values())):
            xs, ys, offset = [], [], 0
            for _, records in sorted(cycles.items()):
                if seed < len(records):
                    for point in records[seed].get("curve", []):
                        xs.append(offset + point["iteration"])
                        ys.append(100 * point["teacher_miou"])
                    offset += records[seed]["iterations"]
            right.plot(xs, ys, color=colour, lw=1, label=name if seed == 0 else None)
    left.set_xlabel("labelled pixels (% of the train set)")
    left.set_ylabel("val mIoU % (mean ± sd over seeds)")
    right.set_xlabel("iteration (cycles one after another)")
    right.set_ylabel("val mIoU % of the teacher")
    right.set_title("val curve of every cycle, one line per seed")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda file: fig.savefig(file, format="png"))
    plt.close(fig)


def write_report(parent: str | Path) -> list[Path]:
    parent = Path(parent)
    rows = gather(parent)
    summary = summarise(rows)
    paths = [parent / "results.json", parent / "results.md", parent / "results.png"]
    atomic_write_bytes(paths[0], json.dumps(summary, indent=1).encode())
    atomic_write_bytes(paths[1], markdown(summary).encode())
    plot(summary, rows, paths[2])
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: python -m model.seeds PARENT")
    print("\n".join(str(p) for p in write_report(sys.argv[1])))
