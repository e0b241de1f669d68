"""The README's code is what users copy first: its usage example and its new-optimizer example must run."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from adaptopt.execution import buckets

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_usage_example_trains() -> None:
    usage = next(block for block in python_blocks() if "optimizer.step()" in block)
    namespace: dict[str, object] = {}
    exec(usage, namespace)
    model = namespace["model"]
    assert isinstance(model, torch.nn.Linear)
    assert namespace["optimizer"].state[model.weight]["step"] == 100  # type: ignore[attr-defined]


def test_new_optimizer_example_runs_on_every_path() -> None:
    lion = next(block for block in python_blocks() if "class Lion" in block)
    namespace: dict[str, object] = {}
    exec("import torch\nfrom adaptopt import GenericAdaptiveOptimizer, WeightDecay\n" + lion, namespace)
    assert "kind" in vars(namespace["Lion"])  # declared, so that the bucketed path takes it
    results = []
    for execution in ("reference", "bucketed"):
        torch.manual_seed(0)
        model = torch.nn.Linear(10, 1).double()
        before = model.weight.detach().clone()
        optimizer = namespace["Lion"](model.parameters(), lr=1e-3, execution=execution)  # type: ignore[operator]
        for _ in range(5):
            optimizer.zero_grad()
            model(torch.randn(8, 10, dtype=torch.float64)).pow(2).mean().backward()
            optimizer.step()
        # Lion moves every coordinate by exactly lr per step (sign updates), 5 steps in all at most.
        assert (model.weight - before).abs().max().item() <= 5e-3 + 1e-15
        assert not torch.equal(model.weight, before)
        assert len(list(buckets(optimizer))) == (execution == "bucketed")
        results.append(model.weight.detach().clone())
    assert torch.equal(results[0], results[1])
