"""`adaptopt list` and `python -m adaptopt`."""

from __future__ import annotations

import runpy
import sys

import pytest

from adaptopt import registry
from adaptopt.experiments import cli


def test_list_shows_every_optimizer_with_summary_paper_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list"]) == 0
    output = capsys.readouterr().out
    for name in registry.available():
        info = registry.describe(name)
        block = output.split(f"{name}: {info.summary}\n", 1)[1].split("\n\n", 1)[0]
        assert f"paper:    {info.paper}" in block
        assert "defaults: lr=" in block
    assert "sophia: " in output and "rho=0.03" in output
    # Functions by name; the schedules that are sized from the run say so.
    assert "clip_lambda=quarter_power_clip," in output and " at 0x" not in output
    assert "mnist:    lr=0.001, alpha_warmup, beta3_warmup sized to the run" in output
    assert "mnist:    lr=0.0025, warmup_steps sized to the run" in output


def test_python_dash_m_adaptopt_runs_the_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["adaptopt", "list"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_module("adaptopt", run_name="__main__", alter_sys=True)
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("adam: ")


def test_unknown_optimizer_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["mnist", "--optimizers", "adam,nadam"]) == 1
    assert "--optimizers: unknown optimizer 'nadam'; available: adam, amsgrad" in capsys.readouterr().err
