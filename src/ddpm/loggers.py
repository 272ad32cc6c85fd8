"""Logger factories that need more than a `_target_` (wandb that never prompts or hangs, a CSV
logger that keeps a resumed run's earlier rows), a guard that keeps a failing logger from ending a
run, and how the commands log their results."""

from __future__ import annotations

import csv
import functools
import netrc
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that a metrics.csv already in the folder (a run resumed in
    its own folder, `ckpt_path=auto`) is continued, not deleted: its columns are read first, so
    that new ones rewrite the header over the old rows, as within one process."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = sorted(next(csv.reader(file), []))


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger whose metrics.csv keeps the rows of earlier processes of the run
    (Lightning's own deletes the file when a resumed run opens it). Rows a killed run logged after
    its last checkpoint stay, and the resumed run logs those steps again below them."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def wandb_credentials_found() -> bool:
    """True when WANDB_API_KEY is set or ~/.netrc (or $NETRC) has a login for the wandb host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_logger(
    save_dir: str,
    offline: bool | None = None,
    group: str | None = None,
    **kwargs: Any,
) -> WandbLogger:
    """A WandbLogger that is offline unless it can log live without asking anything.

    `offline=None` decides from the environment: WANDB_MODE=offline|online|disabled wins; without
    it, the run is online only when credentials are found. In a Hydra multirun, runs without an
    explicit `group` are grouped by the sweep folder.
    """
    mode = os.environ.get("WANDB_MODE", "").lower()
    if offline is None:
        offline = mode in ("offline", "dryrun") or (mode == "" and not wandb_credentials_found())
    if group is None:
        group = _hydra_sweep_group()
    wandb_dir = Path(save_dir) / "wandb"
    if offline:
        rank_zero_info(
            f"wandb: logging offline to {wandb_dir}; upload with "
            f"`wandb sync {wandb_dir}/offline-run-*`"
            " (or set WANDB_MODE=online after `wandb login` to log live)."
        )
    return WandbLogger(save_dir=save_dir, offline=offline, group=group, **kwargs)


GUARDED_METHODS = ("log_metrics", "log_hyperparams", "log_image", "save", "finalize")


def guard_logger(logger: Any) -> Any:
    """Make a logger's failures (wandb unreachable, a full disk under the log folder) warnings:
    the first is reported with the logger and the error, later ones are dropped silently, and
    training goes on. The logger keeps its class, so isinstance checks still work."""
    reported = []

    def guarded(name: str, method: Any) -> Any:
        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            except Exception as error:  # a logger must never end training
                if not reported:
                    reported.append(error)
                    rank_zero_warn(
                        f"logger {type(logger).__name__} failed in {name} ({type(error).__name__}: "
                        f"{error}); training goes on, and its further failures are not reported."
                    )
                return None

        return call

    for name in GUARDED_METHODS:
        method = getattr(logger, name, None)
        if method is not None:
            setattr(logger, name, guarded(name, method))
    return logger


def finish_wandb(loggers: list[Any]) -> None:
    """End the wandb run, so that the next job of a multirun in this process starts its own."""
    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        wandb.finish()


def _hydra_sweep_group() -> str | None:
    """In a multirun, the sweep folder as a name (`train-multirun-<timestamp>`), else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return "-".join(Path(HydraConfig.get().sweep.dir).parts[-3:])


def flatten_numbers(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a nested dict, with '/'-joined keys."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(flatten_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat


def log_results(
    logger_node: Any, summary: dict[str, Any], rows: Sequence[dict[str, Any]] = (), prefix: str = ""
) -> None:
    """Send a command's results to the loggers its config names (`logger` group): each of `rows`
    at its step `t`, then the numeric leaves of `summary`, all keys as `prefix/<key>`."""
    from hydra.utils import instantiate

    loggers = [guard_logger(instantiate(v)) for v in (logger_node or {}).values() if v]
    for logger in loggers:
        for row in rows:
            values = flatten_numbers({k: v for k, v in row.items() if k != "t"}, f"{prefix}/")
            logger.log_metrics(values, step=int(row["t"]))
        logger.log_metrics(flatten_numbers(summary, f"{prefix}/"))
        logger.save()
    finish_wandb(loggers)
