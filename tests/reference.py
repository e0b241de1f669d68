r"""Plain float64 reference implementations, written from the papers, used as oracles by the tests.

Nothing here imports adaptopt: every update is written again, slowly and obviously, from the papers'
equations, over lists of float64 numpy arrays. Each optimizer is a class with `step(params, grads)`, which
updates the arrays of `params` in place, one parameter at a time. `t` is the 1-based number of the update
being taken and `schedule(t)` multiplies the base learning rate (1 when there is no schedule).

Sources:

* Adam: Kingma & Ba, ICLR 2015, Algorithm 1 (bias-corrected $\hat m_t$, $\hat v_t$) and the last paragraph
  of §2 (the "more efficient" form with $\alpha_t = \alpha \sqrt{1 - \beta_2^t} / (1 - \beta_1^t)$ and
  $\hat\epsilon$ added to $\sqrt{v_t}$).
* AMSGrad: Reddi, Kale & Kumar, ICLR 2018, Algorithm 2: the running maximum of $v_t$. As in torch.optim,
  the maximum is of the raw $v_t$ and is divided by the current $1 - \beta_2^t$.
* RAdam: Liu et al., ICLR 2020, Algorithm 2: $\rho_\infty$, $\rho_t$, $r_t$, adaptive step while
  $\rho_t > 5$ (torch.optim and the official code's threshold), otherwise un-adapted momentum.
* AdaBelief: Zhuang et al., NeurIPS 2020, Algorithm 2, with the conventions of the official
  `adabelief-pytorch` 0.2.x: $\epsilon$ is added to the stored $s_t$ every step, rectification as RAdam
  with the threshold $\rho_t \ge 5$.
* Sophia-G: Liu et al., ICLR 2024, Algorithm 3: $h$ is an EMA of $B \hat g \odot \hat g$, the update is
  $\mathrm{sign}(m_t) \min(|m_t| / (\rho (h_t + \epsilon)), 1)$ times $\eta$.
* Schedules: linear warm-up; warm-up then half cosine (Loshchilov & Hutter, SGDR, ICLR 2017) to a floor
  of 10%; Noam (Vaswani et al., NeurIPS 2017, §5.3).
* Weight decay: coupled L2 (added to the gradient), decoupled (Loshchilov & Hutter, ICLR 2019: scaled by
  the scheduled learning rate), absolute decoupled ($\theta \leftarrow (1 - \lambda)\theta$), and L1,
  coupled (subgradient $\lambda\,\mathrm{sign}(\theta)$ added to the gradient) or decoupled.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

Arrays = list[np.ndarray]
Schedule = Callable[[int], float]

__all__ = [
    "AdaBelief",
    "Adam",
    "Arrays",
    "Decay",
    "RAdam",
    "Reference",
    "Sophia",
    "constant",
    "cosine_with_warmup",
    "linear_warmup",
    "noam",
]


# --------------------------------------------------------------------------------------------------
# Schedules: multipliers of the base learning rate for the t-th update (t = 1, 2, ...)


def constant(t: int) -> float:
    return 1.0


def linear_warmup(t: int, warmup: int) -> float:
    """t / w during the first w updates, then 1."""
    if warmup == 0:
        return 1.0
    return min(1.0, t / warmup)


def cosine_with_warmup(t: int, warmup: int, total_steps: float) -> float:
    """t / w during warm-up, then a half cosine from 1 at t = w to 0 at t = T, never below 0.1."""
    if t < warmup:
        return t / warmup
    fraction_done = (t - warmup) / (total_steps - warmup)
    return max(0.1, (1.0 + math.cos(math.pi * fraction_done)) / 2.0)


def noam(t: int, warmup: int, d_model: int) -> float:
    """d^-1/2 * min(t^-1/2, t * w^-3/2); without warm-up just d^-1/2 * t^-1/2."""
    if warmup == 0:
        return d_model**-0.5 * t**-0.5
    return d_model**-0.5 * min(t**-0.5, t * warmup**-1.5)


# --------------------------------------------------------------------------------------------------
# Weight decay


@dataclass(frozen=True)
class Decay:
    """A weight decay of strength `coefficient` in one of the modes below."""

    coefficient: float = 0.0
    mode: str = "decoupled"  # "coupled", "decoupled", "absolute", "l1_coupled" or "l1_decoupled"

    def apply(self, param: np.ndarray, grad: np.ndarray, lr: float) -> np.ndarray:
        """Decay `param` in place (decoupled modes) and return the gradient the optimizer should use."""
        w = self.coefficient
        if self.mode == "coupled":
            return grad + w * param
        if self.mode == "l1_coupled":
            return grad + w * np.sign(param)
        if self.mode == "decoupled":
            param[...] = param * (1.0 - lr * w)
        elif self.mode == "absolute":
            param[...] = param * (1.0 - w)
        elif self.mode == "l1_decoupled":
            param[...] = param - lr * w * np.sign(param)
        else:
            raise ValueError(f"unknown weight decay mode {self.mode!r}")
        return grad


# --------------------------------------------------------------------------------------------------
# Optimizers


@dataclass
class Reference:
    """What every reference optimizer shares: the step count, the schedule, maximize and weight decay."""

    lr: float
    decay: Decay = Decay()
    schedule: Schedule = constant
    maximize: bool = False
    t: int = 0
    state: list[dict[str, np.ndarray]] = field(default_factory=list)

    def step(self, params: Arrays, grads: Arrays) -> None:
        self.t += 1
        lr_t = self.lr * self.schedule(self.t)
        if not self.state:
            self.state = [self.initial_state(p) for p in params]
        for param, grad, state in zip(params, grads, self.state, strict=True):
            g = -grad if self.maximize else grad.copy()
            g = self.decay.apply(param, g, lr_t)
            self.update(param, g, state, lr_t)

    def initial_state(self, param: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def update(self, param: np.ndarray, g: np.ndarray, state: dict[str, np.ndarray], lr_t: float) -> None:
        raise NotImplementedError


@dataclass
class Adam(Reference):
    """Adam; `eps_hat=True` is the paper's efficient form, `amsgrad=True` AMSGrad."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    eps_hat: bool = False
    amsgrad: bool = False

    def initial_state(self, param: np.ndarray) -> dict[str, np.ndarray]:
        return {"m": np.zeros_like(param), "v": np.zeros_like(param), "v_max": np.zeros_like(param)}

    def moments(self, g: np.ndarray, state: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Update m_t and v_t; return m_t and the second moment the step divides by."""
        b1, b2 = self.betas
        state["m"] = b1 * state["m"] + (1.0 - b1) * g
        state["v"] = b2 * state["v"] + (1.0 - b2) * g * g
        if self.amsgrad:
            state["v_max"] = np.maximum(state["v_max"], state["v"])
            return state["m"], state["v_max"]
        return state["m"], state["v"]

    def adaptive_step(self, m: np.ndarray, v: np.ndarray, lr: float) -> np.ndarray:
        b1, b2 = self.betas
        t = self.t
        if self.eps_hat:
            alpha_t = lr * math.sqrt(1.0 - b2**t) / (1.0 - b1**t)
            return alpha_t * m / (np.sqrt(v) + self.eps)
        m_hat = m / (1.0 - b1**t)
        v_hat = v / (1.0 - b2**t)
        return lr * m_hat / (np.sqrt(v_hat) + self.eps)

    def update(self, param: np.ndarray, g: np.ndarray, state: dict[str, np.ndarray], lr_t: float) -> None:
        m, v = self.moments(g, state)
        param[...] = param - self.adaptive_step(m, v, lr_t)


def rectifier(beta2: float, t: int) -> tuple[float, float]:
    """RAdam's (rho_t, r_t); r_t is NaN where it is undefined (rho_t <= 4)."""
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * t * beta2**t / (1.0 - beta2**t)
    if rho_t <= 4.0:
        return rho_t, math.nan
    r_t = math.sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
    return rho_t, r_t


@dataclass
class RAdam(Adam):
    """RAdam: the adaptive step times r_t while rho_t > 5, else bias-corrected momentum (or nothing)."""

    degenerate_to_sgd: bool = True

    def update(self, param: np.ndarray, g: np.ndarray, state: dict[str, np.ndarray], lr_t: float) -> None:
        m, v = self.moments(g, state)
        rho_t, r_t = rectifier(self.betas[1], self.t)
        if rho_t > 5.0:
            param[...] = param - self.adaptive_step(m, v, lr_t * r_t)
        elif self.degenerate_to_sgd:
            param[...] = param - lr_t * m / (1.0 - self.betas[0] ** self.t)


@dataclass
class AdaBelief(Reference):
    """AdaBelief, official 0.2.x conventions (eps added to s_t each step; rectified while rho_t >= 5)."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-16
    amsgrad: bool = False
    rectify: bool = True
    degenerate_to_sgd: bool = True

    def initial_state(self, param: np.ndarray) -> dict[str, np.ndarray]:
        return {"m": np.zeros_like(param), "s": np.zeros_like(param), "s_max": np.zeros_like(param)}

    def update(self, param: np.ndarray, g: np.ndarray, state: dict[str, np.ndarray], lr_t: float) -> None:
        b1, b2 = self.betas
        t = self.t
        state["m"] = b1 * state["m"] + (1.0 - b1) * g
        m = state["m"]
        state["s"] = b2 * state["s"] + (1.0 - b2) * (g - m) ** 2 + self.eps
        s = state["s"]
        if self.amsgrad:
            state["s_max"] = np.maximum(state["s_max"], s)
            s = state["s_max"]
        if not self.rectify:
            m_hat = m / (1.0 - b1**t)
            s_hat = s / (1.0 - b2**t)
            param[...] = param - lr_t * m_hat / (np.sqrt(s_hat) + self.eps)
            return
        rho_t, r_t = rectifier(b2, t)
        if rho_t >= 5.0:
            alpha_t = lr_t * r_t * math.sqrt(1.0 - b2**t) / (1.0 - b1**t)
            param[...] = param - alpha_t * m / (np.sqrt(s) + self.eps)
        elif self.degenerate_to_sgd:
            param[...] = param - lr_t * m / (1.0 - b1**t)


@dataclass
class Sophia(Reference):
    """Sophia-G: clipped sign-of-momentum steps scaled by an EMA of the Gauss-Newton-Bartlett estimate."""

    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-12
    rho: float = 0.03

    def initial_state(self, param: np.ndarray) -> dict[str, np.ndarray]:
        return {"m": np.zeros_like(param), "h": np.zeros_like(param)}

    def update(self, param: np.ndarray, g: np.ndarray, state: dict[str, np.ndarray], lr_t: float) -> None:
        b1 = self.betas[0]
        state["m"] = b1 * state["m"] + (1.0 - b1) * g
        m = state["m"]
        ratio = np.minimum(np.abs(m) / (self.rho * (state["h"] + self.eps)), 1.0)
        param[...] = param - lr_t * np.sign(m) * ratio

    def update_hessian(self, params: Arrays, sampled_grads: Arrays, batch_size: int) -> None:
        """h = b2 h + (1 - b2) B g*g, with g the grads of the loss on labels sampled from the model."""
        if not self.state:
            self.state = [self.initial_state(p) for p in params]
        b2 = self.betas[1]
        for g, state in zip(sampled_grads, self.state, strict=True):
            state["h"] = b2 * state["h"] + (1.0 - b2) * batch_size * g * g
