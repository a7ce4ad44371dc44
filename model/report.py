"""The simulator's report: ``rows/*.json`` -> ``results.json``, ``results.md``, ``results.png``.

Reads whatever rows exist in a simulator output folder (several processes may be writing
it), adds "% of full" (a cycle's mIoU over the ``full`` row's last-cycle mIoU), and writes
the three files atomically. ``python -m model.report OUT`` (or ``python -m model.simulate
--out OUT --report-only``) rebuilds them.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from model.atomic import atomic_write, atomic_write_bytes

ROW_ORDER = (
    "full",
    "initial-only",
    "mean-teacher",
    "random-regions",
    "entropy-regions",
    "image-entropy",
)


def _order(name: str) -> tuple:
    return (ROW_ORDER.index(name) if name in ROW_ORDER else len(ROW_ORDER), name)


def collect(out: str | Path) -> dict:
    """All rows of ``out/rows/*.json`` with ``pct_of_full`` filled in."""
    out = Path(out)
    rows = []
    for path in sorted((out / "rows").glob("*.json")):
        try:
            rows.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as error:
            print(f"warning: skipping {path}: {error}", file=sys.stderr)
    rows.sort(key=lambda row: _order(row["row"]))
    full = next((row for row in rows if row["row"] == "full" and row["cycles"]), None)
    reference = None
    if full:
        last = full["cycles"][-1]
        reference = {
            "miou": last["miou"],
            "cycle": last["cycle"],
            "complete": full.get("complete", False),
        }
    for row in rows:
        for record in row["cycles"]:
            record["pct_of_full"] = (
                100.0 * record["miou"] / reference["miou"]
                if reference and reference["miou"]
                else None
            )
    return {"generated": time.strftime("%Y-%m-%d %H:%M:%S"), "full": reference, "rows": rows}


def _pct(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.{digits}f}"


def markdown(results: dict) -> str:
    rows = results["rows"]
    lines = ["# Label efficiency (model.simulate)", ""]
    if not rows:
        return "\n".join([*lines, "No rows yet.", ""])
    first = header_row(rows)
    p = first["protocol"]
    lines += [
        f"Protocol `{p['name']}`, seed {first['seed']}: {first['train_images']} train / "
        f"{first['val_images']} val images at {first['image_size'][0]}x"
        f"{first['image_size'][1]}, crop {p['crop']}, iterations per cycle "
        f"{p['iterations']} (cold start {p['cold_start_fraction']:.0%} of each SSL cycle), "
        f"{'warm start' if p['warm_start'] else 'restart'} between cycles; blocks "
        f"{first['block']} px, {p['regions_per_image']} per image per acquisition "
        f"({p['selection']}), scored by the {p['score_with']}; mIoU of the "
        f"{p['eval_with']} on val. Backbone: {first['backbone_weights']}.",
        "",
        *setting_differences(rows, first),
    ]
    full = results["full"]
    if full is None:
        lines += ["No `full` row yet: % of full is blank.", ""]
    elif not full["complete"]:
        lines += [f"`full` is not complete (cycle {full['cycle']}): % of full is provisional.", ""]
    lines += [
        "| row | method | cycle | labelled px % | mIoU % | % of full | student mIoU % "
        "| acquired void % | wall min | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for r in row["cycles"]:
            acquired = r.get("acquired") or {}
            void = acquired.get("void_fraction")
            pct = r.get("pct_of_full")
            lines.append(
                f"| {row['row']} | {row['method']} | {r['cycle']} | "
                f"{100 * r['labelled_fraction']:.2f} | {_pct(r['miou'])} | "
                f"{'-' if pct is None else f'{pct:.1f}'} | {_pct(r['student']['miou'])} | "
                f"{_pct(void)} | {r['wall_s'] / 60:.1f} | {r['peak_rss_mb']:.0f} |"
            )
    classes = first["classes"]
    lines += [
        "",
        "Per-class IoU % at each row's last cycle:",
        "",
        "| row | " + " | ".join(classes) + " |",
        "|---|" + "---|" * len(classes),
    ]
    for row in rows:
        if row["cycles"]:
            iou = row["cycles"][-1]["iou"]
            lines.append(f"| {row['row']} | " + " | ".join(_pct(v) for v in iou) + " |")
    lines += plar_table(rows)
    commands = sorted({row.get("command", "") for row in rows if row.get("command")})
    if commands:
        lines += ["", "Commands:", "", "```", *commands, "```"]
    lines.append("")
    return "\n".join(lines)


def header_row(rows: list[dict]) -> dict:
    """The row whose settings the report's header describes: the first acquisition row
    (the one the protocol is about), else the first row."""
    return next((row for row in rows if row.get("acquisition")), rows[0])


# what rows of one comparison are allowed to differ in: their identity and the bookkeeping
_ROW_OWN = {"row", "method", "start", "acquisition", "heuristic", "cycle_budget_pixels",
            "cycles", "complete", "command", "torch", "threads", "host"}
_PROTOCOL_OWN = {"description", "rows"}


def _shaping_settings(row: dict) -> dict:
    settings = {k: v for k, v in row.items() if k not in _ROW_OWN}
    protocol = settings.pop("protocol", {})
    settings.update({k: v for k, v in protocol.items() if k not in _PROTOCOL_OWN})
    return settings


def setting_differences(rows: list[dict], reference: dict) -> list[str]:
    """Markdown lines naming every row run with other settings than the header's row (e.g.
    a `full` row kept from an earlier start split: it never reads the split), so a reader
    sees what was not held equal."""
    base = _shaping_settings(reference)
    lines = []
    for row in rows:
        own = _shaping_settings(row)
        keys = sorted(k for k in base.keys() | own.keys() if base.get(k) != own.get(k))
        if keys:
            shown = ", ".join(f"{k} = {own.get(k)!r} (header: {base.get(k)!r})" for k in keys)
            lines.append(f"- `{row['row']}` was run with other settings: {shown}.")
    return [*lines, ""] if lines else []


def full_reference_lines(ax, miou: float, label: str) -> None:
    """`full` as a horizontal line with its 95% level (its 100% of the pixels would
    squash the x axis)."""
    ax.axhline(miou, color="black", lw=1.2, label=label)
    ax.axhline(0.95 * miou, color="black", lw=0.8, ls=":", label="95% of full")


def plar_table(rows: list[dict]) -> list[str]:
    """Markdown lines on what the tsf rows' error masks, PLAR and queue did at each cycle
    (`model.refinement.plar_audit` against the truth, and the queued pixels acquisition took);
    none without such rows."""
    audited = [(row, r) for row in rows for r in row["cycles"] if r.get("plar")]
    if not audited:
        return []
    lines = [
        "",
        "Error mask, PLAR and queue (pixels of 64 pool images after each cycle, against the "
        "truth; queued = what acquisition labels first in the next cycle):",
        "",
        "| row | cycle | error mask | precision % | recall % | corrected | right % "
        "| pseudo-label right there % | disagreeing | PL accuracy % | trained-target accuracy % "
        "| queued px acquired (before this cycle) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row, r in audited:
        a, q = r["plar"], r.get("acquired") or {}
        taken = q.get("queued_acquired")
        taken = "-" if taken is None else f"{taken} of {q['pixels']}"
        lines.append(
            f"| {row['row']} | {r['cycle']} | {a['error']} | {_pct(a['error_precision'])} | "
            f"{_pct(a['error_recall'])} | {a['corrected']} | {_pct(a['corrected_accuracy'])} | "
            f"{_pct(a['corrected_pl_accuracy'])} | {a['queued']} | {_pct(a['pl_accuracy'])} | "
            f"{_pct(a['target_accuracy'])} | {taken} |"
        )
    return lines


def plot(results: dict, path: str | Path) -> None:
    """mIoU against labelled-pixel share, one line per row (cycles as points), ``full`` as
    its reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for row in results["rows"]:
        cycles = row["cycles"]
        if not cycles:
            continue
        if row["row"] == "full":
            miou = 100 * cycles[-1]["miou"]
            full_reference_lines(ax, miou, f"full (100% px): {miou:.1f}")
            continue
        x = [100 * c["labelled_fraction"] for c in cycles]
        y = [100 * c["miou"] for c in cycles]
        if row.get("acquisition"):
            ax.plot(x, y, marker="o", label=row["row"])
        else:  # no acquisition: the fraction does not move; show the last cycle
            ax.plot(x[-1:], y[-1:], marker="s", ls="none", label=f"{row['row']} (last cycle)")
    ax.set_xlabel("labelled pixels (% of the train set)")
    ax.set_ylabel("val mIoU (%)")
    rows = results["rows"]
    if rows:
        first = header_row(rows)
        ax.set_title(f"{first['protocol']['name']}, seed {first['seed']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda file: fig.savefig(file, format="png"))
    plt.close(fig)


def write_report(out: str | Path) -> list[Path]:
    """Write ``results.json``, ``results.md`` and ``results.png`` into ``out``."""
    out = Path(out)
    results = collect(out)
    paths = [out / "results.json", out / "results.md", out / "results.png"]
    atomic_write_bytes(paths[0], json.dumps(results, indent=1).encode())
    atomic_write_bytes(paths[1], markdown(results).encode())
    plot(results, paths[2])
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: python -m model.report OUT")
    print("\n".join(str(p) for p in write_report(sys.argv[1])))
