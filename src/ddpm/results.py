"""A sweep as a result: each training run leaves `results.json` in its folder (final metrics,
steps, wall time, and what `eval_after_fit` measured); `collect` reads a sweep folder's jobs
into rows and `write_table` writes results.csv, results.md and results.png beside them."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

RESULTS_FILE = "results.json"
# Keys that do not change what a run computes, left out of its digest.
VOLATILE_KEYS = ("ckpt_path", "paths", "logger", "run_name", "tags")
# Keys added to the training config since digests were first written, with their defaults.
ADDED_KEYS = {"conditioning": {"name": "none"}, "init_from": None}
# The metrics a table shows, when the runs have them: val/loss, val/bpd, the sample scores during
# training (val/fid, val/kid), everything eval_after_fit measured (test/...) and, in a sweep of
# ddpm-eval, what it measured (eval/...).
TABLE_METRICS = ("val/loss", "val/bpd", "val/fid", "val/kid", "test/", "eval/")
# results.png: these against the swept keys
PLOTTED = ("loss", "bpd", "ode_bpd", "fid", "class_accuracy", "energy_distance")


def config_digest(run_config: dict[str, Any]) -> str:
    """A hash of the resolved config without `VOLATILE_KEYS`: equal when a run would compute the
    same thing (a finished sweep job with the same digest is not trained again). Keys that
    configs of before lack are left out at their defaults (`ADDED_KEYS`), so that those digests
    stay as they were."""
    kept = {k: v for k, v in run_config.items() if k not in VOLATILE_KEYS}
    for key, default in ADDED_KEYS.items():
        if key in kept and kept[key] == default:
            del kept[key]
    return hashlib.sha1(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def _write_atomically(path: Path, data: bytes) -> None:
    """Write through a temporary file and a rename, so that a kill, or another job of the sweep
    writing the same table, leaves a whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    temporary.replace(path)


def headline_metrics(found: dict[str, Any], prefix: str = "test/") -> dict[str, float]:
    """The numbers a table shows of what ddpm-eval measured (its metrics.json), as
    `<prefix><name>`: the bound, the ODE's NLL with its calls per example and the exact NLL
    (when computed), FID with its floor and bootstrap spread, KID, the energy distance and the
    network calls per sample (when samples were drawn)."""
    fid = found.get("fid") or {}
    values = {
        "bpd": found.get("bpd"),
        "ode_bpd": found.get("ode_bpd"),
        "ode_bpd_stderr": found.get("ode_bpd_stderr"),
        "ode_nfe": found.get("ode_nfe"),
        "exact_bpd": found.get("exact_bpd"),
        "class_accuracy": found.get("class_accuracy"),
        "class_accuracy_real": found.get("class_accuracy_real"),
        "fid": fid.get("fid"),
        "fid_floor": fid.get("fid_floor"),
        "fid_bootstrap_std": fid.get("fid_bootstrap_std"),
        "kid": fid.get("kid_mean"),
        "kid_floor": fid.get("kid_floor_mean"),
        "energy_distance": (found.get("energy_distance") or {}).get("model"),
        "energy_distance_floor": (found.get("energy_distance") or {}).get(
            "floor_two_held_out_draws"
        ),
        "network_calls": found.get("network_calls"),
    }
    return {prefix + k: float(v) for k, v in values.items() if v is not None}


def write_run_results(output_dir: str | Path, record: dict[str, Any]) -> None:
    """results.json of one run (written atomically)."""
    text = json.dumps(record, indent=2, default=float) + "\n"
    _write_atomically(Path(output_dir) / RESULTS_FILE, text.encode())


def read_run_results(output_dir: str | Path) -> dict[str, Any] | None:
    """A run's results.json, or None when it has none (not finished) or it cannot be read."""
    path = Path(output_dir) / RESULTS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _job_overrides(job_dir: Path) -> dict[str, str]:
    """The job's command-line overrides (Hydra's .hydra/overrides.yaml) as key -> value."""
    pairs = OmegaConf.to_container(OmegaConf.load(job_dir / ".hydra" / "overrides.yaml"))
    return dict(pair.lstrip("+~").split("=", 1) for pair in pairs if "=" in pair)


def _job_settings(job_dir: Path, keys: list[str]) -> dict[str, str]:
    """What a job ran with for keys it did not override: its choice for a config group
    (`schedule`), else the value in its saved config; "" when it has neither."""
    choices = OmegaConf.load(job_dir / ".hydra" / "hydra.yaml").hydra.runtime.choices
    config = OmegaConf.load(job_dir / ".hydra" / "config.yaml")
    settings = {}
    for key in keys:
        value = (
            choices[key]
            if key in choices
            else OmegaConf.select(config, key, default=None, throw_on_resolution_failure=False)
        )
        settings[key] = "" if value is None or OmegaConf.is_config(value) else str(value)
    return settings


def collect(sweep_dir: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per job folder of a sweep (those with .hydra/), ordered by job number, and the
    swept keys: the overrides whose values differ between jobs (all of them for one job). A
    job run by another command into the same folder, without one of those overrides, shows
    the value it ran with (so that sweeps run one after another make one table)."""
    jobs = [p.parent.parent for p in Path(sweep_dir).glob("*/.hydra/overrides.yaml")]
    jobs.sort(key=lambda p: (int(p.name.split("_")[0]) if p.name[0].isdigit() else 1e9, p.name))
    overrides = [_job_overrides(job) for job in jobs]
    keys = list(dict.fromkeys(k for o in overrides for k in o))
    for job, chosen in zip(jobs, overrides, strict=True):
        missing = [k for k in keys if k not in chosen]
        if missing:
            chosen.update(_job_settings(job, missing))
    ckpt_keys = {"ckpt_path", "hydra.sweep.dir"}
    swept = [k for k in keys if k not in ckpt_keys and len({o.get(k) for o in overrides}) > 1]
    if len(jobs) == 1:
        swept = [k for k in keys if k not in ckpt_keys]
    records = [read_run_results(job) or {} for job in jobs]
    logged = dict.fromkeys(k for r in records for k in r.get("metrics", {}))
    shown = [k for prefix in TABLE_METRICS for k in logged if k.startswith(prefix)]
    rows = []
    for job, chosen, record in zip(jobs, overrides, records, strict=True):
        metrics = record.get("metrics", {})
        row: dict[str, Any] = {k: chosen.get(k, "") for k in swept}
        row.update({k: metrics.get(k) for k in shown})
        row["steps"] = record.get("step")
        row["wall_seconds"] = record.get("wall_seconds")
        row["status"] = "finished" if record else "unfinished"
        row["job"] = job.name.split("_")[0]
        row["run"] = job.name
        rows.append(row)
    return rows, swept


def _shown(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def write_table(sweep_dir: str | Path, rows: list[dict[str, Any]], swept: list[str]) -> None:
    """results.csv (every column), results.md (the columns some job has a value in, the job's
    number for its folder) and results.png (each metric against each swept key) in the sweep
    folder."""
    from PIL import Image

    from ddpm.figures import calls_figure, results_figure

    sweep_dir = Path(sweep_dir)
    columns = list(rows[0]) if rows else []
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _shown(v) for k, v in row.items()} for row in rows)
    _write_atomically(sweep_dir / "results.csv", text.getvalue().encode())
    shown = [c for c in columns if c != "run" and any(row[c] not in (None, "") for row in rows)]
    lines = [
        "| " + " | ".join(shown) + " |",
        "|" + "---|" * len(shown),
        *("| " + " | ".join(_shown(row[c]) for c in shown) + " |" for row in rows),
    ]
    _write_atomically(sweep_dir / "results.md", ("\n".join(lines) + "\n").encode())
    metrics = [c for c in shown if c.startswith(TABLE_METRICS) and c.rsplit("/", 1)[-1] in PLOTTED]
    png = io.BytesIO()
    figure = calls_figure if "sampler.steps" in swept and any(
        row.get("eval/network_calls") for row in rows
    ) else results_figure  # fmt: skip
    Image.fromarray(figure(rows, swept, metrics)).save(png, format="png")
    _write_atomically(sweep_dir / "results.png", png.getvalue())
