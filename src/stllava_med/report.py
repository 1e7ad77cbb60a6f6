"""Collect a Hydra multirun directory into a CSV, a Markdown table and PNG plots.

    python -m stllava_med.report logs/multirun/train_dpo/2026-11-26_10-00-00
    python -m stllava_med.report <multirun dir> out=<dir>

Every job folder (``0/``, ``1/``, ...) contributes one row: its swept parameters (from
``.hydra/overrides.yaml``), its status and its headline numbers (from the ``run_info.json`` each stage writes
into its Hydra job folder). Jobs that crashed or never finished are listed with status ``failed`` or
``missing``, never dropped. Plots: each VQA metric against ``data.fraction`` with one line per ``dpo.beta``
(when those were swept), and DPO reward accuracy over training steps per job (from the CSV logger).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from stllava_med.utils.io import atomic_write_text

log = logging.getLogger(__name__)

VQA_METRICS = ("open_recall", "open_f1", "closed_accuracy", "closed_accuracy_yesno", "closed_accuracy_strict")
_REWARD_ACC = re.compile(r"^train/.*reward.*acc", re.IGNORECASE)


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}/"))
        return out
    if isinstance(obj, int | float | str | bool) or obj is None:
        out[prefix.rstrip("/")] = obj
    return out


def _overrides(job_dir: Path) -> dict[str, str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    params = {}
    for item in yaml.safe_load(path.read_text()) or []:
        key, _, value = str(item).partition("=")
        params[key.lstrip("+~")] = value
    return params


def _job_status(job_dir: Path) -> tuple[str, str]:
    if (job_dir / "run_info.json").is_file():
        return "ok", ""
    logs = sorted(job_dir.glob("*.log")) + sorted((job_dir.parent / ".submitit").glob("*/*_log.err"))
    for log_file in logs:
        text = log_file.read_text(errors="replace")[-4000:]
        if "Traceback" in text or "Error" in text:
            last = [line for line in text.splitlines() if line.strip()][-1:]
            return "failed", last[0][:200] if last else "error in log"
    return "missing", "no run_info.json (job did not finish)"


def collect(multirun_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder (numbered sub-directories of the multirun directory)."""
    jobs = sorted((p for p in multirun_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if not jobs:
        raise FileNotFoundError(f"{multirun_dir}: no job folders (0/, 1/, ...): is this a Hydra multirun directory?")
    rows = []
    for job_dir in jobs:
        status, reason = _job_status(job_dir)
        row: dict[str, Any] = {"job": int(job_dir.name), "status": status, "reason": reason, **_overrides(job_dir)}
        if status == "ok":
            info = json.loads((job_dir / "run_info.json").read_text())
            row["stage"] = info.get("stage")
            row["out_dir"] = info.get("out_dir")
            # where this job's training logs are (a pipeline's DPO stages; a train_dpo job's own run dir)
            row["log_dirs"] = list(info.get("log_dirs") or [info.get("out_dir")])
            for key, value in _flatten({k: v for k, v in info.items() if k not in ("stage", "out_dir")}).items():
                row[key] = value
        rows.append(row)
    return rows


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    first = ["job", "status"]
    params = sorted({k for r in rows for k in r if "=" not in k and "/" not in k}
                    - {*first, "reason", "stage", "out_dir", "log_dirs"})
    metrics = sorted({k for r in rows for k in r if "/" in k})
    return [*first, *params, *metrics, "stage", "reason", "out_dir"]  # log_dirs: plotting only


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    columns = _columns(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}" if abs(value) < 1 else f"{value:.2f}"
    return "" if value is None else str(value)


def markdown(rows: list[dict[str, Any]]) -> str:
    columns = [c for c in _columns(rows) if c not in ("out_dir",)]
    # keep the table readable: parameters, status and the headline metrics only
    metric_cols = [c for c in columns if "/" in c and (c.rsplit("/", 1)[-1] in VQA_METRICS or "reward" in c
                                                       or c.endswith("/loss"))]
    shown = [c for c in columns if "/" not in c] + metric_cols
    lines = ["| " + " | ".join(shown) + " |", "|" + "|".join("---" for _ in shown) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in shown) + " |")
    return "\n".join(lines) + "\n"


def _as_float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _column(rows: list[dict[str, Any]], key: str) -> str:
    """The column holding ``key``: ``dpo.beta`` in a train_dpo sweep, ``stages.dpo.dpo.beta`` in a pipeline's."""
    names = {k for r in rows for k in r}
    return next((k for k in sorted(names, key=len) if k == key or k.endswith(f".{key}")), key)


def plot_metric_vs_fraction(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One PNG per VQA metric column: metric against data.fraction, one line per dpo.beta."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fraction, beta_key = _column(rows, "data.fraction"), _column(rows, "dpo.beta")
    ok = [r for r in rows if r["status"] == "ok" and _as_float(r.get(fraction)) is not None]
    written = []
    metric_cols = sorted({k for r in ok for k in r if "/" in k and k.rsplit("/", 1)[-1] in VQA_METRICS})
    for column in metric_cols:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        betas = sorted({r.get(beta_key, "-") for r in ok}, key=lambda b: _as_float(b) or 0.0)
        for beta in betas:
            points = sorted((_as_float(r[fraction]), _as_float(r.get(column))) for r in ok
                            if r.get(beta_key, "-") == beta and _as_float(r.get(column)) is not None)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"β={beta}")
        ax.set_xlabel("data fraction")
        ax.set_ylabel(column)
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{column.replace('/', '__')}_vs_fraction.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def plot_reward_accuracy(rows: list[dict[str, Any]], out_dir: Path) -> Path | None:
    """DPO reward accuracy over optimizer steps, one line per job, from each run's CSV log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    drawn = 0
    for row in rows:
        if row["status"] != "ok":
            continue
        for metrics_csv in sorted(p for d in row.get("log_dirs") or [] if d for p in Path(d).rglob("metrics.csv")):
            with open(metrics_csv, encoding="utf-8") as fh:
                records = list(csv.DictReader(fh))
            if not records:
                continue
            matching = [c for c in records[0] if _REWARD_ACC.match(c)]
            # per-step values when logged, else the per-epoch ones
            column = next((c for c in matching if c.endswith("_step")), matching[0] if matching else None)
            if column is None:
                continue
            points = [(int(float(r["step"])), float(r[column])) for r in records if r.get(column) not in ("", None)]
            if points:
                label = ", ".join(f"{k}={row[k]}" for k in row if "." in k and "/" not in k) or f"job {row['job']}"
                ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=label[:40])
                drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("reward accuracy (train)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "reward_accuracy.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def build_report(multirun_dir: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    multirun_dir = Path(multirun_dir)
    out_dir = Path(out) if out else multirun_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = collect(multirun_dir)
    csv_path = write_csv(rows, out_dir / "results.csv")
    table = markdown(rows)
    atomic_write_text(out_dir / "results.md", table)
    plots = [str(p) for p in plot_metric_vs_fraction(rows, out_dir)]
    reward = plot_reward_accuracy(rows, out_dir)
    if reward:
        plots.append(str(reward))
    summary = {"jobs": len(rows), "ok": sum(r["status"] == "ok" for r in rows),
               "failed": sum(r["status"] == "failed" for r in rows),
               "missing": sum(r["status"] == "missing" for r in rows),
               "csv": str(csv_path), "table": str(out_dir / "results.md"), "plots": plots}
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return {"rows": rows, "markdown": table, **summary}


USAGE = "usage: python -m stllava_med.report <multirun dir> [out=<dir>]"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(f"{USAGE}\n\n{(__doc__ or '').strip()}")
        return 0
    positional = [a for a in argv if "=" not in a]
    options = dict(a.split("=", 1) for a in argv if "=" in a)
    if len(positional) != 1:
        print(f"{USAGE}  (--help for more)", file=sys.stderr)
        return 2
    try:
        result = build_report(positional[0], options.get("out"))
    except FileNotFoundError as err:
        print(f"report: {err}", file=sys.stderr)
        return 2
    print(result["markdown"])
    print(f"{result['ok']}/{result['jobs']} jobs ok, {result['failed']} failed, {result['missing']} missing")
    print(f"written: {result['csv']}, {result['table']}, {len(result['plots'])} plot(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
