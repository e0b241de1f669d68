"""The AMSGrad paper's online counterexample, Rosenbrock, and `adaptopt synthetic`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from adaptopt.experiments import cli, synthetic

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_adam_goes_to_the_worst_point_and_amsgrad_to_the_optimum() -> None:
    """Reddi et al. 2018, §5: with beta2 = 0.99 Adam settles at x = +1, AMSGrad near the optimum x = -1.

    100 periods of 101 steps; the thresholds leave room for the slow 1/sqrt(t) approach (measured: Adam
    +0.94, AMSGrad -0.91 after 100 periods).
    """
    steps = 100 * synthetic.ONLINE_PERIOD
    adam = synthetic.last_period_mean(synthetic.online_counterexample("adam", steps))
    amsgrad = synthetic.last_period_mean(synthetic.online_counterexample("amsgrad", steps))
    assert adam > 0.8
    assert amsgrad < -0.8


def test_adopt_without_its_clip_goes_to_the_optimum() -> None:
    """Taniguchi et al. 2024: ADOPT converges for any beta2, here the 0.99 that makes Adam fail. Unclipped,
    as analysed there (the default clip t^{1/4} cuts the rare large gradient down; measured +0.98 with it)."""
    steps = 100 * synthetic.ONLINE_PERIOD
    adopt = synthetic.last_period_mean(synthetic.online_counterexample("adopt", steps))
    assert adopt < -0.8  # measured -0.99


def test_online_iterates_are_projected_onto_the_interval() -> None:
    """Every step is projected back onto [-1, 1], and an iterate on the boundary stays exactly there.

    SGD's first step from 0 is -alpha * 1010 = -505 and its second +alpha / sqrt(2) * 10 ~ +3.5 from -1, so
    unprojected it would leave the interval at once; projected it lands on -1.0, then +1.0, where the small
    gradients keep pushing it. Adam's momentum of the first large gradient would carry it past -1 within five
    steps; projected, it sits at exactly -1.0 for more than one step.
    """
    assert -synthetic.ONLINE_ALPHA * synthetic.ONLINE_LARGE < -1.0
    assert synthetic.online_counterexample("sgd", 3) == [-1.0, 1.0, 1.0]
    adam = synthetic.online_counterexample("adam", synthetic.ONLINE_PERIOD)
    assert min(adam) == -1.0
    assert adam.count(-1.0) > 1


def test_sophia_reaches_the_rosenbrock_minimum_with_its_gauss_newton_estimate() -> None:
    path, losses = synthetic.rosenbrock("sophia")
    x, y = path[-1]
    assert losses[-1] < 1e-2 * losses[0]
    assert math.hypot(x - 1.0, y - 1.0) < 0.2


@pytest.mark.parametrize(
    ("name", "distance"),
    # Measured: Lion 0.009 (its lr is the precision of its sign steps), ADOPT 0.0015, AdEMAMix 0.017;
    # Schedule-Free 0.11 at y, where it takes its grads (its average x is 0.035 from the minimum).
    [("lion", 0.05), ("adopt", 0.05), ("ademamix", 0.05), ("schedule_free_adamw", 0.2)],
)
def test_the_new_optimizers_reach_the_rosenbrock_minimum_with_their_defaults(name: str, distance: float) -> None:
    path, losses = synthetic.rosenbrock(name)
    x, y = path[-1]
    assert losses[-1] < 1e-2 * losses[0]
    assert math.hypot(x - 1.0, y - 1.0) < distance


@pytest.mark.parametrize(
    ("name", "distance"),
    # Measured: Prodigy 1.5e-7 (it estimates its own step); LAMB 0.036, circling the minimum at steps of lr
    # times the point's norm; Adafactor 0.13, its relative steps clipped; muon 4e-4, its AdamW's (a vector).
    [("prodigy", 1e-4), ("lamb", 0.05), ("adafactor", 0.2), ("muon", 0.01)],
)
def test_prodigy_lamb_adafactor_and_muon_reach_the_rosenbrock_minimum(name: str, distance: float) -> None:
    path, losses = synthetic.rosenbrock(name)
    x, y = path[-1]
    assert losses[-1] < 1e-2 * losses[0]
    assert math.hypot(x - 1.0, y - 1.0) < distance


def test_the_online_problem_with_relative_steps_and_muons_vector() -> None:
    """From x_0 = 0 there is no distance for Prodigy's estimate nor norm for LAMB's trust ratio: both stay at 0
    (measured within 2e-6). Adafactor goes the way of Adam; `muon`'s x, a vector, is its AdamW's, which with the
    paper's betas and no decay settles where Adam does (measured 0.937 both, not bitwise: AdamW's eps is
    torch's form, ours Adam's eps-hat)."""
    steps = 100 * synthetic.ONLINE_PERIOD
    means = {
        name: synthetic.last_period_mean(synthetic.online_counterexample(name, steps))
        for name in ("adam", "prodigy", "lamb", "adafactor", "muon")
    }
    assert abs(means["prodigy"]) < 1e-4 and abs(means["lamb"]) < 1e-4
    assert means["adafactor"] > 0.8
    assert means["muon"] == pytest.approx(means["adam"], abs=0.01) and means["muon"] > 0.8


def test_cli_synthetic_writes_plots_and_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["synthetic", "--out", str(tmp_path), "--steps", "202"]) == 0
    summary = json.loads((tmp_path / "synthetic.json").read_text())
    names = cli.registry.available()
    assert list(summary["online_counterexample"]) == names
    assert list(summary["rosenbrock"]) == names
    for name in names:
        # The summary holds exactly what the two problems give for the same number of steps.
        iterates = synthetic.online_counterexample(name, 202)
        assert summary["online_counterexample"][name] == {
            "steps": 202,
            "last_period_mean_x": synthetic.last_period_mean(iterates),
        }, name
        path, losses = synthetic.rosenbrock(name, 202)
        assert summary["rosenbrock"][name] == {
            "steps": 202,
            "final_point": list(path[-1]),
            "final_loss": losses[-1],
        }, name
        # Every optimizer stays finite on Rosenbrock with the defaults chosen for it.
        assert math.isfinite(summary["rosenbrock"][name]["final_loss"]), name
    for plot in ("online_counterexample.png", "rosenbrock.png"):
        content = (tmp_path / plot).read_bytes()
        assert content.startswith(PNG_SIGNATURE) and len(content) > 20_000
    assert "online counterexample" in capsys.readouterr().out
