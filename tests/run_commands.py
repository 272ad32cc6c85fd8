"""Run many command lines of the project's commands in this one process and print, as JSON, each
one's exit status, standard output and standard error: a short run or an error row costs mostly
the interpreter's start-up (about 7 s, most of it importing Lightning), which this pays once.

    python tests/run_commands.py '[["train.py", "timesteps=0"], ["ddpm-sample", "..."], ...]'

Each line calls the command's own entry point (`python train.py` and `ddpm-train`:
ddpm.cli.train:main; `ddpm-sample`, `ddpm-eval`, `ddpm-truth`, `ddpm-import`, `ddpm-export`,
`ddpm-prepare`) with `sys.argv` set as the shell would set it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time

from hydra.core.global_hydra import GlobalHydra

from ddpm.cli import convert, evaluate, prepare, sample, train, truth

ENTRY_POINTS = {
    "train.py": train.main,
    "ddpm-sample": sample.main,
    "ddpm-eval": evaluate.main,
    "ddpm-truth": truth.main,
    "ddpm-import": convert.import_main,
    "ddpm-export": convert.export_main,
    "ddpm-prepare": prepare.main,
}


def run(words: list[str]) -> dict[str, object]:
    sys.argv = list(words)
    started = time.perf_counter()
    stdout, stderr = io.StringIO(), io.StringIO()
    code: object = 0
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
        try:
            ENTRY_POINTS[words[0]]()
        except SystemExit as error:
            code = 0 if error.code is None else error.code
        except Exception as error:  # noqa: BLE001 - reported like the interpreter would
            import traceback

            traceback.print_exc(file=stderr)
            code = f"Traceback: {error!r}"
    GlobalHydra.instance().clear()
    return {
        "code": code,
        "stdout": stdout.getvalue(),
        "stderr": stderr.getvalue(),
        "seconds": round(time.perf_counter() - started, 1),
    }


if __name__ == "__main__":
    if os.environ.get("DDPM_TEST_FAKE_CIFAR10"):  # fake CIFAR-10 files: no md5 check (tests)
        import torchvision

        torchvision.datasets.cifar.check_integrity = lambda *args, **kwargs: True
    print(json.dumps([run(words) for words in json.loads(sys.argv[1])]))
