"""`adaptopt mnist` end to end on small IDX files: outputs, curves, resume and extension, determinism, overrides,
TensorBoard and the optimizers with their own ways (Sophia, Schedule-Free, Muon)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest
import torch

from adaptopt import MuonWithAdamW, ScheduleFreeAdamW, Sophia, registry
from adaptopt.experiments import cli, train
from test_experiments_data import TEST_SIZE, TRAIN_SIZE, isolated_data_locations, one_thread, write_dataset

# The autouse fixtures: no test here can reach the network, and torch runs on one thread.
__all__ = ["isolated_data_locations", "one_thread"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BATCH_SIZE = 32
STEPS_PER_EPOCH = -(-TRAIN_SIZE // BATCH_SIZE)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    write_dataset(tmp_path / "data")
    return tmp_path / "data"


def run_cli(data_dir: Path, out: Path, *extra: str, optimizers: str = "adam,sophia") -> int:
    return cli.main(
        [
            "mnist",
            "--dataset=mnist",
            f"--data-dir={data_dir}",
            f"--out={out}",
            f"--optimizers={optimizers}",
            "--epochs=2",
            f"--batch-size={BATCH_SIZE}",
            "--hessian-every=3",
            *extra,
        ]
    )


def numbers(out: Path) -> dict[str, Any]:
    """results.json without what legitimately differs between identical runs: timings and the environment."""
    document = json.loads((out / "results.json").read_text())
    for result in document["optimizers"].values():
        for epoch in result["epochs"]:
            del epoch["wall_time_s"]
        del result["curve"]["wall_time_s"]
    del document["environment"]
    return document


def test_outputs_schema_table_and_plots(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    optimizers = ",".join(registry.available())
    assert run_cli(data_dir, out, "--seed=3", optimizers=optimizers) == 0
    document = json.loads((out / "results.json").read_text())
    assert document["schema_version"] == 2
    assert document["config"]["epochs"] == 2
    assert document["config"]["seed"] == 3
    assert document["config"]["optimizers"] == optimizers.split(",")
    assert document["dataset"]["name"] == "mnist"
    assert document["dataset"]["train_size"] == TRAIN_SIZE
    assert document["dataset"]["test_size"] == TEST_SIZE
    assert len(document["dataset"]["sha256"]) == 64
    assert set(document["dataset"]["files"]) == {"train_images", "train_labels", "test_images", "test_labels"}
    assert document["environment"]["torch"] == torch.__version__
    assert {"adaptopt", "python", "numpy", "device", "threads"} <= set(document["environment"])
    assert list(document["optimizers"]) == optimizers.split(",")
    for name, result in document["optimizers"].items():
        assert result["diverged"] is False, name
        assert [epoch["epoch"] for epoch in result["epochs"]] == [1, 2]
        assert [epoch["steps"] for epoch in result["epochs"]] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
        for epoch in result["epochs"]:
            assert set(epoch) == {"epoch", "train_loss", "test_loss", "test_accuracy", "wall_time_s", "steps"}
            assert 0.0 <= epoch["test_accuracy"] <= 1.0
            assert epoch["train_loss"] > 0 and epoch["test_loss"] > 0 and epoch["wall_time_s"] > 0
        # Ten steps an epoch are fewer than 50 points: a point at every step, on the optimizer's clock.
        curve = result["curve"]
        assert curve["step"] == list(range(1, 2 * STEPS_PER_EPOCH + 1)), name
        assert all(b >= a > 0 for a, b in zip(curve["wall_time_s"], curve["wall_time_s"][1:], strict=False)), name
        # Training time: the evaluations are left out, so less than the epochs' times, which include them.
        assert curve["wall_time_s"][-1] < sum(epoch["wall_time_s"] for epoch in result["epochs"])
        # The epoch's training loss is the mean over its examples of these batch losses (equal batches).
        for epoch in result["epochs"]:
            in_epoch = curve["train_loss"][epoch["steps"] - STEPS_PER_EPOCH : epoch["steps"]]
            assert sum(in_epoch) / STEPS_PER_EPOCH == pytest.approx(epoch["train_loss"], rel=1e-12), name
    # The warm-up schedules are sized from the run: 5% of the 20 steps, cosine decay over all of them.
    assert document["optimizers"]["adam_warmup_cosine_decay"]["hyperparameters"] == {
        "lr": 0.001,
        "warmup": 1,
        "total_steps": 2 * STEPS_PER_EPOCH,
    }
    assert document["optimizers"]["schedule_free_adamw"]["hyperparameters"] == {"lr": 0.0025, "warmup_steps": 1}
    assert document["optimizers"]["ademamix"]["hyperparameters"] == {
        "lr": 0.001,
        "alpha_warmup": 2 * STEPS_PER_EPOCH,
        "beta3_warmup": 2 * STEPS_PER_EPOCH,
    }
    assert document["optimizers"]["prodigy"]["hyperparameters"] == {"lr": 1.0}
    assert document["optimizers"]["muon"]["hyperparameters"] == {
        "lr": 0.001,
        "muon_lr": 0.02,
        "adjust_lr_fn": "original",
        "weight_decay": 0.0,
    }
    # The bright square of the synthetic images is easy: Adam learns it.
    assert document["optimizers"]["adam"]["epochs"][-1]["test_accuracy"] > 0.5

    table = (out / "results.md").read_text()
    for name in optimizers.split(","):
        assert f"| {name} |" in table
    printed = capsys.readouterr().out
    assert "| optimizer | lr | epochs |" in printed
    assert str(out / "loss.png") in printed

    for plot in ("loss.png", "loss_by_time.png", "accuracy.png"):
        content = (out / plot).read_bytes()
        assert content.startswith(PNG_SIGNATURE)
        pixels = matplotlib.image.imread(out / plot)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 500
        # Curves, axes and labels: far from a blank canvas.
        assert pixels[..., :3].std() > 0.05
        assert len({tuple(row) for row in pixels[::7, ::7, :3].reshape(-1, 3).round(2).tolist()}) > 20


def test_same_seed_same_numbers_and_resume_after_ctrl_c_continues_identically(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Three points an epoch, so a point every 3 steps and one at the 10th: the Ctrl-C below, at step 4 of the
    # second epoch, falls inside an open window of the curve, which the checkpoint must carry.
    monkeypatch.setattr(train, "POINTS_PER_EPOCH", 3)
    # Same seed, same numbers: the interrupted and resumed run below must equal this one; another seed must not.
    assert run_cli(data_dir, tmp_path / "first") == 0
    assert run_cli(data_dir, tmp_path / "other_seed", "--seed=1") == 0
    other = numbers(tmp_path / "other_seed")["optimizers"]["adam"]["epochs"]
    assert other != numbers(tmp_path / "first")["optimizers"]["adam"]["epochs"]

    # A real SIGINT in the middle of Sophia's second epoch, between its Hessian estimates.
    real_train_step = train.train_step
    calls = 0

    def train_step_then_ctrl_c(run: train.OptimizerRun, *args: Any, **kwargs: Any) -> float:
        nonlocal calls
        loss = real_train_step(run, *args, **kwargs)
        calls += 1
        if run.name == "sophia" and run.steps == STEPS_PER_EPOCH + 4:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(train, "train_step", train_step_then_ctrl_c)
    interrupted = tmp_path / "interrupted"
    capsys.readouterr()
    assert run_cli(data_dir, interrupted) == 130
    assert "Continue with the same command plus --resume" in capsys.readouterr().err
    assert calls == 2 * STEPS_PER_EPOCH + STEPS_PER_EPOCH + 4
    checkpoint = torch.load(interrupted / "checkpoints/sophia.pt", weights_only=True)
    assert checkpoint["batch_in_epoch"] == 4 and len(checkpoint["history"]) == 1
    monkeypatch.setattr(train, "train_step", real_train_step)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    assert run_cli(data_dir, interrupted, "--resume") == 0
    assert numbers(interrupted) == numbers(tmp_path / "first")
    curve = numbers(interrupted)["optimizers"]["sophia"]["curve"]
    assert curve["step"] == [3, 6, 9, 10, 13, 16, 19, 20]


def test_resume_with_more_epochs_equals_a_straight_run(data_dir: Path, tmp_path: Path) -> None:
    # adam and sophia (its sampler and Hessian steps too) do not depend on the run's length.
    assert run_cli(data_dir, tmp_path / "straight") == 0
    extended = tmp_path / "extended"
    assert run_cli(data_dir, extended, "--epochs=1") == 0
    assert run_cli(data_dir, extended, "--resume") == 0
    assert numbers(extended) == numbers(tmp_path / "straight")
    # Resuming a finished run with as many epochs trains nothing more and changes nothing.
    before = numbers(extended)
    assert run_cli(data_dir, extended, "--resume") == 0
    assert numbers(extended) == before


def test_resume_with_more_epochs_refuses_schedules_sized_to_the_run_and_says_how_to_keep_them(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    optimizers = "sgd,adam_warmup_cosine_decay,ademamix"
    assert run_cli(data_dir, out, "--epochs=1", optimizers=optimizers) == 0
    saved = {name: torch.load(out / f"checkpoints/{name}.pt", weights_only=True) for name in optimizers.split(",")}
    capsys.readouterr()
    assert run_cli(data_dir, out, "--resume", optimizers=optimizers) == 1
    error = capsys.readouterr().err
    assert "--epochs 2 cannot extend adam_warmup_cosine_decay, ademamix:" in error
    pins = [
        "--set",
        "adam_warmup_cosine_decay.warmup=1",
        "--set",
        f"adam_warmup_cosine_decay.total_steps={STEPS_PER_EPOCH}",
        "--set",
        f"ademamix.alpha_warmup={STEPS_PER_EPOCH}",
        "--set",
        f"ademamix.beta3_warmup={STEPS_PER_EPOCH}",
    ]
    assert "add " + " ".join(pins) + ";" in error
    assert str(out / "checkpoints/ademamix.pt") in error and "Traceback" not in error
    # Refused before anything trained: sgd, which could have gone on, was not touched either.
    for name, checkpoint in saved.items():
        assert torch.load(out / f"checkpoints/{name}.pt", weights_only=True)["steps"] == checkpoint["steps"], name
    # The flags it gives continue them on their saved schedules: as a straight run with those settings.
    assert run_cli(data_dir, out, "--resume", *pins, optimizers=optimizers) == 0
    assert run_cli(data_dir, tmp_path / "straight", *pins, optimizers=optimizers) == 0
    assert numbers(out) == numbers(tmp_path / "straight")


def test_plot_redraws_a_run_from_results_json_of_either_schema(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert run_cli(data_dir, out, optimizers="adam,sgd") == 0
    document = json.loads((out / "results.json").read_text())
    # A version-1 file, as adaptopt 0.1 wrote it: no curves.
    old = {**document, "schema_version": 1}
    old["optimizers"] = {
        name: {k: v for k, v in r.items() if k != "curve"} for name, r in document["optimizers"].items()
    }
    old_dir = tmp_path / "old"
    old_dir.mkdir()
    (old_dir / "results.json").write_text(json.dumps(old))
    capsys.readouterr()
    assert cli.main(["plot", str(old_dir)]) == 0
    assert "| adam | 0.001 | 2 |" in capsys.readouterr().out
    assert (old_dir / "results.md").read_text() == (out / "results.md").read_text()
    for plot in ("loss.png", "loss_by_time.png", "accuracy.png"):
        assert matplotlib.image.imread(old_dir / plot)[..., :3].std() > 0.05, plot
    (old_dir / "results.json").write_text(json.dumps({**old, "schema_version": 99}))
    assert cli.main(["plot", str(old_dir)]) == 1
    assert f"{old_dir / 'results.json'}: schema version 99" in capsys.readouterr().err
    (old_dir / "results.json").write_text(json.dumps({**old, "dataset": {"name": "mnist"}}))
    assert cli.main(["plot", str(old_dir)]) == 1
    assert "not a readable results.json ('dataset.title')" in capsys.readouterr().err
    (old_dir / "results.json").write_text("{not json")
    assert cli.main(["plot", str(old_dir)]) == 1
    error = capsys.readouterr().err
    assert f"{old_dir / 'results.json'}: not a readable results.json" in error and "Traceback" not in error


def test_smoothing_is_a_debiased_ema() -> None:
    from adaptopt.experiments.report import smooth

    assert smooth([4.0, 2.0, 1.0], 1.0) == [4.0, 2.0, 1.0]
    # beta = 1/2: (0.5*4)/0.5, (0.25*4 + 0.5*2)/0.75, ...
    assert smooth([4.0, 2.0, float("nan"), 1.0], 2.0)[:2] == [4.0, pytest.approx(2.0 / 0.75)]
    last = (0.125 * 4 + 0.25 * 2 + 0.5 * 1) / 0.875
    assert smooth([4.0, 2.0, float("nan"), 1.0], 2.0)[3] == pytest.approx(last, rel=1e-15)


def test_tensorboard_scalars_read_back(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Killed (not Ctrl-C) in the second epoch: the resumed run starts over from the epoch-1 checkpoint, and
    # the steps logged after it must not appear twice.
    real_train_step = train.train_step

    class Killed(BaseException):
        pass

    def train_step_then_die(run: train.OptimizerRun, *args: Any, **kwargs: Any) -> float:
        loss = real_train_step(run, *args, **kwargs)
        if run.name == "adam_warmup" and run.steps == STEPS_PER_EPOCH + 4:
            raise Killed
        return loss

    monkeypatch.setattr(train, "train_step", train_step_then_die)
    out, board = tmp_path / "out", tmp_path / "board"
    optimizers = "adam_warmup,sgd"
    with pytest.raises(Killed):
        run_cli(data_dir, out, f"--tensorboard={board}", "--set=adam_warmup.warmup=4", optimizers=optimizers)
    monkeypatch.setattr(train, "train_step", real_train_step)
    assert (
        run_cli(
            data_dir, out, "--resume", f"--tensorboard={board}", "--set=adam_warmup.warmup=4", optimizers=optimizers
        )
        == 0
    )
    document = json.loads((out / "results.json").read_text())
    for name in optimizers.split(","):
        events = EventAccumulator(str(board / name))
        events.Reload()
        assert set(events.Tags()["scalars"]) == {"train/loss", "train/lr", "test/loss", "test/accuracy"}
        losses = events.Scalars("train/loss")
        result = document["optimizers"][name]
        assert [event.step for event in losses] == result["curve"]["step"], name
        assert [event.value for event in losses] == pytest.approx(result["curve"]["train_loss"], rel=1e-6)  # float32
        accuracy = events.Scalars("test/accuracy")
        assert [(event.step, event.value) for event in accuracy] == [
            (epoch["steps"], pytest.approx(epoch["test_accuracy"], rel=1e-6)) for epoch in result["epochs"]
        ]
    # The rate of each step: the warm-up's ramp over 4 steps, then 1e-3; SGD's constant lr.
    rates = [event.value for event in EventAccumulator(str(board / "adam_warmup")).Reload().Scalars("train/lr")]
    assert rates[:5] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3], rel=1e-6)
    sgd_rates = [event.value for event in EventAccumulator(str(board / "sgd")).Reload().Scalars("train/lr")]
    assert sgd_rates == pytest.approx([0.01] * 2 * STEPS_PER_EPOCH, rel=1e-6)


def test_tensorboard_without_the_package_is_a_clear_error_before_training(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    assert run_cli(data_dir, tmp_path / "out", f"--tensorboard={tmp_path / 'board'}") == 1
    assert "--tensorboard needs the tensorboard package: pip install 'adaptopt[tensorboard]'" in capsys.readouterr().err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_progress_bar_shows_the_running_loss_on_a_terminal(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert run_cli(data_dir, tmp_path / "out", optimizers="adam") == 0
    captured = capsys.readouterr()
    assert "adam 2/2" in captured.err and "loss=" in captured.err
    # The per-epoch lines stay, for logs.
    assert "adam epoch 2/2: train loss" in captured.out


def test_existing_run_needs_resume_or_overwrite_and_config_must_match(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert run_cli(data_dir, out, optimizers="sgd") == 0
    capsys.readouterr()
    assert run_cli(data_dir, out, optimizers="sgd") == 1
    assert "pass --resume to continue it, or --overwrite" in capsys.readouterr().err
    assert run_cli(data_dir, out, "--resume", "--set=sgd.lr=0.1", optimizers="sgd") == 1
    error = capsys.readouterr().err
    assert f"{out / 'checkpoints/sgd.pt'}: made with a different configuration" in error
    assert run_cli(data_dir, out, "--resume", "--epochs=1", optimizers="sgd") == 1
    assert "sgd has already trained 2 epochs, more than --epochs 1; pass --epochs 2 or more" in capsys.readouterr().err
    assert run_cli(data_dir, out, "--overwrite", "--set=sgd.lr=0.1", optimizers="sgd") == 0


def test_corrupt_checkpoint_names_the_file(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert run_cli(data_dir, out, optimizers="adam") == 0
    checkpoint = out / "checkpoints/adam.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:5000])
    capsys.readouterr()
    assert run_cli(data_dir, out, "--resume", optimizers="adam") == 1
    error = capsys.readouterr().err
    assert f"{checkpoint}: corrupt or unreadable checkpoint" in error
    assert f"delete {checkpoint} to restart adam from scratch" in error
    assert "Traceback" not in error


def test_set_overrides_reach_the_optimizer(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    status = run_cli(
        data_dir, out, "--set", "adam.lr=3e-4", "--set", "adam.betas=(0.8, 0.9)", "--set", "Sophia.rho=0.1"
    )
    assert status == 0
    hyperparameters = json.loads((out / "results.json").read_text())["config"]["hyperparameters"]
    assert hyperparameters["adam"] == {"lr": 3e-4, "betas": [0.8, 0.9]}
    assert hyperparameters["sophia"]["rho"] == 0.1
    groups = torch.load(out / "checkpoints/adam.pt", weights_only=True)["optimizer"]["param_groups"]
    assert groups[0]["lr"] == 3e-4 and tuple(groups[0]["betas"]) == (0.8, 0.9)
    sophia_group = torch.load(out / "checkpoints/sophia.pt", weights_only=True)["optimizer"]["param_groups"][0]
    assert sophia_group["rho"] == 0.1


def test_set_chooses_how_the_state_is_stored(data_dir: Path, tmp_path: Path) -> None:
    # The comparison of fp32, bf16, 8-bit and 4-bit state (README) runs through these flags.
    out = tmp_path / "out"
    flags = [
        "--set",
        "adam.state_dtype=4bit",
        "--set",
        "adam.low_bit_min_numel=64",
        "--set",
        "sophia.state_dtype=bfloat16",
    ]
    assert run_cli(data_dir, out, *flags) == 0
    hyperparameters = json.loads((out / "results.json").read_text())["config"]["hyperparameters"]
    assert hyperparameters["adam"]["state_dtype"] == "4bit" and hyperparameters["sophia"]["state_dtype"] == "bfloat16"
    adam = torch.load(out / "checkpoints/adam.pt", weights_only=True)["optimizer"]
    assert adam["param_groups"][0]["state_dtype"] == "4bit"
    stored = [entry["exp_avg"] for entry in adam["state"].values()]
    assert any(isinstance(entry, dict) and entry["bits"] == 4 for entry in stored)  # codes where numel >= 64
    sophia = torch.load(out / "checkpoints/sophia.pt", weights_only=True)["optimizer"]
    assert all(entry["exp_avg"].dtype == torch.bfloat16 for entry in sophia["state"].values())


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("adam.lr", "expected OPTIMIZER.KEY=VALUE"),
        ("adam.learning_rate=1", "adam has no hyper-parameter 'learning_rate'"),
        ("sgd.lr=1", "sgd is not among --optimizers"),
        ("nadam.lr=1", "unknown optimizer 'nadam'"),
    ],
)
def test_bad_set_is_a_clear_error(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], setting: str, message: str
) -> None:
    assert run_cli(data_dir, tmp_path / "out", "--set", setting) == 1
    assert message in capsys.readouterr().err


def test_sophia_estimates_the_hessian_every_k_steps_from_sampled_labels(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_update = Sophia.update_hessian
    calls: list[tuple[int, float]] = []

    def spy(self: Sophia, n_tokens_training_batch: int) -> None:
        grads = [p.grad for group in self.param_groups for p in group["params"]]
        assert all(grad is not None for grad in grads)
        calls.append((n_tokens_training_batch, float(sum(grad.pow(2).sum() for grad in grads if grad is not None))))
        real_update(self, n_tokens_training_batch)

    monkeypatch.setattr(Sophia, "update_hessian", spy)
    out = tmp_path / "out"
    assert run_cli(data_dir, out, optimizers="sophia") == 0
    total_steps = 2 * STEPS_PER_EPOCH
    assert len(calls) == total_steps // 3
    # B is the batch's size, and the grads are those of the sampled labels' loss: never zero.
    assert [size for size, _ in calls] == [BATCH_SIZE] * len(calls)
    assert all(norm > 0 for _, norm in calls)
    state = torch.load(out / "checkpoints/sophia.pt", weights_only=True)["optimizer"]["state"]
    assert all(entry["hessian"].abs().sum() > 0 for entry in state.values())


def test_sampled_labels_follow_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """The estimator's labels come from the logits: a model that is sure of class 7 samples only 7s."""
    model = torch.nn.Linear(4, 10)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.fill_(-30.0)
        model.bias[7] = 30.0
    optimizer = Sophia(model.parameters(), lr=1e-3)
    sampled: list[torch.Tensor] = []
    real_cross_entropy = train.F.cross_entropy

    def record(logits: torch.Tensor, target: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        sampled.append(target)
        return real_cross_entropy(logits, target, **kwargs)

    monkeypatch.setattr(train.F, "cross_entropy", record)
    run = train.OptimizerRun("sophia", model, optimizer, torch.Generator().manual_seed(0), {})
    train.estimate_sophia_hessian(run, torch.randn(64, 4))
    assert torch.equal(sampled[0], torch.full((64,), 7))


# --------------------------------------------------------------------------------------------------
# Optimizers with modes: Schedule-Free is evaluated and checkpointed at x, trained at y


def test_schedule_free_is_evaluated_in_eval_mode_and_trained_in_train_mode(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_step, real_evaluate = ScheduleFreeAdamW.step, train.evaluate
    optimizers: list[ScheduleFreeAdamW] = []

    def step(self: ScheduleFreeAdamW, closure: Any = None) -> Any:
        optimizers.append(self)
        events.append("step" if all(group["train_mode"] for group in self.param_groups) else "step in eval mode")
        return real_step(self, closure)

    def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        modes = {group["train_mode"] for optimizer in optimizers[-1:] for group in optimizer.param_groups}
        events.append(f"evaluate, train_mode {modes}")
        return real_evaluate(model, images, labels)

    monkeypatch.setattr(ScheduleFreeAdamW, "step", step)
    monkeypatch.setattr(train, "evaluate", evaluate)
    out = tmp_path / "out"
    assert run_cli(data_dir, out, optimizers="schedule_free_adamw") == 0
    epoch = ["step"] * STEPS_PER_EPOCH + ["evaluate, train_mode {False}"]
    assert events == epoch + epoch
    # The checkpoint of the last epoch holds the evaluated weights (x) and the optimizer in eval mode.
    checkpoint = torch.load(out / "checkpoints/schedule_free_adamw.pt", weights_only=True)
    groups = checkpoint["optimizer"]["param_groups"]
    assert [group["train_mode"] for group in groups] == [False] and groups[0]["k"] == 2 * STEPS_PER_EPOCH


def test_muon_is_given_the_model_so_that_its_output_layer_goes_to_adamw() -> None:
    run = train.make_run("muon", {"lr": 1e-3, "muon_lr": 0.02}, train.initial_state(0), seed=0)
    optimizer = run.optimizer
    assert isinstance(optimizer, MuonWithAdamW)
    model = run.model
    # fc1 is the one hidden matrix; the convs' weights are 4-D, fc2 is the output layer.
    assert [p for group in optimizer.muon.param_groups for p in group["params"]] == [model.fc1.weight]
    adamw = [p for group in optimizer.adamw.param_groups for p in group["params"]]
    assert len(adamw) == len(list(model.parameters())) - 1 and all(p is not model.fc1.weight for p in adamw)
    assert optimizer.muon.param_groups[0]["lr"] == 0.02 and optimizer.adamw.param_groups[0]["lr"] == 1e-3


def test_muon_resumes_from_ctrl_c_identically(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its checkpoint holds Muon's groups and AdamW's in one state dict (MuonWithAdamW's).
    assert run_cli(data_dir, tmp_path / "first", optimizers="muon") == 0
    real_train_step = train.train_step

    def train_step_then_ctrl_c(run: train.OptimizerRun, *args: Any, **kwargs: Any) -> float:
        loss = real_train_step(run, *args, **kwargs)
        if run.steps == STEPS_PER_EPOCH + 3:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(train, "train_step", train_step_then_ctrl_c)
    interrupted = tmp_path / "interrupted"
    assert run_cli(data_dir, interrupted, optimizers="muon") == 130
    checkpoint = torch.load(interrupted / "checkpoints/muon.pt", weights_only=True)
    groups = checkpoint["optimizer"]["param_groups"]
    assert [group["use_muon"] for group in groups] == [True, False] and checkpoint["batch_in_epoch"] == 3
    monkeypatch.setattr(train, "train_step", real_train_step)
    assert run_cli(data_dir, interrupted, "--resume", optimizers="muon") == 0
    assert numbers(interrupted) == numbers(tmp_path / "first")


def test_has_modes_is_about_the_optimizer_not_its_name() -> None:
    params = [torch.zeros(2, requires_grad=True)]
    assert train.has_modes(ScheduleFreeAdamW(params))
    assert not train.has_modes(registry.create("adam", params)) and not train.has_modes(torch.optim.SGD(params))
    train.set_mode(torch.optim.SGD(params, lr=0.1), training=False)  # nothing to do, no error


@pytest.mark.parametrize("when", ["mid-epoch", "while-evaluating"])
def test_schedule_free_resumes_identically_from_either_mode(
    when: str, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ctrl-C mid-epoch saves in train mode; during the evaluation after epoch 1, in eval mode (after it).
    optimizers = "schedule_free_adamw"
    assert run_cli(data_dir, tmp_path / "first", optimizers=optimizers) == 0
    real_train_step, real_evaluate = train.train_step, train.evaluate

    def train_step_then_ctrl_c(run: train.OptimizerRun, *args: Any, **kwargs: Any) -> float:
        loss = real_train_step(run, *args, **kwargs)
        if run.steps == STEPS_PER_EPOCH + 3:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    def ctrl_c_while_evaluating(model: torch.nn.Module, *args: Any) -> tuple[float, float]:
        os.kill(os.getpid(), signal.SIGINT)
        return real_evaluate(model, *args)

    if when == "mid-epoch":
        monkeypatch.setattr(train, "train_step", train_step_then_ctrl_c)
    else:
        monkeypatch.setattr(train, "evaluate", ctrl_c_while_evaluating)
    interrupted = tmp_path / "interrupted"
    assert run_cli(data_dir, interrupted, optimizers=optimizers) == 130
    checkpoint = torch.load(interrupted / "checkpoints/schedule_free_adamw.pt", weights_only=True)
    assert checkpoint["optimizer"]["param_groups"][0]["train_mode"] is (when == "mid-epoch")
    monkeypatch.setattr(train, "train_step", real_train_step)
    monkeypatch.setattr(train, "evaluate", real_evaluate)
    assert run_cli(data_dir, interrupted, "--resume", optimizers=optimizers) == 0
    assert numbers(interrupted) == numbers(tmp_path / "first")
    resumed = torch.load(interrupted / "checkpoints/schedule_free_adamw.pt", weights_only=True)
    uninterrupted = torch.load(tmp_path / "first" / "checkpoints/schedule_free_adamw.pt", weights_only=True)
    for key, value in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][key], value), key
