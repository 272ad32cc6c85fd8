"""What the commands share: Hydra callbacks and one-line user errors."""

from __future__ import annotations

import csv
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ddpm.results import collect, write_table


def plain(value: Any) -> Any:
    """A config value as plain Python (a list or dict node as a list or dict; others as they
    are), for checks that name the value as the user wrote it."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    """Rows of equal keys as a CSV file."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def user_error_message(error: BaseException) -> str | None:
    """The one-sentence message of a configuration error, or None if it is not one."""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    if isinstance(error, OmegaConfBaseException):
        key = getattr(error, "full_key", None)
        message = str(error).splitlines()[0]
        return f"{key}: {message}" if key else message
    if isinstance(error, ValueError):
        return str(error)
    return None


def check_writable_folder(folder: str | Path, key: str = "paths.log_dir") -> None:
    """Raise a one-sentence ValueError when `folder` cannot be created or written to."""
    path = Path(folder).absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(
            f"{key}: the run folder {path} cannot be created because {existing} is a file; "
            "choose a folder you can write to."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"{key}: the run folder {path} cannot be created because {existing} is not "
            "writable; choose a folder you can write to."
        )


class CheckOutputFolder(Callback):
    """A Hydra callback: refuse, in one line, a run or sweep folder that cannot be written,
    before Hydra tries to create it (which would end in a traceback)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(config)  # run.dir reads ${hydra:runtime.choices...}
        with user_errors():
            check_writable_folder(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with user_errors():
            check_writable_folder(config.hydra.sweep.dir)
        # a sweeper may keep its state there before any job runs (Optuna's SQLite study)
        Path(config.paths.log_dir).mkdir(parents=True, exist_ok=True)


class ResultsTable(Callback):
    """A Hydra callback: in a multirun (local, Optuna or SLURM alike), one row per job of the
    sweep folder from its results.json, written as results.csv, results.md and results.png
    beside the jobs after every job (so a long sweep shows its progress, and a sweep that a
    failed job ends still has its table) and at the end."""

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        from hydra.types import RunMode

        if config.hydra.mode == RunMode.MULTIRUN:
            self.write(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        rows = self.write(Path(config.hydra.sweep.dir))
        if rows:
            logging.getLogger(__name__).info(
                f"results of {rows} job(s): {Path(config.hydra.sweep.dir) / 'results.md'}"
            )

    @staticmethod
    def write(sweep_dir: Path) -> int:
        """Write the table when some job finished (not for sweeps of other commands); the
        number of rows."""
        rows, swept = collect(sweep_dir)
        if not any(row["status"] == "finished" for row in rows):
            return 0
        write_table(sweep_dir, rows, swept)
        return len(rows)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a configuration error raised inside into `Error: <sentence>` and exit code 1
    (the traceback too with HYDRA_FULL_ERROR=1); other exceptions pass through."""
    try:
        yield
    except Exception as error:
        message = user_error_message(error)
        if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"Error: {message}", file=sys.stderr)
        sys.exit(1)


# What the console would show that the project cannot fix and a user need not read: deprecation
# notices raised inside Lightning and torchdata about their own calls, Lightning's advertising
# tip, its warning that an epoch is shorter than log_every_n_steps (our runs count steps
# across epochs), torchmetrics' note that KID keeps its features (ours are small), and litdata's
# INFO lines. Each is matched by its message and the module that raises it, nothing wider.
KNOWN_NOISE = (
    (r".*'set_vital' is deprecated", r"torchdata\.stateful_dataloader"),
    (r".*isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\.utilities"),
    (r".*torch\.distributed\.nn\.functional\.all_gather is deprecated", r"lightning\.fabric"),
    (r"The number of training batches .* is smaller than the logging interval", r"lightning"),
    (r".*Metric `Kernel Inception Distance` will save all extracted features", r"torchmetrics"),
    # data=streaming: litdata gives each loader worker its own share, which this warns may not be
    (r"Your `IterableDataset` has `__len__` defined", r"lightning"),
)


def quiet_known_noise() -> None:
    """Filter `KNOWN_NOISE` and Lightning's tip lines from this process's console."""
    for message, module in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, module=module)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not record.getMessage().startswith("💡 Tip")
    )
    # litdata's INFO lines (the cache size it would use for a folder it reads in place, ...)
    logging.getLogger("litdata").setLevel(logging.WARNING)
