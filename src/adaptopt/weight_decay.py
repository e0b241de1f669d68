r"""Weight decay as a policy object.

No optimizer in adaptopt implements weight decay itself. The constructor takes a `WeightDecay` policy, the
base class writes its settings into every param group, and before an optimizer sees a gradient the base
class calls `apply_weight_decay`, which does one of:

| mode | what happens before the optimizer's own update |
|---|---|
| coupled L2 (`weight_decouple=False`) | $g_t \leftarrow g_t + \lambda \theta_{t-1}$ |
| decoupled (`weight_decouple=True`) | $\theta_{t-1} \leftarrow \theta_{t-1} (1 - \eta_t \lambda)$ |
| absolute decoupled (`absolute=True`) | $\theta_{t-1} \leftarrow \theta_{t-1} (1 - \lambda)$ |
| coupled L1 (`l1=True, weight_decouple=False`) | $g_t \leftarrow g_t + \lambda\, \mathrm{sign}(\theta_{t-1})$ |
| decoupled L1 (`l1=True`) | $\theta_{t-1} \leftarrow \theta_{t-1} - \eta_t \lambda\, \mathrm{sign}(\theta_{t-1})$ |

$\eta_t$ is the *effective* learning rate at step $t$, after any warm-up or schedule, so the decay follows
the schedule (the labml seed used the base rate here, which over-decays during warm-up).

Decoupled decay is from Loshchilov & Hutter, *Decoupled Weight Decay Regularization*, ICLR 2019
(arXiv:1711.05101); `Adam(weight_decay=WeightDecay(w))` equals `torch.optim.AdamW(weight_decay=w)`.

The coefficient and the mode live in the param group (`weight_decay`, `decoupled_weight_decay`,
`weight_decay_absolute`, `weight_decay_l1`), so a group can switch decay off for biases and norms, and a
group can also be given its own `WeightDecay` policy. `decoupled_weight_decay` is torch.optim's own key,
so the mode travels in checkpoints both ways:

```python
Adam([{"params": weights}, {"params": biases, "weight_decay": 0.0}], weight_decay=WeightDecay(0.01))
```

A plain float given as `weight_decay` means `WeightDecay(float)`: **decoupled**, as in the labml seed.
This differs from `torch.optim.Adam`, whose float means coupled L2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .validation import validate_group

__all__ = ["WeightDecay", "apply_weight_decay"]


@dataclass(frozen=True)
class WeightDecay:
    """How, and how strongly, to pull parameters towards zero.

    * `weight_decay` is the coefficient $\\lambda \\ge 0$.
    * `weight_decouple` applies the decay to the parameters directly instead of adding it to the gradient.
    * `absolute` (decoupled only) makes the decay independent of the learning rate.
    * `l1` uses $\\mathrm{sign}(\\theta)$ instead of $\\theta$: the L1 penalty's (sub)gradient.
    """

    weight_decay: float = 0.0
    weight_decouple: bool = True
    absolute: bool = False
    l1: bool = False

    def __post_init__(self) -> None:
        for name in ("weight_decouple", "absolute", "l1"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"WeightDecay.{name} must be a bool, got {getattr(self, name)!r}")
        if self.absolute and not self.weight_decouple:
            raise ValueError("WeightDecay(absolute=True) requires weight_decouple=True")
        validate_group({"weight_decay": self.weight_decay})

    @classmethod
    def coerce(cls, value: WeightDecay | float) -> WeightDecay:
        """Accept a policy, or a plain float meaning decoupled decay (the seed's convention)."""
        if isinstance(value, WeightDecay):
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"weight_decay must be a WeightDecay policy or a float, got {type(value).__name__}")
        return cls(float(value))

    def group_defaults(self) -> dict[str, Any]:
        """The param-group entries this policy stands for."""
        return {
            "weight_decay": float(self.weight_decay),
            "decoupled_weight_decay": self.weight_decouple,
            "weight_decay_absolute": self.absolute,
            "weight_decay_l1": self.l1,
            "weight_decay_policy": True,
        }


def apply_weight_decay(param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any], lr: float) -> torch.Tensor:
    """Apply the group's weight decay and return the gradient the optimizer should use.

    Decoupled forms change `param` in place and return `grad` unchanged. Coupled forms leave `param` alone
    and return a new tensor, so the caller's `p.grad` is never modified.
    """
    decay = group["weight_decay"]
    if decay == 0.0 or not group.get("weight_decay_policy", True):
        return grad
    direction = param.sign() if group["weight_decay_l1"] else param
    if not group["decoupled_weight_decay"]:
        return grad.add(direction, alpha=decay)
    scale = decay if group["weight_decay_absolute"] else lr * decay
    if group["weight_decay_l1"]:
        # add_ with -scale, not sub_ with scale (bitwise the same in eager): under torch.compile a tensor
        # alpha of add_ stays float64 in the kernel, one of sub_ arrives there in single precision.
        param.add_(direction, alpha=-scale)
    else:
        param.mul_(1.0 - scale)
    return grad
