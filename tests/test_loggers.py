"""wandb goes offline unless it can log live without asking (no network is touched here)."""

from pathlib import Path

import pytest

from ddpm.loggers import wandb_credentials_found, wandb_logger


@pytest.fixture
def no_credentials(monkeypatch, tmp_path: Path) -> Path:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    return netrc


def test_credentials_from_env_or_netrc(no_credentials: Path, monkeypatch) -> None:
    assert not wandb_credentials_found()
    no_credentials.write_text("machine example.org login a password b\n")
    assert not wandb_credentials_found()
    no_credentials.write_text("machine api.wandb.ai login user password secret\n")
    no_credentials.chmod(0o600)
    assert wandb_credentials_found()
    no_credentials.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_credentials_found()


@pytest.mark.parametrize(
    ("mode", "key", "offline"),
    [("", False, True), ("", True, False), ("online", False, False), ("offline", True, True)],
)
def test_offline_decision(no_credentials: Path, monkeypatch, tmp_path: Path, mode, key, offline):
    if mode:
        monkeypatch.setenv("WANDB_MODE", mode)
    if key:
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    logger = wandb_logger(save_dir=str(tmp_path), project="ddpm", name="run")
    assert logger._offline is offline  # the run itself starts only when first used


def test_offline_run_says_how_to_sync(no_credentials: Path, tmp_path: Path, caplog) -> None:
    with caplog.at_level("INFO"):
        wandb_logger(save_dir=str(tmp_path), project="ddpm")
    lines = [r.getMessage() for r in caplog.records if "wandb" in r.getMessage()]
    assert len(lines) == 1 and f"wandb sync {tmp_path}/wandb/offline-run-*" in lines[0]
