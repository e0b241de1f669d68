r"""Float64 oracle loops for ADOPT, AdEMAMix, LAMB and Muon, in the style of `reference.py`.

Nothing here imports adaptopt or torch: every update is written again, slowly and obviously, over lists of
float64 numpy arrays, from the papers' equations and the facts of their authors' code (read for its order of
operations and constants; none of its text is copied). Each class keeps the interface of
`reference.Reference`: `step(params, grads)` updates the arrays of `params` in place, `t` is the 1-based number
of the update being taken, `lr * schedule(t)` is the learning rate of that update and `maximize` negates the
gradients first. Each optimizer's own weight decay is a field of its class, applied where its source applies
it; the shared `decay` of `Reference` is left at zero for ADOPT and LAMB (they raise otherwise) and, for
AdEMAMix and Muon, is applied before the optimizer's own update as in `Reference.step`.

Sources (each class's docstring says more):

* ADOPT: Taniguchi et al., NeurIPS 2024, arXiv:2411.02853; github iShohei220/adopt at commit
  6468572b4b3688a2f056b796b071da540568520e, `src/adopt/adopt.py`, `ADOPT` and `_single_tensor_adopt`.
* AdEMAMix: Pagliardini, Ablin & Grangier, arXiv:2409.03137; github apple/ml-ademamix at commit
  c3d73c09f1287e5c33b95189bb0aa7de0a5a7667, `pytorch/ademamix.py`, `AdEMAMix.step`,
  `linear_warmup_scheduler` and `linear_hl_warmup_scheduler`.
* LAMB: You et al., ICLR 2020, arXiv:1904.00962, Algorithm 2 with $\phi(x) = x$, with the conventions of NVIDIA
  apex `FusedLAMB` (github NVIDIA/apex at commit 6424da3b4faa6c8f062da4a48c424fff3f02d42d,
  `apex/optimizers/fused_lamb.py` `FusedLAMB.step` and `csrc/multi_tensor_lamb.cu`, `LAMBStage1Functor`,
  `LAMBStage2Functor` and `multi_tensor_lamb_cuda`).
* Muon: `torch.optim.Muon` of torch 2.13.0 (`torch/optim/_muon.py`, `_single_tensor_muon`,
  `_zeropower_via_newtonschulz` and `_adjust_lr`), itself after Keller Jordan's Muon; here the Newton-Schulz
  iteration runs in float64 where torch's runs in bfloat16.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from reference import Arrays, Reference

__all__ = [
    "ADOPT",
    "LAMB",
    "MUON_NS_COEFFICIENTS",
    "AdEMAMix",
    "Muon",
    "ademamix_alpha",
    "ademamix_beta3",
    "adopt_clip",
    "muon_adjusted_lr",
    "newton_schulz",
]


# --------------------------------------------------------------------------------------------------
# ADOPT


def adopt_clip(step: int) -> float:
    """The authors' default clipping bound: step ** 0.25."""
    return step**0.25


@dataclass
class ADOPT(Reference):
    r"""ADOPT, as the authors' `ADOPT` (iShohei220/adopt @ 6468572b4b3688a2f056b796b071da540568520e,
    `src/adopt/adopt.py`, `_single_tensor_adopt`); defaults as its constructor.

    The first update (t = 1) only sets $v \leftarrow g_1^2$ and leaves the parameter alone (a coupled weight
    decay is already in that $g_1$; a decoupled one is not applied). From t = 2 on, with $s = t - 1$ the
    authors' step count before it is incremented:

    1. decoupled weight decay: $\theta \leftarrow \theta (1 - \eta \lambda)$, with $\theta$ before the update;
    2. $n = g_t / \max(\sqrt{v_{t-1}}, \epsilon)$, clipped to $[-c, c]$ with $c$ = `clip_lambda(s)` (the first
       clipped update uses clip_lambda(1) = 1); no clipping when `clip_lambda` is None;
    3. $m_t = \beta_1 m_{t-1} + (1 - \beta_1) n$ (a lerp);
    4. $\theta \leftarrow \theta - \eta m_t$;
    5. $v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2$ (after the step: the step divides by $v_{t-1}$).

    Coupled weight decay ($g \leftarrow g + \lambda\theta$) comes after the negation of `maximize`, every step.
    No bias correction anywhere.

    `variant="pytorch_optimizer"` follows pytorch_optimizer 4.1.0's `ADOPT` instead (its `weight_decouple`
    is `decouple`; `fixed_decay=False`): the clip is `clip_lambda(t)` (2 ** 0.25 on the first clipped
    update), and its decoupled weight decay is applied on every step, the first one included.
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.9999)
    eps: float = 1e-6
    clip_lambda: Callable[[int], float] | None = adopt_clip
    weight_decay: float = 0.0
    decouple: bool = False
    variant: str = "authors"  # or "pytorch_optimizer"

    def initial_state(self, param: np.ndarray) -> dict[str, np.ndarray]:
        return {"m": np.zeros_like(param), "v": np.zeros_like(param)}

    def step(self, params: Arrays, grads: Arrays) -> None:
        if self.decay.coefficient != 0.0:
            raise ValueError("ADOPT takes its weight decay from weight_decay and decouple, not decay")
        if self.variant not in ("authors", "pytorch_optimizer"):
            raise ValueError(f"unknown ADOPT variant {self.variant!r}")
        self.t += 1
        lr_t = self.lr * self.schedule(self.t)
        if not self.state:
            self.state = [self.initial_state(p) for p in params]
        for param, grad, state in zip(params, grads, self.state, strict=True):
            g = -grad if self.maximize else grad.copy()
            self.update(param, g, state, lr_t)

    def update(self, param: np.ndarray, g: np.ndarray, state: dict[str, np.ndarray], lr_t: float) -> None:
        b1, b2 = self.betas
        wd = self.weight_decay
        authors = self.variant == "authors"
        if wd != 0.0 and not self.decouple:
            g = g + wd * param
        if wd != 0.0 and self.decouple and not authors:
            param[...] = param * (1.0 - lr_t * wd)
        if self.t == 1:
            state["v"] = state["v"] + g * g
            return
        if wd != 0.0 and self.decouple and authors:
            param[...] = param * (1.0 - lr_t * wd)
        normed = g / np.maximum(np.sqrt(state["v"]), self.eps)
        if self.clip_lambda is not None:
            bound = self.clip_lambda(self.t - 1 if authors else self.t)
            normed = np.clip(normed, -bound, bound)
        state["m"] = b1 * state["m"] + (1.0 - b1) * normed
        param[...] = param - lr_t * state["m"]
        state["v"] = b2 * state["v"] + (1.0 - b2) * g * g


# --------------------------------------------------------------------------------------------------
# AdEMAMix


def ademamix_alpha(t: int, alpha_end: float, warmup: int | None, alpha_start: float = 0.0) -> float:
    """The authors' linear alpha warm-up: from alpha_start towards alpha_end while t < warmup, then alpha_end."""
    if warmup is None or t >= warmup:
        return alpha_end
    a = t / warmup
    return (1.0 - a) * alpha_start + a * alpha_end


def ademamix_beta3(t: int, beta_end: float, beta_start: float, warmup: int | None, eps: float = 1e-8) -> float:
    r"""The authors' beta3 warm-up, linear in the half-life: while t < warmup,
    $\beta_3 = f^{-1}((1 - a) f(\beta_{start}) + a f(\beta_{end}))$ with $a = t / w$,
    $f(\beta) = \ln 0.5 / \ln(\beta + \epsilon) - 1$ and $f^{-1}(h) = 0.5^{1 / (h + 1)}$; then beta_end.

    With eps = 0 this is the paper's closed form
    $\exp(\ln\beta_s \ln\beta_e / ((1 - a)\ln\beta_e + a \ln\beta_s))$, which pytorch_optimizer computes.
    """
    if warmup is None or t >= warmup:
        return beta_end

    def half_life(beta: float) -> float:
        return math.log(0.5) / math.log(beta + eps) - 1.0

    a = t / warmup
    h = (1.0 - a) * half_life(beta_start) + a * half_life(beta_end)
    return math.pow(0.5, 1.0 / (h + 1.0))


@dataclass
class AdEMAMix(Reference):
    r"""AdEMAMix, as the authors' PyTorch `AdEMAMix` (apple/ml-ademamix @
    c3d73c09f1287e5c33b95189bb0aa7de0a5a7667, `pytorch/ademamix.py`); defaults as its constructor.

    At step t (1-based), with $\alpha_t$ = `ademamix_alpha(t, alpha, alpha_warmup)` (from 0) and
    $\beta_{3,t}$ = `ademamix_beta3(t, beta3, beta1, beta3_warmup)` (from $\beta_1$):

    * $m_1 = \beta_1 m_1 + (1 - \beta_1) g$ (just $g$, no state, when $\beta_1 = 0$);
      $m_2 = \beta_{3,t} m_2 + (1 - \beta_{3,t}) g$; $v = \beta_2 v + (1 - \beta_2) g^2$;
    * $u = (m_1 / (1 - \beta_1^t) + \alpha_t m_2) / (\sqrt{v} / \sqrt{1 - \beta_2^t} + \epsilon)
      + \lambda \theta$;
    * $\theta \leftarrow \theta - \eta u$.

    The slow EMA $m_2$ is not bias-corrected. The weight decay is in the update, so it is scaled by the
    learning rate (AdamW's decoupled form, with $\theta$ before the step). `half_life_eps` is the 1e-8 that
    the authors add to beta inside the logarithm of the beta3 warm-up; 0 gives pytorch_optimizer's schedule.
    """

    lr: float = 1e-3
    betas: tuple[float, float, float] = (0.9, 0.999, 0.9999)
    alpha: float = 2.0
    beta3_warmup: int | None = None
    alpha_warmup: int | None = None
    eps: float = 1e-8
    weight_decay: float = 0.0
    half_life_eps: float = 1e-8

    def initial_state(self, param: np.ndarray) -> dict[str, np.ndarray]:
        return {"m_fast": np.zeros_like(param), "m_slow": np.zeros_like(param), "v": np.zeros_like(param)}

    def update(self, param: np.ndarray, g: np.ndarray, state: dict[str, np.ndarray], lr_t: float) -> None:
        b1, b2, b3_end = self.betas
        t = self.t
        alpha_t = ademamix_alpha(t, self.alpha, self.alpha_warmup)
        b3 = ademamix_beta3(t, b3_end, b1, self.beta3_warmup, self.half_life_eps)
        if b1 != 0.0:
            state["m_fast"] = b1 * state["m_fast"] + (1.0 - b1) * g
            m_fast = state["m_fast"]
        else:
            m_fast = g
        state["m_slow"] = b3 * state["m_slow"] + (1.0 - b3) * g
        state["v"] = b2 * state["v"] + (1.0 - b2) * g * g
        denom = np.sqrt(state["v"]) / math.sqrt(1.0 - b2**t) + self.eps
        u = (m_fast / (1.0 - b1**t) + alpha_t * state["m_slow"]) / denom
        u = u + self.weight_decay * param
        param[...] = param - lr_t * u


# --------------------------------------------------------------------------------------------------
# LAMB


@dataclass
class LAMB(Reference):
    r"""LAMB (You et al., ICLR 2020, Algorithm 2, $\phi(x) = x$) as NVIDIA apex `FusedLAMB` computes it
    (NVIDIA/apex @ 6424da3b4faa6c8f062da4a48c424fff3f02d42d, `apex/optimizers/fused_lamb.py` and
    `csrc/multi_tensor_lamb.cu`); defaults as `FusedLAMB`'s constructor.

    Each step:

    1. the global norm $N = \sqrt{\sum_i \lVert g_i \rVert^2}$ over every parameter's raw gradient; when
       $N >$ `max_grad_norm` every gradient is divided by $N / $ `max_grad_norm` (apex's clipping: with
       `max_grad_norm` 0 and $N > 0$ every gradient becomes 0); `max_grad_norm=None` turns clipping off
       (apex has no such value);
    2. per parameter, with $\hat g$ the clipped gradient and $\beta_3 = 1 - \beta_1$ (`grad_averaging`) or 1:
       when `adam_w_mode` is False, $\hat g \leftarrow \hat g + \lambda\theta$ (L2 on the clipped gradient);
       $m = \beta_1 m + \beta_3 \hat g$, $v = \beta_2 v + (1 - \beta_2) \hat g^2$;
       $u = (m / c_1) / (\sqrt{v / c_2} + \epsilon)$ with $c_k = 1 - \beta_k^t$ (1 without
       `bias_correction`), and when `adam_w_mode` $u \leftarrow u + \lambda\theta$;
    3. trust ratio, with $\theta$ before the step: $r = \lVert\theta\rVert / \lVert u\rVert$, or 1 when either
       norm is 0; apex applies it only when $\lambda \ne 0$ or `use_nvlamb` (otherwise $r = 1$: with
       weight_decay 0 and use_nvlamb False apex's LAMB is Adam); the paper's Algorithm 2 always applies it,
       which is `use_nvlamb=True`;
    4. $\theta \leftarrow \theta - \eta r u$.
    """

    lr: float = 1e-3
    bias_correction: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.01
    adam_w_mode: bool = True
    grad_averaging: bool = True
    max_grad_norm: float | None = 1.0
    use_nvlamb: bool = False

    def initial_state(self, param: np.ndarray) -> dict[str, np.ndarray]:
        return {"m": np.zeros_like(param), "v": np.zeros_like(param)}

    def clip(self, grads: Arrays) -> Arrays:
        """apex's global gradient-norm clipping."""
        norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads))
        if self.max_grad_norm is None or not norm > self.max_grad_norm:
            return grads
        if self.max_grad_norm == 0.0:
            return [np.zeros_like(g) for g in grads]
        factor = norm / self.max_grad_norm
        return [g / factor for g in grads]

    def step(self, params: Arrays, grads: Arrays) -> None:
        if self.decay.coefficient != 0.0:
            raise ValueError("LAMB takes its weight decay from weight_decay and adam_w_mode, not decay")
        self.t += 1
        lr_t = self.lr * self.schedule(self.t)
        if not self.state:
            self.state = [self.initial_state(p) for p in params]
        signed = [-g if self.maximize else g.copy() for g in grads]
        for param, g, state in zip(params, self.clip(signed), self.state, strict=True):
            self.update(param, g, state, lr_t)

    def update(self, param: np.ndarray, g: np.ndarray, state: dict[str, np.ndarray], lr_t: float) -> None:
        b1, b2 = self.betas
        wd = self.weight_decay
        c1 = 1.0 - b1**self.t if self.bias_correction else 1.0
        c2 = 1.0 - b2**self.t if self.bias_correction else 1.0
        b3 = 1.0 - b1 if self.grad_averaging else 1.0
        if not self.adam_w_mode:
            g = g + wd * param
        state["m"] = b1 * state["m"] + b3 * g
        state["v"] = b2 * state["v"] + (1.0 - b2) * g * g
        u = (state["m"] / c1) / (np.sqrt(state["v"] / c2) + self.eps)
        if self.adam_w_mode:
            u = u + wd * param
        ratio = 1.0
        if self.use_nvlamb or wd != 0.0:
            param_norm = float(np.linalg.norm(param))
            update_norm = float(np.linalg.norm(u))
            if param_norm != 0.0 and update_norm != 0.0:
                ratio = param_norm / update_norm
        param[...] = param - lr_t * ratio * u


# --------------------------------------------------------------------------------------------------
# Muon

MUON_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: np.ndarray, coefficients: tuple[float, float, float], steps: int, eps: float) -> np.ndarray:
    r"""torch's quintic Newton-Schulz orthogonalization, in float64: transpose when rows > columns, divide by
    $\max(\lVert X\rVert_F, \epsilon)$, then `steps` times $A = X X^\top$, $B = b A + c A^2$, $X = a X + B X$;
    transpose back."""
    if steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if g.ndim != 2:
        raise ValueError("Input tensor gradient must be a 2D matrix")
    if len(coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")
    a, b, c = coefficients
    tall = g.shape[0] > g.shape[1]
    x = np.array(g.T if tall else g, dtype=np.float64)
    x = x / max(float(np.linalg.norm(x)), eps)
    for _ in range(steps):
        gram = x @ x.T
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    return x.T if tall else x


def muon_adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: tuple[int, ...]) -> float:
    """torch's `_adjust_lr`: "original" (or None) sqrt(max(1, A/B)), "match_rms_adamw" 0.2 sqrt(max(A, B))."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")


@dataclass
class Muon(Reference):
    r"""Muon as `torch.optim.Muon` of torch 2.13.0 (`torch/optim/_muon.py`); defaults as its constructor.
    The fallback oracle where torch lacks `torch.optim.Muon` (added in torch 2.9).

    For each 2-D parameter: $B = \mu B + (1 - \mu) g$ (a lerp: an EMA, not torch's documented
    $\mu B + g$); the matrix orthogonalized is $(1 - \mu) g + \mu B$ with `nesterov`, else $B$;
    $O$ = `newton_schulz` of it; then $\theta \leftarrow \theta (1 - \eta\lambda)$ with the unadjusted
    $\eta$, and $\theta \leftarrow \theta - \eta' O$ with $\eta'$ = `muon_adjusted_lr(eta, adjust_lr_fn,
    shape)`. torch runs the iteration in bfloat16 and adds the bfloat16 $O$ to the parameter, so against it
    this float64 loop agrees to bfloat16 precision only.
    """

    lr: float = 1e-3
    weight_decay: float = 0.1
    momentum: float = 0.95
    nesterov: bool = True
    ns_coefficients: tuple[float, float, float] = MUON_NS_COEFFICIENTS
    eps: float = 1e-7
    ns_steps: int = 5
    adjust_lr_fn: str | None = None

    def initial_state(self, param: np.ndarray) -> dict[str, np.ndarray]:
        if param.ndim != 2:
            raise ValueError(f"Muon only supports 2D parameters whereas we found a parameter with size: {param.shape}")
        return {"momentum_buffer": np.zeros_like(param)}

    def update(self, param: np.ndarray, g: np.ndarray, state: dict[str, np.ndarray], lr_t: float) -> None:
        mu = self.momentum
        state["momentum_buffer"] = mu * state["momentum_buffer"] + (1.0 - mu) * g
        buf = state["momentum_buffer"]
        direction = (1.0 - mu) * g + mu * buf if self.nesterov else buf
        ortho = newton_schulz(direction, self.ns_coefficients, self.ns_steps, self.eps)
        adjusted = muon_adjusted_lr(lr_t, self.adjust_lr_fn, param.shape)
        param[...] = param * (1.0 - lr_t * self.weight_decay)
        param[...] = param - adjusted * ortho
