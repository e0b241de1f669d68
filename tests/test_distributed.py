"""adaptopt under torch.distributed: DDP, ZeroRedundancyOptimizer and FSDP2 with distributed checkpoints.

Each scenario test starts two real processes with `adaptopt.distributed.launch` (gloo, CPU, 127.0.0.1 on
a free port) that run `distributed_worker.run_scenario`: every optimizer in `CASES` (DDP), `ZERO_CASES`
(ZeroRedundancyOptimizer: Prodigy with its sums all-reduced, LAMB without its clipping, Muon alone over the
matrices) or `FSDP_CASES` (FSDP2: `muon_with_adamw` with its Newton-Schulz in float64; `FSDP_UNSUPPORTED`
would name any optimizer that fails on DTensor params, and names none), each rank taking half of every
global batch. It compares what they end with against `single_process_run`: the same model trained on the
whole batch in this process. One launch per scenario covers every optimizer, so the file costs seven
process-group start-ups (four scenarios, a 1-rank DTensor mesh and two of the launcher's failure modes).
The "low_bit" scenario runs `LOW_BIT_CASES` (Adam and Lion with 8- and 4-bit state) under DDP and ZeRO, and
checks that FSDP2 refuses low-bit state; the quantized moments are compared decoded (`decoded`).

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

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

import adaptopt
from adaptopt.distributed import launch
from adaptopt.quantization import QuantizedTensor
from distributed_worker import (
    ADDED_GROUPS_CASE,
    ALL_CASES,
    AVERAGED_ROWS,
    CASES,
    DDP_GRAD_MODES,
    EXECUTIONS,
    FSDP_CASES,
    FSDP_UNSUPPORTED,
    LOW_BIT_CASES,
    LOW_BIT_EXECUTIONS,
    STEPS,
    STEPS_BEFORE_CHECKPOINT,
    WORLD_SIZE,
    ZERO_CASES,
    added_groups_single_process_run,
    build_model,
    covered_optimizers,
    fail_on_rank_one,
    low_bit_on_single_rank_dtensors,
    run_scenario,
    single_process_run,
    sleep_past_timeout,
    train,
)

RTOL = ATOL = 1e-12
LAUNCH_TIMEOUT_SECONDS = 600
"""A hung rank must fail the test, not hang CI; a collective waiting for a dead peer fails sooner. 120 s was
too tight on a 2-core machine: test_ddp's ranks timed out there on 2026-12-07, on a fresh clone, and under
load on the landed commit too (they took about 5 minutes with the limit raised)."""
COLLECTIVE_TIMEOUT_SECONDS = 60


def launch_scenario(scenario: str, out: Path) -> list[dict[str, Any]]:
    """Every rank's results of `scenario`."""
    ranks: list[dict[str, Any]] = launch(
        run_scenario,
        WORLD_SIZE,
        scenario,
        out,
        timeout=LAUNCH_TIMEOUT_SECONDS,
        collective_timeout=COLLECTIVE_TIMEOUT_SECONDS,
    )
    return ranks


@pytest.fixture(scope="module")
def references() -> dict[str, tuple[dict[str, torch.Tensor], dict[int, dict[str, Any]]]]:
    """The single-process run of every case (of every scenario): final params and optimizer state."""
    return {case.label: single_process_run(case) for case in ALL_CASES}


def assert_close_tensors(actual: dict[Any, Any], expected: dict[Any, Any], what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=RTOL, atol=ATOL, msg=lambda m, k=key: f"{what} {k}: {m}")


def decoded(value: Any, what: str) -> Any:
    """A saved state entry as a tensor: low-bit codes (`QuantizedTensor.state_dict()`) decoded, anything else as
    it is. Codes of runs that differ by a few ulps of their gradients decode to values as close as the
    gradients' (a code flips only where a value lies on the edge between two codes)."""
    if isinstance(value, dict) and set(value) == {"codes", "scales", "shape", "bits", "map", "block_size"}:
        assert value["codes"].dtype == torch.uint8, what
        return QuantizedTensor.from_state_dict(value).dequantize(torch.float64)
    return value


def assert_close_state(actual: dict[int, dict[str, Any]], expected: dict[int, dict[str, Any]], what: str) -> None:
    """Optimizer states agree: the same entries (in the same code formats), equal step counts, close tensors."""
    assert actual.keys() == expected.keys(), what
    for index, entry in expected.items():
        where = f"{what} param {index}"
        assert actual[index].keys() == entry.keys(), where
        assert actual[index]["step"] == entry["step"], where
        for key, value in entry.items():
            if isinstance(value, dict):  # codes: the same width, code book, block size and shape
                formats = ("shape", "bits", "map", "block_size")
                assert {f: actual[index][key][f] for f in formats} == {f: value[f] for f in formats}, f"{where} {key}"
        tensors = {key: decoded(value, where) for key, value in entry.items() if key != "step"}
        assert_close_tensors({key: decoded(actual[index][key], where) for key in tensors}, tensors, where)


def assert_equal_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for name, value in expected.items():
        assert torch.equal(actual[name], value), f"{what}: {name} differs by {(actual[name] - value).abs().max()}"


def test_cases_cover_every_optimizer() -> None:
    every = set(adaptopt.available()) - {"sgd"}
    assert covered_optimizers() == every
    assert covered_optimizers(ZERO_CASES) == every  # muon as Muon alone, over the matrices
    # FSDP2: every optimizer but those that fail on DTensor params, each with the reason (FSDP_UNSUPPORTED).
    assert covered_optimizers(FSDP_CASES) == every - set(FSDP_UNSUPPORTED)
    assert all(FSDP_UNSUPPORTED.values())  # an exclusion would have to say why


def test_ddp(tmp_path: Path, references: dict[str, Any]) -> None:
    ranks = launch_scenario("ddp", tmp_path)
    first, second = ranks
    assert first["world_size"] == second["world_size"] == WORLD_SIZE
    assert (first["shares"], second["shares"]) == ({7: [0, 1, 2, 3], 1: [0]}, {7: [4, 5, 6], 1: []})
    for case in CASES:
        expected_params, expected_state = references[case.label]
        for execution in EXECUTIONS:
            for bucket_view, set_to_none in DDP_GRAD_MODES:
                key = f"{case.label}/{execution}/bucket_view={bucket_view}/set_to_none={set_to_none}"
                first, second = (results[key] for results in ranks)
                assert first["wrapper"] == second["wrapper"] == "DistributedDataParallel"
                assert_equal_tensors(second["params"], first["params"], f"{key}: rank 1 against rank 0")
                assert_close_tensors(first["params"], expected_params, f"{key}: params")
                assert_close_state(first["state"], expected_state, f"{key}: optimizer state")

    # Without DDP: average_gradients weights the ranks' grads by their shares, which are unequal here.
    for rows, case in itertools.product(AVERAGED_ROWS, CASES):
        expected_params, expected_state = single_process_run(case, rows)
        key = f"{case.label}/average_gradients/rows={rows}"
        first, second = (results[key] for results in ranks)
        assert_equal_tensors(second["params"], first["params"], f"{key}: rank 1 against rank 0")
        assert_close_tensors(first["params"], expected_params, f"{key}: params")
        assert_close_state(first["state"], expected_state, f"{key}: optimizer state")


def test_zero_redundancy_optimizer(tmp_path: Path, references: dict[str, Any]) -> None:
    ranks = launch_scenario("zero", tmp_path)
    for case in ZERO_CASES:
        expected_params, expected_state = references[case.label]
        for execution, bucket_view in itertools.product(EXECUTIONS, (False, True)):
            key = f"{case.label}/{execution}/bucket_view={bucket_view}"
            first, second = (results[key] for results in ranks)
            # Each rank's local optimizer holds a non-empty share of the params, together all of them.
            assert all(first["local_params"]) and all(second["local_params"]), key
            trained = len(case.params(build_model()))  # all four, or Muon's two matrices
            assert sum(first["local_params"]) + sum(second["local_params"]) == trained, key
            assert_equal_tensors(second["params"], first["params"], f"{key}: rank 1 against rank 0")
            assert_close_tensors(first["params"], expected_params, f"{key}: params")
            assert_close_state(first["state_dict"]["state"], expected_state, f"{key}: consolidated state")
            for results in (first, second):
                assert_equal_tensors(results["resumed_params"], first["params"], f"{key}: resumed run")
                assert_equal_tensors(results["reloaded_params"], first["params"], f"{key}: reloaded run")

            # The consolidated state dict is an ordinary state dict of the optimizer: one process loads
            # it, weight-decay policy and all, and continues as the ranks did.
            model = build_model()
            model.load_state_dict(first["checkpoint_params"])
            optimizer = case.build(model, execution)
            optimizer.load_state_dict(first["checkpoint_state_dict"])
            train(model, optimizer, case, range(STEPS_BEFORE_CHECKPOINT, STEPS))
            assert_close_tensors(dict(model.state_dict()), expected_params, f"{key}: single process from ZeRO's state")

    # Groups added after construction, with weight-decay policies (see `with_added_groups`).
    expected_params = added_groups_single_process_run()
    for execution in EXECUTIONS:
        key = f"{ADDED_GROUPS_CASE.label}/{execution}"
        first, second = (results[key] for results in ranks)
        assert_equal_tensors(second["params"], first["params"], f"{key}: rank 1 against rank 0")
        assert_close_tensors(first["params"], expected_params, f"{key}: params")


def test_fsdp2_and_distributed_checkpoint(tmp_path: Path, references: dict[str, Any]) -> None:
    ranks = launch_scenario("fsdp", tmp_path)
    for case in FSDP_CASES:
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


def test_low_bit_state(tmp_path: Path, references: dict[str, Any]) -> None:
    """8- and 4-bit state: DDP and ZeroRedundancyOptimizer equal one process, checkpoints included; FSDP2
    refuses it before the optimizer records anything."""
    ranks = launch_scenario("low_bit", tmp_path)
    for case, execution in itertools.product(LOW_BIT_CASES, LOW_BIT_EXECUTIONS):
        expected_params, expected_state = references[case.label]
        bits = 8 if case.hyperparams["state_dtype"] == "8bit" else 4
        # Every moment really is stored as codes of the width asked for, in one process as on the ranks.
        assert all(entry[name]["bits"] == bits for entry in expected_state.values() for name in entry if name != "step")
        for bucket_view, set_to_none in DDP_GRAD_MODES:
            key = f"ddp/{case.label}/{execution}/bucket_view={bucket_view}/set_to_none={set_to_none}"
            first, second = (results[key] for results in ranks)
            assert first["wrapper"] == second["wrapper"] == "DistributedDataParallel"
            assert_equal_tensors(second["params"], first["params"], f"{key}: rank 1 against rank 0")
            assert_close_tensors(first["params"], expected_params, f"{key}: params")
            assert_close_state(first["state"], expected_state, f"{key}: optimizer state")
        for bucket_view in (False, True):
            key = f"zero/{case.label}/{execution}/bucket_view={bucket_view}"
            first, second = (results[key] for results in ranks)
            assert all(first["local_params"]) and all(second["local_params"]), key
            assert sum(first["local_params"]) + sum(second["local_params"]) == len(expected_params), key
            assert_equal_tensors(second["params"], first["params"], f"{key}: rank 1 against rank 0")
            assert_close_tensors(first["params"], expected_params, f"{key}: params")
            # Consolidated from both ranks: every param's moments, as codes.
            assert_close_state(first["state_dict"]["state"], expected_state, f"{key}: consolidated state")
            for results in (first, second):
                assert_equal_tensors(results["resumed_params"], first["params"], f"{key}: resumed run")
                assert_equal_tensors(results["reloaded_params"], first["params"], f"{key}: reloaded run")
            model = build_model()
            model.load_state_dict(first["checkpoint_params"])
            optimizer = case.build(model, execution)
            optimizer.load_state_dict(first["checkpoint_state_dict"])
            assert all(
                isinstance(value, QuantizedTensor)
                for state in optimizer.state.values()
                for value in [state[name] for name in state if name != "step"]
            )
            train(model, optimizer, case, range(STEPS_BEFORE_CHECKPOINT, STEPS))
            assert_close_tensors(dict(model.state_dict()), expected_params, f"{key}: single process from ZeRO's state")

    for rank, results in enumerate(ranks):
        for width in ("8bit", "4bit"):
            for where in ("construction", "add_param_group"):
                message = results[f"fsdp/{where}/{width}"]["error"]
                assert f"state_dtype='{width}'" in message and "DTensor" in message, (rank, where, message)
                assert "state_dtype=torch.bfloat16" in message, message
            refused = results[f"fsdp/add_param_group/{width}"]
            assert refused["groups"] == 1  # the group was not recorded ...
            assert refused["state_after"].keys() == refused["state_before"].keys() == {0}  # ... nor its state
            before, after = refused["state_before"][0], refused["state_after"][0]
            assert after["step"] == before["step"] == 1
            tensors = {key: value for key, value in before.items() if key != "step"}
            assert_equal_tensors({key: after[key] for key in after if key != "step"}, tensors, f"rank {rank} {width}")


def test_low_bit_state_refuses_dtensors_on_a_single_rank() -> None:
    results = launch(low_bit_on_single_rank_dtensors, 1, timeout=LAUNCH_TIMEOUT_SECONDS)
    assert "state_dtype='4bit'" in results["construction"] and "DTensor" in results["construction"]
    # A group made low-bit by hand is refused where the state would be created, before any of it is.
    assert "state_dtype='8bit'" in results["step"]
    assert results["state_entries"] == [0, 0, 0, 0]
    assert results["params_unchanged"]


def test_launch_reports_a_failing_rank_and_stops_the_hung_one() -> None:
    with pytest.raises(RuntimeError, match=r"rank 1 failed:(.|\n)*ValueError: rank 1 fails on purpose"):
        launch(fail_on_rank_one, WORLD_SIZE, timeout=LAUNCH_TIMEOUT_SECONDS)


def test_launch_kills_ranks_that_outlive_the_timeout() -> None:
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] had not finished"):
        launch(sleep_past_timeout, WORLD_SIZE, timeout=5)


@pytest.mark.parametrize("nproc", [0, -1, 1.5, True])
def test_launch_rejects_a_bad_process_count(nproc: Any) -> None:
    with pytest.raises(ValueError, match="nproc"):
        launch(sleep_past_timeout, nproc)
