"""``python tools/variance_report.py RUN_DIR``: plots and a table of a run's loss and NELBO-variance figures.

Reads ``RUN_DIR/metrics.jsonl`` (also while the run is still writing it: an incomplete last line is skipped) and
writes PNGs next to it under ``RUN_DIR/report/``: loss and validation NELBO, per-block NELBO variance, the clip-window
scores of the latest search with the chosen window over time, the gradient variance across micro-batches and the loss
per t bucket, one file each and all of them on one page (``overview.png``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: RUN_DIR must be a run's log.dir (it holds metrics.jsonl)")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            continue
    if not records:
        raise ValueError(f"{path} has no complete records yet")
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


# ---- panels: each draws one figure of the report onto an axis ----
def panel_loss(ax, records):
    ax.plot(*series(records, "loss"), label="train loss (NELBO/token)", lw=0.8)
    ax.plot(*series(records, "val_nelbo"), "o-", label="validation NELBO")
    ax.set_xlabel("step"), ax.set_ylabel("nats/token"), ax.legend(), ax.set_title("loss")


def panel_log_series(ax, records, key, title):
    ax.plot(*series(records, key), lw=0.8)
    ax.set_yscale("log"), ax.set_xlabel("step"), ax.set_title(title)


def panel_window_scores(ax, searches):
    last = searches[-1]
    labels = [k.split("/", 1)[1] for k in last if k.startswith("clip_var/")]
    values = [last[f"clip_var/{k}"] for k in labels]
    ax.bar(range(len(values)), values)
    ax.set_xticks(range(len(values)), labels, rotation=90, fontsize=6)
    ax.set_title(f"clip-window NELBO variance at step {last['step']}")


def panel_chosen_window(ax, searches):
    steps = [r["step"] for r in searches]
    ax.plot(steps, [r["clip_window"][0] for r in searches], "o-", label="eps_min")
    ax.plot(steps, [r["clip_window"][1] for r in searches], "o-", label="eps_max")
    ax.set_ylim(0, 1.05), ax.legend(), ax.set_title("chosen window"), ax.set_xlabel("step")


def panel_loss_by_t(ax, records, bucket_keys):
    for k in bucket_keys:
        ax.plot(*series(records, k), lw=0.8, label=k.split("/", 1)[1])
    ax.set_yscale("log"), ax.set_xlabel("step"), ax.set_title("per-block loss by t bucket"), ax.legend(fontsize=6)


def make_report(run_dir: Path) -> list[Path]:
    """One PNG per figure under RUN_DIR/report/, plus overview.png with every available panel on one page."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    out_dir = run_dir / "report"
    out_dir.mkdir(exist_ok=True)
    written = []
    searches = [r for r in records if any(k.startswith("clip_var/") for k in r)]
    bucket_keys = sorted({k for r in records for k in r if k.startswith("loss_t/")})
    has_grad = bool(series(records, "grad_var")[0])

    # (file, panels); a file with two panels is drawn side by side
    def log_series(key, title):
        return lambda ax: panel_log_series(ax, records, key, title)

    figures = [
        ("loss.png", [lambda ax: panel_loss(ax, records)]),
        ("block_variance.png", [log_series("nelbo_block_var", "variance of per-block NELBO estimates (train)")]),
    ]
    if has_grad:
        figures.append(
            (
                "gradient_variance.png",
                [
                    log_series("grad_var", "gradient variance across micro-batches (probe)"),
                    log_series("grad_noise_ratio", "gradient noise / signal (probe)"),
                ],
            )
        )
    if searches:
        figures.append(
            (
                "clip_windows.png",
                [lambda ax: panel_window_scores(ax, searches), lambda ax: panel_chosen_window(ax, searches)],
            )
        )
    if bucket_keys:
        figures.append(("loss_by_t.png", [lambda ax: panel_loss_by_t(ax, records, bucket_keys)]))

    def save(fig, name):
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    for name, panels in figures:
        fig, axes = plt.subplots(1, len(panels), figsize=(7 if len(panels) == 1 else 12, 4), squeeze=False)
        for draw, ax in zip(panels, axes[0]):
            draw(ax)
        save(fig, name)

    every = [draw for _, panels in figures for draw in panels]
    cols = 3
    rows = -(-len(every) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < len(every):
            every[i](ax)
        else:
            ax.axis("off")
    fig.suptitle(f"{run_dir.resolve().name}: step {records[-1]['step']}")
    save(fig, "overview.png")
    return written


def table(run_dir: Path) -> str:
    records = read_metrics(run_dir)
    lines = [f"{'step':>8} {'loss':>9} {'val_nelbo':>10} {'val_ppl':>10} {'block_var':>10}  window"]
    for r in records:
        if "val_nelbo" not in r:
            continue
        window = "-" if "clip_window" not in r else f"[{r['clip_window'][0]:.3g}, {r['clip_window'][1]:.3g}]"
        fmt = lambda v, w: f"{v:>{w}.4g}" if isinstance(v, (int, float)) else f"{'-':>{w}}"  # noqa: E731
        lines.append(
            f"{r['step']:>8} {fmt(r.get('loss'), 9)} {fmt(r['val_nelbo'], 10)} {fmt(r['val_ppl'], 10)} "
            f"{fmt(r.get('nelbo_block_var'), 10)}  {window}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Plots and a table of a BD3 run's loss and variance figures.")
    p.add_argument("run_dir", type=Path, help="the run's log.dir (holds metrics.jsonl)")
    args = p.parse_args(argv)
    try:
        written = make_report(args.run_dir)
        print(table(args.run_dir))
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
