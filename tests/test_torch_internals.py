"""Each private torch internal adaptopt uses, removed or broken in turn, costs speed and one warning, nothing else.

`adaptopt.torch_internals` is the one module that touches them. Here each is taken away (as adaptopt sees it:
a name that a future torch renames is simply not found) or made to misbehave (a real patch of torch where
that is possible), and then every execution path must still equal the reference loop, with exactly one
warning, naming that internal. A fresh process shows that `import adaptopt` looks none of them up.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

import adaptopt
from adaptopt import compiled, execution
from adaptopt import torch_internals as internals
from adaptopt.execution import buckets
from test_execution import assert_same, reference, train

Breaker = Callable[[pytest.MonkeyPatch], None]


def hidden(name: str) -> Breaker:
    """`name` is not found, as when a torch release renames or removes it."""

    def hide(monkeypatch: pytest.MonkeyPatch) -> None:
        real = internals._resolve

        def resolve(path: str) -> Any:
            if path == name:
                raise AttributeError(f"module has no attribute {path.rsplit('.', 1)[1]!r} (hidden by the test)")
            return real(path)

        monkeypatch.setattr(internals, "_resolve", resolve)

    return hide


def miscounting_storage_users(monkeypatch: pytest.MonkeyPatch) -> None:
    # A use count that no longer counts views: trusting it would move params whose memory others share.
    monkeypatch.setattr(torch._C, "_storage_Use_Count", lambda cdata: 1)


def removed_current_callable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(internals, "_CURRENT_CALLABLE", "current_callable_renamed")


def no_c_bindings(monkeypatch: pytest.MonkeyPatch) -> None:
    # As if inductor's wrapper reached its kernels some other way than through bindings in its globals.
    monkeypatch.setattr(internals, "_is_cpp_binding", lambda value: False)


def kernel_taking_a_32_bit_length(monkeypatch: pytest.MonkeyPatch) -> None:
    # A kernel whose length is an int32: the loop over rows, passing 64-bit words, must not call it.
    real = internals._kernel_source
    monkeypatch.setattr(internals, "_kernel_source", lambda path: real(path).replace("const int64_t", "const int32_t"))


def kernel_source_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(path: Any) -> str:
        raise FileNotFoundError(f"no source beside {path}")

    monkeypatch.setattr(internals, "_kernel_source", missing)


def compiled_muon_moves_as_eager() -> float:
    """How far apart (relative to the distance moved) a compiled and an eager Muon end, in bfloat16."""
    from adaptopt.optimizers.muon import Muon

    ends = []
    for path in ("reference", "compiled"):
        generator = torch.Generator().manual_seed(3)
        params = [torch.randn(8, 8, dtype=torch.float64, generator=generator).requires_grad_() for _ in range(2)]
        start = [param.detach().clone() for param in params]
        optimizer = Muon(params, lr=0.02, execution=path)
        for _ in range(3):
            for param in params:
                param.grad = torch.randn(8, 8, dtype=torch.float64, generator=generator)
            optimizer.step()
        ends.append([param.detach() - begin for param, begin in zip(params, start, strict=True)])
    return max(float((a - b).norm() / a.norm()) for a, b in zip(*ends, strict=True))


def compiled_low_bit_adam_gap() -> float:
    """How far apart (relative to the params) a compiled and a reference Adam with 8-bit state end, in float64."""
    ends = []
    for path in ("reference", "compiled"):
        generator = torch.Generator().manual_seed(5)
        params = [torch.randn(size, dtype=torch.float64, generator=generator).requires_grad_() for size in (300, 700)]
        optimizer = adaptopt.Adam(params, state_dtype="8bit", low_bit_min_numel=1, execution=path)
        for _ in range(3):
            for param in params:
                param.grad = torch.randn(param.shape, dtype=torch.float64, generator=generator)
            optimizer.step()
        ends.append(params)
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(*ends, strict=True))


CASES: list[tuple[str, str, Breaker]] = [
    *[(name, "removed", hidden(name)) for name in internals.INTERNALS if name.startswith("torch.")],
    ("torch._C._storage_Use_Count", "miscounting", miscounting_storage_users),
    ("CompiledFxGraph.current_callable", "removed", removed_current_callable),
    ("inductor's kernel bindings", "removed", no_c_bindings),
    ("inductor's kernel signature", "changed", kernel_taking_a_32_bit_length),
    ("inductor's kernel signature", "source missing", kernel_source_missing),
]


def test_every_internal_has_a_case() -> None:
    assert {name for name, _, _ in CASES} == set(internals.INTERNALS)


@pytest.mark.parametrize(("name", "how", "breaker"), CASES, ids=[f"{name}-{how}" for name, how, _ in CASES])
def test_a_missing_or_broken_internal_costs_one_warning_and_no_result(
    name: str, how: str, breaker: Breaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    internals.reset()
    monkeypatch.setattr(compiled, "_row_caller", None)
    monkeypatch.setattr(execution, "_warned", set())
    # So that auto compiles within the run: after the first two steps' work.
    monkeypatch.setattr(execution, "AUTO_COMPILE_WORK", 2 * 62)
    breaker(monkeypatch)
    # Adam and AMSGrad, with torch's zero_grad and with set_to_none=False (grads kept, then the bucket's views).
    variants = [({}, True), ({"amsgrad": True}, True), ({}, False)]
    expected = [reference("adam", options, set_to_none=set_to_none) for options, set_to_none in variants]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = {
            (path, index): train("adam", options, path, set_to_none=set_to_none)
            for path in ("bucketed", "compiled", "auto")
            for index, (options, set_to_none) in enumerate(variants)
        }
        if name == "torch._inductor.config.emulate_precision_casts":  # only matrix updates compile with it
            muon_moved = compiled_muon_moves_as_eager()
        if name == "torch._dynamo.maybe_mark_dynamic":  # only low-bit updates mark their lengths so
            low_bit_gap = compiled_low_bit_adam_gap()
    for (path, index), actual in runs.items():
        # Bucketed runs the reference's own ops: bitwise. Compiled may contract into FMAs (see test_execution).
        assert_same(expected[index], actual, exact=path == "bucketed")
        if name != "torch._C._storage_Use_Count":
            assert list(buckets(actual[1])), (path, index)  # Only the storage count keeps params out.
    if name == "torch._dynamo.maybe_mark_dynamic":
        assert low_bit_gap <= 1e-12  # compiled again for the second length: test_low_bit_execution's tolerance
    if name == "torch._inductor.config.emulate_precision_casts":
        assert muon_moved < 0.1  # bfloat16 rounding apart, as far as a few steps carry it; bitwise with it
    messages = [str(warning.message) for warning in caught if str(warning.message).startswith("adaptopt")]
    if name == "torch._inductor.config.emulate_precision_casts" and not execution.STACKS_COMPILE:
        assert not messages, messages  # matrix stacks run eagerly on this torch: the setting is never needed
        return
    assert len(messages) == 1, messages
    assert messages[0].startswith(f"adaptopt: {name} is not usable in torch {torch.__version__}")
    assert internals.INTERNALS[name] in messages[0]


def test_compiled_updates_take_the_public_way_when_inductor_cannot_be_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    internals.reset()
    hidden("torch._inductor.compile_fx.compile_fx_inner")(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, optimizer = train("adam", {}, "compiled")
    (bucket,) = buckets(optimizer)
    assert bucket.compiled is not None and not bucket.compile_failed
    assert not bucket.compiled.direct and not bucket.compiled.calls_rows


def test_rows_are_called_only_through_a_declaration_that_was_read(monkeypatch: pytest.MonkeyPatch) -> None:
    internals.reset()
    monkeypatch.setattr(compiled, "_row_caller", None)
    read: list[str] = []
    real = internals._kernel_source

    def reading(path: Any) -> str:
        source = real(path)
        read.append(source)
        return source

    monkeypatch.setattr(internals, "_kernel_source", reading)
    _, optimizer = train("adam", {}, "compiled")
    (bucket,) = buckets(optimizer)
    assert bucket.compiled is not None and bucket.compiled.calls_rows
    assert len(read) == 1 and 'extern "C"' in read[0]


@pytest.mark.parametrize(
    ("declaration", "pointers"),
    [
        ("const float* in_ptr0, double* out_ptr0, const int64_t ks0", (True, True, False)),
        ("const c10::BFloat16* in_ptr0,\n  c10::BFloat16 * out_ptr1, int64_t ks0", (True, True, False)),
        ("const float* in_ptr0, const float scale", None),
        ("const float* in_ptr0, const int32_t ks0", None),
        ("const float* in_ptr0, std::vector<float> values", None),
    ],
)
def test_kernel_declarations_are_read_not_guessed(
    declaration: str, pointers: tuple[bool, ...] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real inductor library, read through a declaration that the test writes.
    internals.reset()
    kernels: list[Any] = []
    monkeypatch.setattr(internals, "record_c_call", lambda kernel, arguments: kernels.append(kernel))
    train("adam", {}, "compiled", steps=2)
    binding = _first_binding(kernels[0])
    monkeypatch.setattr(
        internals, "_kernel_source", lambda path: f'extern "C" void {binding.__name__}({declaration})\n{{\n}}\n'
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernel = internals.c_kernel(binding)
    if pointers is None:
        assert kernel is None and len(caught) == 1 and "inductor's kernel signature" in str(caught[0].message)
    else:
        assert kernel is not None and kernel.pointers == pointers and not caught


def _first_binding(kernel: Any) -> Any:
    wrapper = getattr(kernel, "__func__", kernel).__globals__
    return next(value for value in wrapper.values() if internals._is_cpp_binding(value))


def test_import_looks_up_no_internal_and_steps_without_any() -> None:
    # A fresh process with every internal that torch can lose without breaking itself deleted before adaptopt
    # is imported: the import looks none of them up, and a step still equals the reference loop.
    script = textwrap.dedent(
        """
        import warnings
        import torch
        import torch._dynamo.eval_frame
        del torch._C._storage_Use_Count, torch._foreach_copy_, torch._dynamo.eval_frame.is_dynamo_supported
        import adaptopt
        from adaptopt import torch_internals
        assert torch_internals.looked_up == [], torch_internals.looked_up
        runs = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for execution in ("reference", "auto"):
                torch.manual_seed(0)
                model = torch.nn.Linear(4, 3).double()
                optimizer = adaptopt.Adam(model.parameters(), lr=0.1, execution=execution)
                for step in range(3):
                    optimizer.zero_grad()
                    model(torch.ones(2, 4, dtype=torch.float64) * step).pow(2).sum().backward()
                    optimizer.step()
                runs.append([param.detach().clone() for param in model.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*runs)), runs
        print(sorted(str(warning.message).split(" is not usable")[0] for warning in caught))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['adaptopt: torch._C._storage_Use_Count']"


def test_an_update_that_overflows_still_calls_the_kernel_directly(monkeypatch: pytest.MonkeyPatch) -> None:
    # A NaN matches a NaN in the self-test: the kernel and torch.compile overflowed alike, which is no loss.
    internals.reset()
    monkeypatch.setattr(execution, "_warned", set())
    param = torch.nn.Parameter(torch.linspace(-1, 1, 256))
    optimizer = adaptopt.Adam([param], execution="compiled")
    param.grad = torch.full_like(param, math.inf)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer.step()
    assert not [w for w in caught if str(w.message).startswith("adaptopt")]
    assert param.isnan().all()
    (bucket,) = buckets(optimizer)
    assert bucket.compiled is not None and bucket.compiled.direct
