"""Command-line details: Hydra's own message for an unknown option, and sweep job folder names
that any command accepts as typed. tests/test_readme.py runs the README's commands."""

from pathlib import Path

from conftest import run_train


def test_an_unknown_group_option_gets_hydras_list(tmp_path: Path) -> None:
    """(A bad value of a key is one line: the README's Troubleshooting rows, in test_readme.)"""
    unknown = run_train(["schedule=nope", f"paths.log_dir={tmp_path}"], cwd=tmp_path)
    assert unknown.returncode != 0
    assert "Could not find 'schedule/nope'" in unknown.stderr
    assert "Available options in 'schedule'" in unknown.stderr


def test_sweep_folder_names_need_no_quoting() -> None:
    """What Hydra's override grammar and a shell read as a plain value: letters, digits and
    _ . + - @ %; every other character becomes _, and a long name is cut and ends in a hash."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from ddpm.config import short_dirname

    assert short_dirname("schedule-cosine+variance-beta") == "schedule-cosine+variance-beta"
    assert short_dirname("data.root-/a/b+x-[1,2]+c-{a: b}") == "data.root-_a_b+x-_1_2_+c-_a__b_"
    long = "+".join(f"trainer.key{i}-{i}" for i in range(40))
    short = short_dirname(long)
    assert len(short) == 200 and short.startswith(long[:150])
    assert short != short_dirname(long + "+x-1")
    parser = OverridesParser.create()
    for name in (short, short_dirname("a=b,c=[1, 2] 'q' \"$HOME\"")):
        path = f"outputs/train/multirun/2026-01-01_00-00-00/0_{name}/checkpoints/last.ckpt"
        assert parser.parse_override(f"ckpt_path={path}").value() == path
