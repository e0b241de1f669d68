r"""Every private torch name adaptopt uses, each behind a guard: a missing or changed one costs speed, not results.

The fast paths (`execution.py`, `compiled.py`) reach into torch where its public API has nothing to offer:
whether another tensor shares a param's memory, inductor's compiled kernel to call without torch.compile's
per-call wrappers, the C function behind it, a C compiler for the loop over rows. Private names move between
releases, so each is reached here and only here:

* `lookup(name)` resolves a name of `INTERNALS` on first use (never at import: `import adaptopt` touches
  none of them), and returns None where it is missing;
* `lose(name, reason)` is how the fast paths report one that is there but misbehaves (a self-test failed, a
  call raised);
* either way adaptopt warns once per process, naming the internal and what is given up (`INTERNALS`), and
  from then on takes the slower, public way round. The results are the same: every fallback is a path the
  test suite checks against the reference loop (`tests/test_torch_internals.py` removes or breaks each name).

Calls into compiled code through a signature adaptopt did not declare itself are never guessed: the C loop over
rows calls a kernel only after `c_kernel` has read the kernel's declaration in the source inductor compiled,
and found every argument a pointer or a 64-bit integer.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import re
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

__all__ = [
    "INTERNALS",
    "CKernel",
    "c_kernel",
    "compile_keeping_kernel",
    "dynamo_supported",
    "foreach_copy_",
    "increment_versions",
    "is_view",
    "load_c_function",
    "lookup",
    "lose",
    "mark_dynamic",
    "maybe_mark_dynamic",
    "owns_its_storage",
    "record_c_call",
]

INTERNALS: dict[str, str] = {
    "torch._C._storage_Use_Count": "params are stepped by the reference loop, not in buckets (a bucket must know "
    "that no other tensor shares a param's memory before it moves the param)",
    "torch._foreach_copy_": "grads are copied into buckets one tensor at a time",
    "torch.Tensor._base": "zero_grad(set_to_none=False) zeroes grads in place instead of handing backward the "
    "bucket's views of them",
    "torch._dynamo.eval_frame.is_dynamo_supported": "torch.compile is tried without knowing whether this "
    "platform supports it (a failure still runs the buckets eagerly)",
    "torch._dynamo.mark_dynamic": "compiled execution runs the buckets eagerly",
    "torch._dynamo.maybe_mark_dynamic": "a compiled low-bit update is compiled twice, for the first two sizes "
    "of param it meets",
    "torch._inductor.compile_fx.compile_fx": "compiled updates go through torch.compile's public path, not "
    "straight into inductor's kernel",
    "torch._inductor.compile_fx.compile_fx_inner": "compiled updates go through torch.compile's public path, not "
    "straight into inductor's kernel",
    "torch._inductor.config.size_asserts": "compiled kernels re-check their inputs' sizes on every call",
    "torch._inductor.config.cpp.threads": "compiled updates run as one parallel kernel per param, not as rows",
    "torch._inductor.config.emulate_precision_casts": "compiled updates that compute in bfloat16 (Muon's "
    "Newton-Schulz) round otherwise than eager ones: within bfloat16's precision of them, not bitwise",
    "torch._functorch.config.enable_autograd_cache": "compiled updates go through torch.compile's public path, "
    "not straight into inductor's kernel",
    "CompiledFxGraph.current_callable": "compiled updates go through torch.compile's public path, not straight "
    "into inductor's kernel",
    "torch._inductor.codecache.CppCodeCache": "compiled updates run as one kernel call per param, not as rows",
    "inductor's kernel bindings": "compiled updates run as one kernel call per param, not as rows",
    "inductor's kernel signature": "compiled updates run as one kernel call per param, not as rows",
}
"""Each internal, by the name the warning gives, and what adaptopt gives up without it. The last two are not
attributes but facts about inductor's output: the wrapper it generates calls one C function through a Python
binding in its globals, and that function's C declaration takes pointers and 64-bit integers alone."""

_found: dict[str, Any] = {}
_lost: dict[str, str] = {}
looked_up: list[str] = []
"""Every name `lookup` was asked for, in order (for tests: `import adaptopt` asks for none)."""


def lookup(name: str) -> Any | None:
    """The object `name` (a dotted path from `torch`, a key of `INTERNALS`), or None if it is missing or lost."""
    if name in _lost:
        return None
    if name in _found:
        return _found[name]
    looked_up.append(name)
    try:
        value = _resolve(name)
    except Exception as error:  # Missing, renamed, or an import that fails in this build of torch.
        lose(name, f"{type(error).__name__}: {error}")
        return None
    _found[name] = value
    return value


def _resolve(name: str) -> Any:
    if not name.startswith("torch."):
        raise KeyError(f"{name} is not an attribute path")
    parts = name.split(".")
    value: Any = torch
    for depth, part in enumerate(parts[1:], start=2):
        try:
            value = getattr(value, part)
        except AttributeError:
            # A submodule that nothing has imported yet.
            value = importlib.import_module(".".join(parts[:depth]))
    return value


def _exists(name: str) -> bool:
    try:
        _resolve(name)
    except Exception:
        return False
    return True


def lose(name: str, reason: str) -> None:
    """Stop using internal `name` for the rest of the process, and say so once."""
    if name in _lost:
        return
    _lost[name] = reason
    _found.pop(name, None)
    warnings.warn(
        f"adaptopt: {name} is not usable in torch {torch.__version__} ({reason}); {INTERNALS[name]}. "
        "Results are unchanged.",
        RuntimeWarning,
        stacklevel=3,
    )


def available(name: str) -> bool:
    """Whether `name` is found and not lost (looks it up, warning once if it is missing)."""
    return lookup(name) is not None


def reset() -> None:
    """Forget what was found and lost (for tests that remove internals)."""
    _found.clear()
    _lost.clear()
    _exclusive_users.clear()
    looked_up.clear()


# ------------------------------------------------------------------------------------------------------
# Storage sharing

_exclusive_users: list[int] = []
"""How many users `torch._C._storage_Use_Count` counts for a tensor whose storage nothing else shares (the
tensor and the probe), once it has passed its self-test."""


def _storage_users(count: Callable[[int], int], tensor: torch.Tensor) -> int:
    return int(count(tensor.untyped_storage()._cdata))


def owns_its_storage(param: torch.Tensor) -> bool:
    """Whether `param` alone uses its memory, so moving it into a bucket unties nothing (False where that
    cannot be told)."""
    if param.storage_offset() != 0 or param.untyped_storage().nbytes() != param.numel() * param.element_size():
        return False
    name = "torch._C._storage_Use_Count"
    count = lookup(name)
    if count is None:
        return False
    try:
        if not _exclusive_users:
            probe = torch.empty(1)
            alone = _storage_users(count, probe)
            view = probe.view(1)
            if _storage_users(count, view) != alone + 1 or _storage_users(count, torch.empty(1)) != alone:
                lose(name, "it miscounts a tensor's users")
                return False
            del view
            _exclusive_users.append(alone)
        return _storage_users(count, param) <= _exclusive_users[0]
    except Exception as error:
        lose(name, f"{type(error).__name__}: {error}")
        return False


# ------------------------------------------------------------------------------------------------------
# Eager helpers


def foreach_copy_(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """`targets[i].copy_(sources[i])` for every i, in one call where torch has `_foreach_copy_`."""
    copy = lookup("torch._foreach_copy_")
    if copy is not None:
        copy(targets, sources)
        return
    for target, source in zip(targets, sources, strict=True):
        target.copy_(source)


def is_view(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a view of another tensor's memory (True where that cannot be told)."""
    if lookup("torch.Tensor._base") is None:
        return True
    return tensor._base is not None


_versions_one_at_a_time: list[bool] = []


def increment_versions(params: list[torch.Tensor]) -> None:
    """Tell autograd that `params` changed in place (as torch.optim's in-place ops do), with the public
    `torch.autograd.graph.increment_version`: a list in one call where torch takes one, else (torch 2.4)
    one tensor at a time."""
    increment = torch.autograd.graph.increment_version
    if not _versions_one_at_a_time:
        try:
            increment(params)
            return
        except (TypeError, RuntimeError):  # Raised before anything is incremented.
            _versions_one_at_a_time.append(True)
    for param in params:
        increment(param)


# ------------------------------------------------------------------------------------------------------
# torch.compile and inductor


def dynamo_supported() -> bool:
    """Whether torch.compile can work here (True where torch cannot tell: failures still fall back)."""
    supported = lookup("torch._dynamo.eval_frame.is_dynamo_supported")
    if supported is None:
        return hasattr(torch, "compile")
    try:
        return bool(supported())
    except Exception as error:
        lose("torch._dynamo.eval_frame.is_dynamo_supported", f"{type(error).__name__}: {error}")
        return hasattr(torch, "compile")


def _mark(name: str, tensor: torch.Tensor, dim: int) -> bool:
    mark = lookup(name)
    if mark is None:
        return False
    try:
        mark(tensor, dim)
    except Exception as error:
        lose(name, f"{type(error).__name__}: {error}")
        return False
    return True


def mark_dynamic(tensor: torch.Tensor, dim: int) -> bool:
    """Mark `tensor`'s `dim` as of dynamic size for dynamo; False where that is not possible."""
    return _mark("torch._dynamo.mark_dynamic", tensor, dim)


def maybe_mark_dynamic(tensor: torch.Tensor, dim: int) -> bool:
    """Mark `tensor`'s `dim` as possibly dynamic: dynamo may still find it equal to another size, or specialise
    it, without an error (unlike `mark_dynamic`). False where that is not possible."""
    return _mark("torch._dynamo.maybe_mark_dynamic", tensor, dim)


def inductor_setting_available(setting: str) -> bool:
    """Whether inductor has `setting` (a key of the settings `compile_keeping_kernel` takes)."""
    return available(f"torch._inductor.config.{setting}")


def kernel_keeping_available() -> bool:
    """Whether `compile_keeping_kernel` can run at all (else compile with the public `backend="inductor"`)."""
    return all(available(f"torch._inductor.compile_fx.{name}") for name in ("compile_fx", "compile_fx_inner"))


def compile_plain(graph_module: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
    """Inductor's compiled `graph_module`, as `backend="inductor"` would make it (check
    `kernel_keeping_available()` first): for updates whose kernel is not called directly."""
    compile_fx = lookup("torch._inductor.compile_fx.compile_fx")
    assert compile_fx is not None, "check kernel_keeping_available() first"
    # Low-precision results rounded where eager rounds them: a compiled bfloat16 Newton-Schulz then equals
    # the eager one (and torch's Muon) bitwise, where it would otherwise drift a few percent per step.
    setting = "emulate_precision_casts"
    applied = {setting: True} if inductor_setting_available(setting) else {}
    with importlib.import_module("torch._inductor.config").patch(applied):
        compiled: Callable[..., Any] = compile_fx(graph_module, example_inputs)
    return compiled


_CURRENT_CALLABLE = "current_callable"
"""The compiled graph's attribute that holds its boxed callable (a name, so that a test can rename it)."""


def compile_keeping_kernel(
    graph_module: torch.fx.GraphModule, example_inputs: list[Any], settings: dict[str, Any]
) -> tuple[Callable[..., Any], Callable[[list[Any]], Any] | None]:
    """Inductor's compiled `graph_module` (what dynamo's backend returns), and the boxed callable of the one
    graph inductor compiled for it (None where it cannot be had). `settings` are inductor's, each applied only
    where inductor still has it (see `inductor_setting_available`)."""
    compile_fx = lookup("torch._inductor.compile_fx.compile_fx")
    compile_fx_inner = lookup("torch._inductor.compile_fx.compile_fx_inner")
    assert compile_fx is not None and compile_fx_inner is not None, "check kernel_keeping_available() first"
    kernels = []

    def inner_compile(*args: Any, **kwargs: Any) -> Any:
        kernel = compile_fx_inner(*args, **kwargs)
        kernels.append(kernel)
        return kernel

    config = importlib.import_module("torch._inductor.config")
    applied = {key: value for key, value in settings.items() if inductor_setting_available(key)}
    with _no_autograd_cache(), config.patch(applied):
        graph = compile_fx(graph_module, example_inputs, inner_compile=inner_compile)
    if not kernels:
        # AOTAutograd's own cache handed back a compiled graph without calling `inner_compile`.
        lose("torch._functorch.config.enable_autograd_cache", "AOTAutograd's cache could not be turned off")
        return graph, None
    name = "CompiledFxGraph.current_callable"
    if len(kernels) != 1 or name in _lost:
        return graph, None
    # The compiled graph's own wrapper only adds debugging and autotuning hooks around this callable, which
    # takes its arguments boxed (one list).
    callable_ = getattr(kernels[0], _CURRENT_CALLABLE, None)
    if not (callable(callable_) and getattr(kernels[0], "_boxed_call", False)):
        lose(name, "the compiled graph has no boxed callable of that name")
        return graph, None
    return graph, callable_


_SINCE = {"torch._functorch.config.enable_autograd_cache": (2, 6)}
"""Internals that older torches lack by design (so their absence there is no loss): the release each came in."""


def torch_release() -> tuple[int, int]:
    """This torch's (major, minor) release."""
    return _torch_release()


def _torch_release() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


@contextlib.contextmanager
def _no_autograd_cache() -> Iterator[None]:
    """AOTAutograd's cache off: it would hand back a compiled graph without calling our inner compile (inductor's
    FX-graph cache still spares the C++ compilation). Torches from before that cache need nothing."""
    name = "torch._functorch.config.enable_autograd_cache"
    if (_torch_release() < _SINCE[name] and not _exists(name)) or lookup(name) is None:
        yield
        return
    with importlib.import_module("torch._functorch.config").patch(enable_autograd_cache=False):
        yield


# ------------------------------------------------------------------------------------------------------
# C functions


def load_c_function(source: str, name: str) -> Any | None:
    """The function `name` of the C++ `source`, compiled by inductor's code cache (its compiler and flags,
    OpenMP included), or None where that is not possible."""
    cache = lookup("torch._inductor.codecache.CppCodeCache")
    if cache is None:
        return None
    try:
        return getattr(cache.load(source), name)
    except Exception as error:  # No compiler, or the cache's interface moved.
        lose("torch._inductor.codecache.CppCodeCache", f"{type(error).__name__}: {error}")
        return None


def _is_cpp_binding(value: Any) -> bool:
    """Whether `value` is a function of a compiled extension module (how inductor's wrappers hold kernels)."""
    module = getattr(value, "__self__", None)
    return (
        isinstance(value, types.BuiltinFunctionType)
        and isinstance(module, types.ModuleType)
        and str(getattr(module, "__file__", "")).endswith((".so", ".pyd", ".dylib"))
    )


def record_c_call(kernel: Callable[[list[Any]], Any], arguments: list[Any]) -> tuple[Any, tuple[Any, ...]] | None:
    """Call `kernel` (a compiled graph's callable) on `arguments` with the C bindings in its module's globals
    swapped for recorders: the binding and arguments of the one C call it made, or None if it made another
    number of them or has no such globals."""
    name = "inductor's kernel bindings"
    if name in _lost:
        return None
    wrapper = getattr(getattr(kernel, "__func__", kernel), "__globals__", None)
    bindings = {key: value for key, value in wrapper.items() if _is_cpp_binding(value)} if wrapper else {}
    if wrapper is None or not bindings:
        lose(name, "the compiled graph's module holds no C bindings")
        return None
    calls: list[tuple[Any, tuple[Any, ...]]] = []

    def recording(binding: Any) -> Callable[..., Any]:
        def record(*args: Any) -> Any:
            calls.append((binding, args))
            return binding(*args)

        return record

    try:
        wrapper.update({key: recording(binding) for key, binding in bindings.items()})
        kernel(arguments)
    except Exception as error:
        lose(name, f"calling the compiled graph with recorders raised {type(error).__name__}: {error}")
        return None
    finally:
        wrapper.update(bindings)
    return calls[0] if len(calls) == 1 else None


class CKernel(NamedTuple):
    """A C function inductor compiled, checked to take only pointers and 64-bit integers."""

    address: int
    library: ctypes.CDLL
    """Its library, held open."""
    pointers: tuple[bool, ...]
    """For each argument, whether it is a pointer (else a 64-bit integer)."""


_ARGUMENT = re.compile(
    r"^(?:const\s+)?(?:(?P<pointee>[A-Za-z_][\w:]*(?:<[\w:, ]*>)?)\s*\*\s*(?:const\s+)?"
    r"|(?P<integer>int64_t|long|long long|std::int64_t)\s+(?:const\s+)?)[A-Za-z_]\w*$"
)


def c_kernel(binding: Any) -> CKernel | None:
    """The C function behind inductor's Python `binding`, if its declaration in the C++ source next to the
    binding's library says it returns nothing and takes pointers and 64-bit integers alone: the calling
    convention the C loop over rows calls it by. None otherwise (nothing is guessed)."""
    name = "inductor's kernel signature"
    if name in _lost:
        return None
    try:
        library_path = Path(binding.__self__.__file__)
        function = binding.__name__
        source = _kernel_source(library_path)
        declaration = re.search(
            rf'extern\s+"C"\s+void\s+{re.escape(function)}\s*\(([^)]*)\)\s*\{{', source, flags=re.DOTALL
        )
        if declaration is None:
            raise ValueError(f'no extern "C" void {function}(...) in {library_path.name}\'s source')
        pointers = []
        for argument in declaration.group(1).split(","):
            match = _ARGUMENT.match(" ".join(argument.split()))
            if match is None:
                raise ValueError(f"argument {argument.strip()!r} is neither a pointer nor a 64-bit integer")
            pointers.append(match.group("pointee") is not None)
        library = ctypes.CDLL(str(library_path))
        address = ctypes.cast(getattr(library, function), ctypes.c_void_p).value
        if address is None:
            raise ValueError(f"{function} has no address")
    except Exception as error:
        lose(name, f"{type(error).__name__}: {error}")
        return None
    return CKernel(address, library, tuple(pointers))


def _kernel_source(library: Path) -> str:
    """The C++ source inductor compiled `library` from: beside it, of the same name (`x.so`, `x.cpp`)."""
    return library.with_suffix(".cpp").read_text()
