"""Bucket buffers on transparent huge pages (`memory.py`): where the CPU and the kernel allow them, and then
they behave in every way as buffers from torch's allocator do."""

from __future__ import annotations

import copy
import gc
import io
import mmap
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import adaptopt
from adaptopt import memory
from adaptopt.execution import buckets
from adaptopt.memory import HUGE_PAGE, bucket_buffer
from test_execution import BUCKETS, CONFIGS, SUMS_IN_ANOTHER_ORDER, all_buckets, assert_same, reference, train

CPU = torch.device("cpu")
LINUX_HUGE_PAGES = pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="transparent huge pages are Linux's")


def mapping_of(address: int) -> dict[str, Any] | None:
    """The mapping of this process that holds `address`, from /proc/self/smaps: its range and VmFlags."""
    with open("/proc/self/smaps") as smaps:
        found: dict[str, Any] | None = None
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(part, 16) for part in head.split("-"))
                found = {"low": low, "high": high} if low <= address < high else None
            elif found is not None and head == "VmFlags:":
                found["flags"] = line.split()[1:]
                return found
    return None


def from_torch_allocator(tensor: torch.Tensor) -> bool:
    # torch's allocator gives resizable storages; storages over a Python buffer (our mappings) are not.
    return bool(tensor.untyped_storage().resizable())


@pytest.fixture
def every_buffer_mapped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every bucket buffer, however small, comes from `bucket_buffer`'s own mapping."""
    monkeypatch.setattr(memory, "HUGE_PAGE_MIN_BYTES", 1)
    monkeypatch.setattr(memory, "huge_pages_available", lambda: True)


@pytest.fixture
def fresh_setting() -> Iterator[None]:
    memory.huge_pages_available.cache_clear()
    yield
    memory.huge_pages_available.cache_clear()


@LINUX_HUGE_PAGES
def test_a_large_buffer_starts_on_a_huge_page_and_only_whole_ones_are_advised() -> None:
    if not memory.huge_pages_available():
        pytest.skip("transparent huge pages are turned off on this machine")
    numel = (3 * HUGE_PAGE + 400) // 4
    buffer = bucket_buffer(numel, torch.float32, CPU)
    assert buffer.shape == (numel,) and buffer.dtype == torch.float32 and not from_torch_allocator(buffer)
    address = buffer.data_ptr()
    assert address % HUGE_PAGE == 0
    advised, tail = mapping_of(address), mapping_of(address + 3 * HUGE_PAGE)
    assert advised is not None and "hg" in advised["flags"] and advised["high"] == address + 3 * HUGE_PAGE
    # The last 400 bytes lie on small pages: no huge page is spent on them.
    assert tail is not None and "hg" not in tail["flags"]
    buffer.fill_(1.5)
    assert buffer.sum().item() == 1.5 * numel


@pytest.mark.parametrize(
    ("numel", "device"), [(1000, "cpu"), (HUGE_PAGE, "meta"), (0, "cpu")], ids=["small", "meta", "empty"]
)
def test_small_empty_and_accelerator_buffers_come_from_torch(numel: int, device: str) -> None:
    buffer = bucket_buffer(numel, torch.float32, torch.device(device))
    assert buffer.shape == (numel,) and buffer.device.type == device
    assert device == "meta" or from_torch_allocator(buffer)


def test_the_environment_turns_huge_pages_off(monkeypatch: pytest.MonkeyPatch, fresh_setting: None) -> None:
    monkeypatch.setenv("ADAPTOPT_HUGE_PAGES", "0")
    assert not memory.huge_pages_available()
    assert from_torch_allocator(bucket_buffer(HUGE_PAGE, torch.float32, CPU))


@LINUX_HUGE_PAGES
def test_the_mapping_lives_as_long_as_a_view_of_it(every_buffer_mapped: None) -> None:
    buffer = bucket_buffer(HUGE_PAGE // 8, torch.float64, CPU)
    buffer.copy_(torch.arange(HUGE_PAGE // 8, dtype=torch.float64))
    view, address = buffer[10:20], buffer.data_ptr()
    del buffer
    gc.collect()
    assert mapping_of(address) is not None
    assert view.tolist() == [float(value) for value in range(10, 20)]
    del view
    gc.collect()
    assert mapping_of(address) is None


@LINUX_HUGE_PAGES
@pytest.mark.parametrize(("name", "options"), CONFIGS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CONFIGS)])
def test_bucketed_on_mapped_buffers_equals_reference_bitwise(
    name: str, options: dict[str, Any], every_buffer_mapped: None
) -> None:
    expected = reference(name, options)
    actual = train(name, options, "bucketed")
    # Bitwise but where the bucketed sums go in another order than the reference's (test_execution).
    assert_same(expected, actual, exact=name not in SUMS_IN_ANOTHER_ORDER)
    every_bucket = all_buckets(actual[1])  # MuonWithAdamW's two optimizers' too
    assert len(every_bucket) == BUCKETS.get(name, 1)
    for bucket in every_bucket:
        buffers = [bucket.flat_param, bucket.flat_grad, *bucket.state_buffers.values()]
        assert not any(map(from_torch_allocator, buffers))


@LINUX_HUGE_PAGES
@pytest.mark.parametrize("name", ["amsgrad", "sophia"])
def test_compiled_on_mapped_buffers_equals_reference(name: str, every_buffer_mapped: None) -> None:
    options = dict(CONFIGS)[name]
    expected = reference(name, options)
    model, optimizer = train(name, options, "compiled")
    assert_same(expected, (model, optimizer), exact=False)
    (bucket,) = buckets(optimizer)
    assert bucket.compiled is not None and not from_torch_allocator(bucket.flat_param)


@LINUX_HUGE_PAGES
def test_mapped_buckets_save_load_and_copy_like_torchs(every_buffer_mapped: None) -> None:
    model, optimizer = train("adam", {}, "bucketed", steps=10)
    # torch.save writes a view's whole storage: each param's is the bucket's buffer, of exactly its length.
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, saved)
    saved.seek(0)
    loaded = torch.load(saved)
    twin = copy.deepcopy(model)
    twin.load_state_dict(loaded["model"])
    twin_optimizer = adaptopt.create("adam", twin.parameters(), execution="bucketed", lr=1e-2)
    twin_optimizer.load_state_dict(loaded["optimizer"])
    copied_model, copied_optimizer = copy.deepcopy((model, optimizer))
    for run in [(model, optimizer), (twin, twin_optimizer), (copied_model, copied_optimizer)]:
        train("adam", {}, "bucketed", model=run[0], optimizer=run[1], steps=10, start=10)
        assert_same(reference("adam", {}, steps=20), run, exact=True)


@LINUX_HUGE_PAGES
def test_several_buckets_of_other_dtypes_on_mapped_buffers(every_buffer_mapped: None) -> None:
    torch.manual_seed(0)
    params = [torch.randn(6, dtype=torch.complex128), torch.randn(5, dtype=torch.float32), torch.randn(3, 4)]
    runs = []
    for execution in ["reference", "bucketed"]:
        copies = [nn.Parameter(param.clone()) for param in params]
        optimizer = adaptopt.Adam(copies, lr=1e-2, execution=execution)
        for step in range(5):
            for param in copies:
                param.grad = torch.full_like(param, step + 0.5) * param.detach()
            optimizer.step()
        runs.append((copies, optimizer))
    (want, want_optimizer), (got, got_optimizer) = runs
    assert len(list(buckets(got_optimizer))) == 2  # complex128 and float32 (one bucket holds both fp32 params)
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(want_optimizer.state[a]["exp_avg"], got_optimizer.state[b]["exp_avg"])
