r"""Muon: MomentUm Orthogonalized by Newton-Schulz, and `muon_with_adamw`, the split it is used with.

Jordan et al., *Muon: An optimizer for hidden layers in neural networks* (2024,
kellerjordan.github.io/posts/muon), with the update scaling of Liu et al., *Muon is Scalable for LLM
Training* (Moonshot AI, arXiv:2502.16982). Muon runs SGD momentum on a weight matrix and steps by the
momentum's *orthogonalized* form, $U V^\top$ of its SVD $U S V^\top$ (approximately: every singular value
is moved towards 1), so every direction of the matrix moves by the same amount. With gradient $G_t$
(after maximize), momentum $\mu$ and step $t$:

$$B_t = \mu B_{t-1} + (1 - \mu) G_t \qquad
  \tilde B_t = \begin{cases} \mu B_t + (1 - \mu) G_t & \text{nesterov} \\ B_t & \text{otherwise} \end{cases}$$
$$O_t = \mathrm{NS}^{(a,b,c)}_k\!\left(\tilde B_t / \max(\lVert \tilde B_t \rVert_F, \epsilon)\right) \qquad
  \theta_t = \theta_{t-1} (1 - \eta \lambda) - \eta\, s(m, n)\, O_t$$

$\mathrm{NS}_k$ is $k$ steps of the quintic Newton-Schulz iteration $X \leftarrow a X + (b A + c A^2) X$
with $A = X X^\top$, on the wide orientation of the $m \times n$ matrix (so that $A$ is the smaller Gram
matrix); dividing by the Frobenius norm first puts every singular value in $[0, 1]$, where the polynomial
$a x + b x^3 + c x^5$, iterated, pushes them towards 1. Keller Jordan's coefficients are chosen for a
steep slope at 0, so that small singular values grow fast, at the price of ending between about 0.5 and
1.5 rather than at 1, which trains as well as the exact polar factor. The scale $s(m, n)$ is
`adjust_lr_fn`: `"original"` (or None), Keller Jordan's $\sqrt{\max(1, m/n)}$; `"match_rms_adamw"`,
Moonshot's $0.2 \sqrt{\max(m, n)}$, which gives the update the RMS of AdamW's so that AdamW's rate and
decay carry over. Weight decay $\lambda$ is decoupled and uses the unscaled rate $\eta$.

Verified against `torch.optim.Muon` of torch 2.13, which we equal in argument names, defaults (including
`weight_decay=0.1` and `nesterov=True`), order of operations and state name (`momentum_buffer`): a float
`weight_decay=w` is its decoupled decay (a `WeightDecay` policy works too). torch runs the iteration in
bfloat16 whatever the params' dtype; so do we by default (`ns_dtype=torch.bfloat16`), and then equal it
bitwise on float64 params. `ns_dtype=torch.float64` (or float32) runs it in that precision instead; the
reference tests use float64, against torch's own code with its bfloat16 cast lifted.

We differ where torch is wrong or where we add:

* the iteration starts from a copy: torch normalises its input in place when it is already bfloat16,
  which for bfloat16 params with `nesterov=False` divides the momentum buffer itself by its norm;
* params that are not matrices (and complex ones) raise `ValueError` naming their shape when they are
  added, as torch does at construction; ours also applies to `add_param_group`. torch keeps no `step`
  count (Muon's math needs none); the base does, and one missing from a torch checkpoint is taken as 0;
* validation with `ValueError`/`TypeError` (momentum in $[0, 1)$, `ns_steps` in $[0, 100)$), maximize,
  master weights and `state_dtype`.

The split, `muon_with_adamw`. Muon is for the *hidden* matrices of a network. Embeddings, the output layer,
and vectors and scalars (biases, norms' gains: no matrix to orthogonalize) are left to AdamW, as Keller
Jordan's and Moonshot's code both prescribe (embeddings and heads train better with AdamW; in the
modular-norm view their natural norm is not the spectral norm in which Muon's step is steepest). Conv
filters (3-D and 4-D) go to AdamW here too, as `torch.optim.Muon` takes matrices only.
`muon_with_adamw(model)` makes that split in one call and returns one `MuonWithAdamW`, a
`torch.optim.Optimizer` that steps, zeroes, saves and loads both, and that LR schedulers accept:

* from an `nn.Module`: Muon takes every 2-D param except those of `nn.Embedding`/`nn.EmbeddingBag`
  modules and of the model's last `nn.Linear` in `model.modules()` order (its output layer, as in a
  classifier or a language model's head; a weight tied to the embedding counts as the embedding).
  `exclude` (modules, params, or their names) replaces that guess; `exclude=()` gives every 2-D param to
  Muon;
* from params (or `named_parameters()` pairs): every 2-D param goes to Muon except those in `exclude`;
* the hyper-parameters follow Moonshot's recipe: one `lr` and one `weight_decay` for both, Muon's update
  scaled by `adjust_lr_fn="match_rms_adamw"`, AdamW with `betas=(0.9, 0.95)`, `eps=1e-8`. Keller Jordan's
  recipe is about `muon_with_adamw(model, lr=3e-4, muon_lr=0.02, weight_decay=0.01, adjust_lr_fn="original")`.
  AdamW is our `Adam` with decoupled decay and `optimized_update=False`, i.e. `torch.optim.AdamW`.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from typing_extensions import Unpack

from ..base import CommonOptions, GenericAdaptiveOptimizer, Group, ParamsT, Scalars, State
from ..functional import replicated
from ..validation import _flag, _in_range, with_listed_params
from ..weight_decay import WeightDecay
from .adam import Adam

__all__ = [
    "MUON_CHECKS",
    "Muon",
    "MuonWithAdamW",
    "adjusted_lr",
    "muon_with_adamw",
    "newton_schulz_orthogonalize",
]

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""Keller Jordan's quintic coefficients $(a, b, c)$ (torch's defaults): a steep slope at 0, see above."""

NS_DTYPES = ("bfloat16", "float32", "float64")
"""What `ns_dtype` may be: the precision of the Newton-Schulz iteration."""

ADJUST_LR_FNS = (None, "original", "match_rms_adamw")

# Batches. Everything here works on one matrix or on a batch of same-shape matrices stacked along leading
# dims: only dims -2 and -1 are read (`mT`, batched matmul, norms with keepdim), so a later batched path can
# step all params of one shape at once.


def _scaled_matmul_add(
    bias: torch.Tensor, left: torch.Tensor, right: torch.Tensor, *, beta: float, alpha: float
) -> torch.Tensor:
    """`beta * bias + alpha * left @ right` in one fused op, rounded once as `torch.addmm` rounds it."""
    if bias.ndim == 2:
        return torch.addmm(bias, left, right, beta=beta, alpha=alpha)
    batch = bias.shape[:-2]
    fused = torch.baddbmm(
        bias.reshape(-1, *bias.shape[-2:]),
        left.reshape(-1, *left.shape[-2:]),
        right.reshape(-1, *right.shape[-2:]),
        beta=beta,
        alpha=alpha,
    )
    return fused.reshape(*batch, *fused.shape[-2:])


def newton_schulz_orthogonalize(
    matrix: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """$\\mathrm{NS}^{(a,b,c)}_k(M / \\max(\\lVert M \\rVert_F, \\epsilon))$ in `dtype`, over the last two dims."""
    a, b, c = coefficients
    # A copy even when `matrix` is already in `dtype`: it is normalised in place, and may be the momentum.
    work = matrix.to(dtype, copy=True)
    tall = matrix.size(-2) > matrix.size(-1)
    if tall:
        work = work.mT  # iterate on the wide side, where X X^T is the smaller Gram matrix
    # The norm clamped out of place: under FSDP2 it is a DTensor with a partial placement (no in-place ops).
    work.div_(replicated(torch.linalg.vector_norm(work, dim=(-2, -1), keepdim=True)).clamp(min=eps))
    for _ in range(steps):
        gram = work @ work.mT
        polynomial = _scaled_matmul_add(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
        work = _scaled_matmul_add(work, polynomial, work, beta=a, alpha=1.0)  # a X + (b A + c A^2) X
    return work.mT if tall else work


def adjusted_lr(lr: Any, adjust_lr_fn: str | None, shape: torch.Size) -> Any:
    """$\\eta\\, s(m, n)$ for a matrix of `shape` (its last two dims) under `adjust_lr_fn`."""
    rows, cols = shape[-2:]
    if adjust_lr_fn == "match_rms_adamw":
        return lr * (0.2 * math.sqrt(max(rows, cols)))
    return lr * math.sqrt(max(1, rows / cols))


def _ns_dtype_name(dtype: Any) -> Any:
    """`ns_dtype` as the group stores it, a name such as "bfloat16" (groups hold primitives only)."""
    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype


def _momentum(name: str, value: Any) -> None:
    _in_range(name, value, 0.0, 1.0, low_open=False, high_open=True)


def _ns_coefficients(name: str, value: Any) -> None:
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"{name} must be a triple (a, b, c), got {type(value).__name__} {value!r}")
    if len(value) != 3:
        raise ValueError(f"{name} must be a triple (a, b, c), got {len(value)} values: {value!r}")
    for index, coefficient in enumerate(value):
        _in_range(f"{name}[{index}]", coefficient, -math.inf, math.inf, low_open=True, high_open=True)


def _ns_steps(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    _in_range(name, value, 0, 100, low_open=False, high_open=True)


def _adjust_lr_fn(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be a str or None, got {type(value).__name__} {value!r}")
    if value not in ADJUST_LR_FNS:
        raise ValueError(f"{name} must be one of {ADJUST_LR_FNS}, got {value!r}")


def _ns_dtype(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a torch.dtype, got {type(value).__name__} {value!r}")
    if value not in NS_DTYPES:
        raise ValueError(f"{name} must be one of torch.{', torch.'.join(NS_DTYPES)}, got {value!r}")


MUON_CHECKS: dict[str, Callable[[str, Any], None]] = {
    "momentum": _momentum,
    "nesterov": _flag,
    "ns_coefficients": _ns_coefficients,
    "ns_steps": _ns_steps,
    "adjust_lr_fn": _adjust_lr_fn,
    "ns_dtype": _ns_dtype,
}
"""Muon's own group keys and their checks (validation's table does not know them yet)."""


class Muon(GenericAdaptiveOptimizer):
    """Muon, for 2-D params only; see the module docstring for the update rule and `muon_with_adamw`.

    * `lr` is $\\eta$; `momentum` is $\\mu \\in [0, 1)$; `nesterov` steps on $\\mu B_t + (1 - \\mu) G_t$.
    * `weight_decay` is a `WeightDecay` policy or a float, meaning torch's decoupled decay.
    * `ns_coefficients` $(a, b, c)$, `ns_steps` $k$, `eps` $\\epsilon$: the Newton-Schulz iteration;
      `ns_dtype` its precision (bfloat16, as torch; float32 or float64).
    * `adjust_lr_fn`: the update's scale $s(m, n)$, `"original"` (None) or `"match_rms_adamw"`.
    """

    kind = "matrixwise"  # the orthogonalization reads a whole matrix: not elementwise
    own_checks = MUON_CHECKS

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        *,
        weight_decay: WeightDecay | float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        ns_dtype: torch.dtype = torch.bfloat16,
        **options: Unpack[CommonOptions],
    ) -> None:
        defaults: dict[str, Any] = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
            ns_dtype=_ns_dtype_name(ns_dtype),
        )
        super().__init__(params, defaults, weight_decay=weight_decay, **options)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """The base's, for matrices only, with our own keys checked."""
        if isinstance(param_group, dict):
            param_group = with_listed_params(param_group)
            if "ns_dtype" in param_group:
                param_group["ns_dtype"] = _ns_dtype_name(param_group["ns_dtype"])
            for param in param_group.get("params", ()):
                if isinstance(param, torch.Tensor) and (param.ndim != 2 or param.is_complex()):
                    what = f"a {param.dtype} param" if param.is_complex() else "a param"
                    raise ValueError(
                        f"Muon optimizes real 2-D params (matrices) only, got {what} of shape {tuple(param.shape)}; "
                        "optimize it with AdamW (see muon_with_adamw)"
                    )
        super().add_param_group(param_group)

    def init_state(self, state: State, group: Group, param: torch.Tensor) -> None:
        state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def step_param(self, state: State, group: Group, grad: torch.Tensor, param: torch.Tensor, scalars: Scalars) -> None:
        momentum = group["momentum"]
        buffer = state["momentum_buffer"]
        # B_t = mu B_{t-1} + (1 - mu) G_t, and Nesterov's look-ahead mu B_t + (1 - mu) G_t.
        buffer.lerp_(grad, 1.0 - momentum)
        direction = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
        orthogonal = newton_schulz_orthogonalize(
            direction,
            tuple(group["ns_coefficients"]),
            group["ns_steps"],
            group["eps"],
            getattr(torch, group["ns_dtype"]),
        )
        # The base has decayed param with the unscaled rate; the step takes the scaled one. A bfloat16
        # `orthogonal` is widened exactly to the param's dtype by add_.
        param.add_(orthogonal, alpha=-adjusted_lr(scalars["lr"], group["adjust_lr_fn"], param.shape))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The base's `load_state_dict`; a param state without `step` (torch's Muon keeps none) starts at 0."""
        if isinstance(state_dict, Mapping) and isinstance(state_dict.get("state"), Mapping):
            states = {
                key: {"step": 0, **value} if isinstance(value, Mapping) and "step" not in value else value
                for key, value in state_dict["state"].items()
            }
            state_dict = {**state_dict, "state": states}
        super().load_state_dict(state_dict)


# --------------------------------------------------------------------------------------------------
# Muon for the hidden matrices, AdamW for the rest


class MuonWithAdamW(Optimizer):
    """Two optimizers stepped as one `torch.optim.Optimizer`: `muon` and `adamw` (see `muon_with_adamw`).

    * `param_groups` lists Muon's groups, then AdamW's: the very dicts the two step with, so that an LR
      scheduler's (or anyone's) changes reach them; `add_param_group` takes Keller Jordan's `use_muon` key.
    * `state` is a merged copy of both states, for reading (a param's own state dict is the live one).
    * `state_dict()` is in torch's format, as one optimizer's over `param_groups` (Muon's params numbered
      first), each group marked with its `use_muon`: `torch.distributed.checkpoint`'s `get_state_dict` and
      `set_state_dict` read and write it. `load_state_dict` splits it by position and loads both parts or, if
      either does not fit, neither; it also reads the `{"muon": ..., "adamw": ...}` of adaptopt 0.1.
    * The state-dict hooks of `torch.optim.Optimizer` (`register_state_dict_pre_hook` and the rest) run
      around the whole; the parts run their own.
    """

    def __init__(self, muon: Muon, adamw: Optimizer) -> None:
        muon_params = {id(param) for group in muon.param_groups for param in group["params"]}
        if any(id(param) in muon_params for group in adamw.param_groups for param in group["params"]):
            raise ValueError("a param is in both the Muon and the AdamW optimizer")
        self.muon = muon
        self.adamw = adamw
        # torch.optim.Optimizer's own bookkeeping (step hooks, the profiled step), with no groups of its
        # own: this is how torch sets it up for an optimizer it unpickles.
        Optimizer.__setstate__(self, {"defaults": {}})

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [*self.muon.param_groups, *self.adamw.param_groups]

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        raise AttributeError("MuonWithAdamW's param groups are those of .muon and .adamw; change them there")

    @property
    def state(self) -> defaultdict[torch.Tensor, Any]:
        return defaultdict(dict, {**self.muon.state, **self.adamw.state})

    @state.setter
    def state(self, state: defaultdict[torch.Tensor, Any]) -> None:
        raise AttributeError("MuonWithAdamW's state is that of .muon and .adamw; load it with load_state_dict")

    def __getstate__(self) -> dict[str, Any]:
        return {"muon": self.muon, "adamw": self.adamw}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["muon"], state["adamw"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(\nmuon={self.muon!r},\nadamw={self.adamw!r})"

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step of both; with a `closure`, the loss is evaluated once, first."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to Muon if its `use_muon` is True, to AdamW if it is False (Keller Jordan's key)."""
        if not isinstance(param_group, dict) or not isinstance(param_group.get("use_muon"), bool):
            raise TypeError("MuonWithAdamW.add_param_group needs a dict with use_muon=True (Muon) or False (AdamW)")
        rest = {key: value for key, value in param_group.items() if key != "use_muon"}
        (self.muon if param_group["use_muon"] else self.adamw).add_param_group(rest)

    def state_dict(self) -> dict[str, Any]:
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        muon, adamw = self.muon.state_dict(), self.adamw.state_dict()
        # Each part numbers its params from 0 in its groups' order; one optimizer over `param_groups` would
        # number AdamW's after Muon's.
        offset = sum(len(group["params"]) for group in muon["param_groups"])
        state_dict: dict[str, Any] = {
            "state": {**muon["state"], **{index + offset: entry for index, entry in adamw["state"].items()}},
            "param_groups": [
                *({**group, "use_muon": True} for group in muon["param_groups"]),
                *(
                    {**group, "params": [index + offset for index in group["params"]], "use_muon": False}
                    for group in adamw["param_groups"]
                ),
            ],
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)  # type: ignore[arg-type]
            if result is not None:
                state_dict = result
        muon_part, adamw_part = self._split(state_dict)
        before = self.muon.state_dict()
        self.muon.load_state_dict(muon_part)
        try:
            self.adamw.load_state_dict(adamw_part)
        except BaseException:
            self.muon.load_state_dict(before)  # both or neither
            raise
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _split(self, state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Muon's and AdamW's state dicts in `state_dict` (this class's format, or adaptopt 0.1's pair)."""
        if isinstance(state_dict, Mapping) and set(state_dict) == {"muon", "adamw"}:
            return dict(state_dict["muon"]), dict(state_dict["adamw"])
        if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError("state_dict must be a mapping with the keys 'state' and 'param_groups'")
        groups, muon_groups = list(state_dict["param_groups"]), len(self.muon.param_groups)
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups)} param groups, this optimizer has {len(self.param_groups)}")
        for index, group in enumerate(groups):
            if not isinstance(group, Mapping) or "params" not in group:
                raise ValueError(f"param group {index} of the state_dict is not a mapping with 'params'")
            if len(group["params"]) != len(self.param_groups[index]["params"]):
                raise ValueError(
                    f"param group {index} has {len(group['params'])} params in the state_dict "
                    f"and {len(self.param_groups[index]['params'])} in this optimizer"
                )
            if "use_muon" in group and group["use_muon"] != (index < muon_groups):
                raise ValueError(
                    f"param group {index} of the state_dict has use_muon={group['use_muon']!r}; this optimizer's "
                    f"first {muon_groups} groups are Muon's, the others AdamW's"
                )
        parts = []
        for part_groups in (groups[:muon_groups], groups[muon_groups:]):
            ids = [saved_id for group in part_groups for saved_id in group["params"]]
            parts.append(
                {
                    "state": {
                        saved_id: state_dict["state"][saved_id] for saved_id in ids if saved_id in state_dict["state"]
                    },
                    "param_groups": [{k: v for k, v in group.items() if k != "use_muon"} for group in part_groups],
                }
            )
        grouped = {saved_id for group in groups for saved_id in group["params"]}
        strays = [saved_id for saved_id in state_dict["state"] if saved_id not in grouped]
        if strays:
            raise ValueError(f"state_dict has state for param id {strays[0]!r}, which is in no group")
        return parts[0], parts[1]


ExcludeT = Iterable[nn.Module | torch.Tensor | str]
"""What `muon_with_adamw` may be told to leave to AdamW: modules, params, or their names."""


def muon_with_adamw(
    model_or_params: nn.Module | Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    lr: float = 1e-3,
    *,
    weight_decay: float = 0.1,
    exclude: ExcludeT | None = None,
    muon_lr: float | None = None,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    adjust_lr_fn: str | None = "match_rms_adamw",
    ns_dtype: torch.dtype = torch.bfloat16,
    adamw_betas: tuple[float, float] = (0.9, 0.95),
    adamw_eps: float = 1e-8,
    **options: Unpack[CommonOptions],
) -> MuonWithAdamW:
    """Muon for the hidden matrices of `model_or_params`, AdamW for the rest, as one optimizer.

    Which params are hidden matrices, and the defaults (Moonshot's recipe), are in the module docstring.
    `lr` and `weight_decay` (decoupled, a float) are both optimizers'; `muon_lr` overrides Muon's rate;
    `momentum`, `nesterov`, `ns_steps`, `adjust_lr_fn` and `ns_dtype` are Muon's, `adamw_betas` and
    `adamw_eps` AdamW's; the common `options` (maximize, ...) go to both.
    """
    hidden, rest = split_hidden_matrices(model_or_params, exclude)
    try:
        muon = Muon(
            [{"params": hidden}],
            lr if muon_lr is None else muon_lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
            ns_dtype=ns_dtype,
            **options,
        )
    except (TypeError, ValueError) as error:
        raise _renamed(error, {} if muon_lr is None else {"lr": "muon_lr"}) from error
    try:
        adamw = Adam(
            [{"params": rest}],
            lr,
            betas=adamw_betas,
            eps=adamw_eps,
            weight_decay=WeightDecay(weight_decay),
            optimized_update=False,
            **options,
        )
    except (TypeError, ValueError) as error:
        raise _renamed(error, {"betas": "adamw_betas", "eps": "adamw_eps"}) from error
    return MuonWithAdamW(muon, adamw)


def _renamed(error: TypeError | ValueError, names: Mapping[str, str]) -> TypeError | ValueError:
    """`error` with the argument it names as `muon_with_adamw` calls it (`adamw_betas`, not `betas`)."""
    message = str(error)
    for inner, outer in names.items():
        if re.match(rf"{inner}\b", message):
            return type(error)(outer + message[len(inner) :])
    return error


def split_hidden_matrices(
    model_or_params: nn.Module | Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    exclude: ExcludeT | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(Muon's params, AdamW's params), in the model's order; see the module docstring for the rule."""
    model = model_or_params if isinstance(model_or_params, nn.Module) else None
    named: list[tuple[str, torch.Tensor]]
    if isinstance(model_or_params, nn.Module):
        named = list(model_or_params.named_parameters())  # each param once, tied ones under their first name
        if exclude is None:
            modules = list(model_or_params.modules())
            exclude = [module for module in modules if isinstance(module, (nn.Embedding, nn.EmbeddingBag))]
            linears = [module for module in modules if isinstance(module, nn.Linear)]
            exclude += linears[-1:]
    else:
        named = [item if isinstance(item, tuple) else ("", item) for item in model_or_params]
    by_name = {name: param for name, param in named if name}
    left_out: set[int] = set()
    for item in exclude or ():
        if isinstance(item, torch.Tensor):
            left_out.add(id(item))
        elif isinstance(item, nn.Module):
            left_out.update(id(param) for param in item.parameters())
        elif isinstance(item, str) and item in by_name:
            left_out.add(id(by_name[item]))
        elif isinstance(item, str) and model is not None and _has_submodule(model, item):
            left_out.update(id(param) for param in model.get_submodule(item).parameters())
        else:
            raise ValueError(f"exclude: {item!r} is no param, module, or name of one, of the params given")
    hidden: list[torch.Tensor] = []
    rest: list[torch.Tensor] = []
    for _, param in named:
        is_hidden_matrix = param.ndim == 2 and not param.is_complex() and id(param) not in left_out
        (hidden if is_hidden_matrix else rest).append(param)
    return hidden, rest


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
