"""adaptopt under torch.distributed: DDP, ZeroRedundancyOptimizer and FSDP2 with distributed checkpoints.

Each test launches `distributed_worker.py` as two real processes (gloo, CPU, 127.0.0.1 on a free port)
that train every optimizer in `CASES` with each rank taking half of every global batch, then compares
what they end with against `single_process_run`: the same model trained on the whole batch in this
process. One launch per scenario covers every optimizer, so the file costs three process-group start-ups.

Tolerance. All runs are float64. A data-parallel gradient is the mean of the ranks' half-batch means, a
single-process gradient the mean over the whole batch: the same numbers summed in a different order,
so they differ by a few ulps (~1e-16 relative). Ten steps of an adaptive method carry that difference
into the parameters without amplifying it by more than a few orders of magnitude (the updates divide by
sqrt(v_t), which is far from zero here), so `RTOL = ATOL = 1e-12` holds with a wide margin; a real bug
(a missing reduction, a rank using its own gradient, a step counted twice, a state entry lost) moves the
parameters by about lr = 1e-2. Where no reduction order differs (ranks against each other, a resumed run
against the uninterrupted one) the comparison is exact.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import adaptopt
from distributed_worker import (
    CASES,
    EXECUTIONS,
    STEPS,
    STEPS_BEFORE_CHECKPOINT,
    build_model,
    covered_optimizers,
    single_process_run,
    train,
)

WORKER = Path(__file__).with_name("distributed_worker.py")
WORLD_SIZE = 2
RTOL = ATOL = 1e-12
LAUNCH_TIMEOUT_SECONDS = 120
"""A hung collective must fail the test, not hang CI (the workers also time out their collectives)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _loopback_interface() -> str:
    """The loopback interface's name ('lo' on Linux, 'lo0' on macOS), so gloo never leaves the machine."""
    for _, name in socket.if_nameindex():
        if name.startswith("lo"):
            return name
    raise RuntimeError("no loopback network interface found")


def launch(scenario: str, out: Path) -> list[dict[str, Any]]:
    """Run `scenario` on WORLD_SIZE ranks; return each rank's results, or fail with the ranks' output."""
    port = _free_port()
    env = {**os.environ, "GLOO_SOCKET_IFNAME": _loopback_interface(), "OMP_NUM_THREADS": "1"}
    logs = [out / f"{scenario}-rank{rank}.log" for rank in range(WORLD_SIZE)]
    processes = []
    for rank, log in enumerate(logs):
        command = [sys.executable, str(WORKER), scenario, "--rank", str(rank), "--world-size", str(WORLD_SIZE)]
        command += ["--port", str(port), "--out", str(out)]
        with log.open("w") as sink:
            processes.append(subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env))
    failures = []
    try:
        for rank, process in enumerate(processes):
            try:
                code = process.wait(timeout=LAUNCH_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                failures.append(f"rank {rank} still running after {LAUNCH_TIMEOUT_SECONDS} s")
                break
            if code != 0:
                failures.append(f"rank {rank} exited with {code}")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    if failures:
        output = "\n".join(f"--- rank {rank} ---\n{log.read_text()[-4000:]}" for rank, log in enumerate(logs))
        pytest.fail(f"{scenario}: {'; '.join(failures)}\n{output}")
    return [torch.load(out / f"{scenario}-rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def references() -> dict[str, tuple[dict[str, torch.Tensor], dict[int, dict[str, Any]]]]:
    """The single-process run of every case: final params and optimizer state."""
    return {case.label: single_process_run(case) for case in CASES}


def assert_close_tensors(actual: dict[Any, Any], expected: dict[Any, Any], what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=RTOL, atol=ATOL, msg=lambda m, k=key: f"{what} {k}: {m}")


def assert_close_state(actual: dict[int, dict[str, Any]], expected: dict[int, dict[str, Any]], what: str) -> None:
    """Optimizer states agree: the same entries, equal step counts, close tensors."""
    assert actual.keys() == expected.keys(), what
    for index, entry in expected.items():
        assert actual[index].keys() == entry.keys(), f"{what} param {index}"
        assert actual[index]["step"] == entry["step"], f"{what} param {index}"
        tensors = {key: value for key, value in entry.items() if key != "step"}
        assert_close_tensors({key: actual[index][key] for key in tensors}, tensors, f"{what} param {index}")


def assert_equal_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for name, value in expected.items():
        assert torch.equal(actual[name], value), f"{what}: {name} differs by {(actual[name] - value).abs().max()}"


def test_cases_cover_every_optimizer() -> None:
    assert covered_optimizers() == set(adaptopt.available()) - {"sgd"}


def test_ddp(tmp_path: Path, references: dict[str, Any]) -> None:
    ranks = launch("ddp", tmp_path)
    for case in CASES:
        expected_params, expected_state = references[case.label]
        for execution in EXECUTIONS:
            for bucket_view in (False, True):
                key = f"{case.label}/{execution}/bucket_view={bucket_view}"
                first, second = (results[key] for results in ranks)
                assert_equal_tensors(second["params"], first["params"], f"{key}: rank 1 against rank 0")
                assert_close_tensors(first["params"], expected_params, f"{key}: params")
                assert_close_state(first["state"], expected_state, f"{key}: optimizer state")


def test_zero_redundancy_optimizer(tmp_path: Path, references: dict[str, Any]) -> None:
    ranks = launch("zero", tmp_path)
    for case in CASES:
        expected_params, expected_state = references[case.label]
        for execution in EXECUTIONS:
            key = f"{case.label}/{execution}"
            first, second = (results[key] for results in ranks)
            # Each rank's local optimizer holds a non-empty share of the params, together all of them.
            assert all(first["local_params"]) and all(second["local_params"]), key
            assert sum(first["local_params"]) + sum(second["local_params"]) == len(expected_params), key
            assert_equal_tensors(second["params"], first["params"], f"{key}: rank 1 against rank 0")
            assert_close_tensors(first["params"], expected_params, f"{key}: params")
            assert_close_state(first["state_dict"]["state"], expected_state, f"{key}: consolidated state")
            for results in (first, second):
                assert_equal_tensors(results["resumed_params"], first["params"], f"{key}: resumed run")

            # The consolidated state dict is an ordinary state dict of the optimizer: one process loads
            # it, weight-decay policy and all, and continues as the ranks did.
            model = build_model()
            model.load_state_dict(first["checkpoint_params"])
            optimizer = case.make(model.parameters(), execution)
            optimizer.load_state_dict(first["checkpoint_state_dict"])
            train(model, optimizer, case, range(STEPS_BEFORE_CHECKPOINT, STEPS))
            assert_close_tensors(dict(model.state_dict()), expected_params, f"{key}: single process from ZeRO's state")


def test_fsdp2_and_distributed_checkpoint(tmp_path: Path, references: dict[str, Any]) -> None:
    ranks = launch("fsdp", tmp_path)
    for case in CASES:
        expected_params, expected_state = references[case.label]
        for execution in EXECUTIONS:
            key = f"{case.label}/{execution}"
            for rank, results in enumerate(ranks):
                run = results[key]
                # fully_shard splits dim 0 over the ranks; the 3-row layer unevenly, 2 + 1.
                full_rows = {name: tensor.shape[0] for name, tensor in expected_params.items()}
                local_rows = {name: shape[0] for name, shape in run["local_shapes"].items()}
                assert local_rows == {name: (rows + 1) // 2 - rank * (rows % 2) for name, rows in full_rows.items()}
                assert_close_tensors(run["params"], expected_params, f"{key} rank {rank}: params")
                assert_close_state(run["state"], expected_state, f"{key} rank {rank}: optimizer state")
                assert_equal_tensors(run["resumed_params"], run["params"], f"{key} rank {rank}: resumed params")
                assert run["resumed_state"].keys() == run["state"].keys()
                for index, entry in run["state"].items():
                    assert_equal_tensors(
                        {k: v for k, v in run["resumed_state"][index].items() if k != "step"},
                        {k: v for k, v in entry.items() if k != "step"},
                        f"{key} rank {rank}: resumed state of param {index}",
                    )
                    assert run["resumed_state"][index]["step"] == entry["step"]
