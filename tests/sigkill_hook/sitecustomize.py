"""A test-only hook: with this folder on PYTHONPATH and DDPM_TEST_SIGKILL_AFTER_STEP=N set, the
process SIGKILLs its whole process group right after it has written a `last.ckpt` at training step
N or later (optionally only one whose path contains DDPM_TEST_SIGKILL_RUN, e.g. a sweep job's
folder "1_"). The kill is the real SIGKILL of the real command, at a chosen point instead of a
raced one. Python imports `sitecustomize` at start-up, in DDP's worker processes too."""

import os

STEP = os.environ.get("DDPM_TEST_SIGKILL_AFTER_STEP")

if STEP is not None:
    import signal

    from lightning.pytorch import Trainer

    _save_checkpoint = Trainer.save_checkpoint

    def save_checkpoint_then_kill(self, filepath, *args, **kwargs):
        _save_checkpoint(self, filepath, *args, **kwargs)
        path = str(filepath)
        wanted = os.environ.get("DDPM_TEST_SIGKILL_RUN", "")
        if (
            os.path.basename(path) == "last.ckpt"
            and wanted in path
            and self.global_step >= int(STEP)
            and self.is_global_zero
        ):
            os.killpg(os.getpgid(0), signal.SIGKILL)

    Trainer.save_checkpoint = save_checkpoint_then_kill
