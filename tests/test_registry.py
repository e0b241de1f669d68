"""The registry: `create()`, `available()` and `describe()`."""

from __future__ import annotations

import pytest
import torch

import adaptopt
from adaptopt import create, describe
from conftest import OPTIMIZER_CLASSES

pytestmark = pytest.mark.usefixtures("single_thread")

EXPECTED = {
    "adam": adaptopt.Adam,
    "amsgrad": adaptopt.AMSGrad,
    "adam_warmup": adaptopt.AdamWarmup,
    "adam_warmup_cosine_decay": adaptopt.AdamWarmupCosineDecay,
    "noam": adaptopt.Noam,
    "radam": adaptopt.RAdam,
    "adabelief": adaptopt.AdaBelief,
    "sophia": adaptopt.Sophia,
    "lion": adaptopt.Lion,
    "adopt": adaptopt.ADOPT,
    "ademamix": adaptopt.AdEMAMix,
    "schedule_free_adamw": adaptopt.ScheduleFreeAdamW,
    "prodigy": adaptopt.Prodigy,
    "lamb": adaptopt.LAMB,
    "adafactor": adaptopt.Adafactor,
    "muon": adaptopt.MuonWithAdamW,
    "sgd": torch.optim.SGD,
}
"""What `create(name, ...)` returns."""

FACTORIES = {"muon": adaptopt.muon_with_adamw}
"""The factories that are not the class they build: `muon` splits the params between a Muon and an AdamW."""

FAMILY_CLASS = {"muon": adaptopt.Muon}
"""The `GenericAdaptiveOptimizer` a name adds to the family (`OPTIMIZER_CLASSES`), where it is not what
`create` returns: MuonWithAdamW holds a Muon for the matrices and our `Adam`, already in the family."""


def test_available_lists_the_family_in_order() -> None:
    assert adaptopt.available() == list(EXPECTED)
    # The other test files parametrize over OPTIMIZER_CLASSES: it must be the whole family.
    assert [FAMILY_CLASS.get(name, c) for name, c in EXPECTED.items() if name != "sgd"] == OPTIMIZER_CLASSES


@pytest.mark.parametrize("name", list(EXPECTED))
def test_every_name_builds_its_optimizer_and_steps(name: str) -> None:
    # A vector and a matrix: Muon (in `muon`) takes the matrix, its AdamW the vector.
    params = [
        torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64, requires_grad=True),
        torch.tensor([[0.5, -1.5], [2.5, 1.0], [-0.5, 2.0]], dtype=torch.float64, requires_grad=True),
    ]
    optimizer = create(name, params, lr=0.01)
    assert type(optimizer) is EXPECTED[name]
    assert optimizer.param_groups[0]["lr"] == 0.01
    if isinstance(optimizer, adaptopt.MuonWithAdamW):
        assert optimizer.muon.param_groups[0]["params"] == [params[1]]
        assert optimizer.adamw.param_groups[0]["params"] == [params[0]]
    starts = [param.detach().clone() for param in params]
    for _ in range(3):
        optimizer.zero_grad()
        sum((param**2).sum() for param in params).backward()
        optimizer.step()
        if isinstance(optimizer, adaptopt.Sophia):
            optimizer.update_hessian(4)
    for param, start in zip(params, starts, strict=True):
        assert torch.all(param.detach().abs() < start.abs()), f"{name} did not descend on |p|^2"


def test_muon_given_a_model_leaves_its_output_layer_to_adamw() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    optimizer = create("muon", model, lr=0.01)
    assert isinstance(optimizer, adaptopt.MuonWithAdamW)
    assert optimizer.muon.param_groups[0]["params"] == [model[0].weight]
    assert optimizer.adamw.param_groups[0]["params"] == [model[0].bias, model[2].weight, model[2].bias]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_describe_gives_summary_paper_and_defaults(name: str) -> None:
    info = describe(name)
    assert info.name == name
    assert info.summary and info.paper
    assert "lr" in info.defaults
    if name != "sgd":
        assert info.factory is FACTORIES.get(name, EXPECTED[name])


@pytest.mark.parametrize(
    ("spelling", "name"),
    [
        ("Adam", "adam"),
        ("ADAM", "adam"),
        ("AdamWarmup", "adam_warmup"),
        ("adam-warmup", "adam_warmup"),
        ("adamwarmup", "adam_warmup"),
        ("ADAM_WARMUP", "adam_warmup"),
        ("Adam-Warmup_Cosine-Decay", "adam_warmup_cosine_decay"),
        ("AdamWarmupCosineDecay", "adam_warmup_cosine_decay"),
        ("Ada_Belief", "adabelief"),
        ("AdaBelief", "adabelief"),
        ("RAdam", "radam"),
        ("r-adam", "radam"),
        ("AMSGrad", "amsgrad"),
        ("Sophia", "sophia"),
        ("Lion", "lion"),
        ("ADOPT", "adopt"),
        ("AdEMAMix", "ademamix"),
        ("ScheduleFreeAdamW", "schedule_free_adamw"),
        ("schedule-free-adamw", "schedule_free_adamw"),
        ("Prodigy", "prodigy"),
        ("LAMB", "lamb"),
        ("AdaFactor", "adafactor"),
        ("Ada-Factor", "adafactor"),
        ("Muon", "muon"),
        ("NOAM", "noam"),
        ("SGD", "sgd"),
    ],
)
def test_names_ignore_case_underscores_and_dashes(spelling: str, name: str) -> None:
    assert describe(spelling) is describe(name)
    assert type(create(spelling, [torch.zeros(2, requires_grad=True)])) is EXPECTED[name]


@pytest.mark.parametrize("unknown", ["adamax", "", "adam warmup", "sophia-h", "schedule_free_sgd"])
def test_unknown_names_raise_listing_the_valid_ones(unknown: str) -> None:
    for function in (describe, lambda n: create(n, [torch.zeros(2)])):
        with pytest.raises(ValueError, match=rf"unknown optimizer {unknown!r}") as raised:
            function(unknown)
        for name in EXPECTED:
            assert name in str(raised.value)


def test_names_must_be_strings() -> None:
    with pytest.raises(TypeError, match="optimizer name must be a str"):
        describe(None)  # type: ignore[arg-type]


def test_sgd_is_torch_sgd_with_momentum() -> None:
    optimizer = create("sgd", [torch.zeros(2, requires_grad=True)])
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["momentum"] == 0.9
    assert describe("sgd").defaults["momentum"] == 0.9
    assert create("sgd", [torch.zeros(2)], momentum=0.5).defaults["momentum"] == 0.5
    # Momentum really acts: the second step with the same gradient is 1.9 times the first.
    param = torch.zeros(1, dtype=torch.float64)
    optimizer = create("sgd", [param], lr=0.1)
    moves = []
    for _ in range(2):
        before = param.clone()
        param.grad = torch.ones_like(param)
        optimizer.step()
        moves.append(float(before - param))
    assert moves == pytest.approx([0.1, 0.19], rel=1e-12)


def test_hyperparameters_are_passed_through() -> None:
    optimizer = create("adam_warmup_cosine_decay", [torch.zeros(2)], lr=0.5, warmup=3, total_steps=9)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["warmup"], group["total_steps"]) == (0.5, 3, 9)
    with pytest.raises(ValueError, match=r"rho must be in \(0, inf\)"):
        create("sophia", [torch.zeros(2)], rho=0.0)
    with pytest.raises(TypeError):
        create("adam", [torch.zeros(2)], no_such_argument=1)
