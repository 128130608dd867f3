"""Gradient clipping and the non-finite guard, at every ZeRO stage and precision.

DeepSpeed moves gradients out of ``p.grad`` as soon as they are reduced (ZeRO 1–2 keep this rank's
partition in flat buffers, ZeRO 3 partitions the parameters too, bf16 keeps fp32 accumulators),
so nothing here reads ``p.grad`` directly:

- **Adaptive clipping** (Brock et al. 2021, as DAPS uses at 1.0) needs whole rows of a gradient.
  It reads each parameter's full averaged gradient through DeepSpeed's public
  ``safe_get_full_grad`` (free at stage 0; one all-reduce per parameter at stages 1–3) and writes
  the clipped gradient back with ``safe_set_full_grad``; every rank computes the same scales.
- **Global-norm clipping** is DeepSpeed's own ``gradient_clipping``, computed on the partitions.
- **The non-finite guard** is :class:`GuardedAdamW`: the optimiser that DeepSpeed steps. Its
  ``step`` sees the gradients it is about to apply (the full gradient at stage 0, this rank's
  partition otherwise), and every rank agrees through one all-reduce whether to apply them.
  ZeRO and bf16 optimisers also refuse non-finite gradients themselves before calling it; either
  way the step is skipped on every rank and :attr:`GuardedAdamW.applied` says so.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def _unitwise_norm(t: Tensor) -> Tensor:
    """Norm per output unit: rows of a matrix, filters of a conv, the whole of a vector/scalar."""
    if t.ndim <= 1:
        return torch.linalg.vector_norm(t)
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.ndim)), keepdim=True)


def _full_param(p: torch.nn.Parameter) -> Tensor:
    """The whole fp32 value of a parameter (gathered under ZeRO-3)."""
    if hasattr(p, "ds_id"):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(p)
    return p.detach().float()


def _in_p_grad(p: torch.nn.Parameter) -> bool:
    """The averaged gradient is ``p.grad`` itself (ZeRO 0 fp32), not a DeepSpeed partition."""
    return p.grad is not None and not hasattr(p, "_hp_mapping") and not hasattr(p, "ds_id")


def _full_grad(p: torch.nn.Parameter) -> Tensor | None:
    if _in_p_grad(p):
        return p.grad
    from deepspeed.utils import safe_get_full_grad

    return safe_get_full_grad(p)


@torch.no_grad()
def agc_scale(param: Tensor, grad: Tensor, clip: float, eps: float = 1e-3) -> Tensor:
    """Per-unit factor (<= 1) so that ||g_unit|| <= clip * max(||w_unit||, eps)."""
    max_norm = _unitwise_norm(param.float()).clamp_min(eps) * clip
    return (max_norm / _unitwise_norm(grad.float()).clamp_min(1e-6)).clamp(max=1.0)


@torch.no_grad()
def adaptive_clip_(params: Iterable[torch.nn.Parameter], clip: float, eps: float = 1e-3) -> ClippedFinite | None:
    """Adaptive gradient clipping of the averaged gradients, in place, at any ZeRO stage.

    Must be called after the last backward of an optimiser step and before ``engine.step()``.
    Where every gradient is ``p.grad`` (ZeRO 0, fp32) it returns what the norms it took say about
    the clipped gradients' finiteness (:class:`ClippedFinite`, for the guard), else None."""
    params = list(params)
    plain = [p for p in params if _in_p_grad(p)]
    finite = _clip_plain(plain, clip, eps) if plain else None
    for p in params:  # gradients DeepSpeed keeps (ZeRO 1-3, bf16): one parameter at a time
        grad = None if _in_p_grad(p) else _full_grad(p)
        if grad is None:
            continue
        finite = None  # the guard sees these as DeepSpeed's partitions, not as p.grad
        scale = agc_scale(_full_param(p), grad, clip, eps)
        if grad is p.grad:
            p.grad.mul_(scale.to(p.grad.dtype))
        else:
            from deepspeed.utils import safe_set_full_grad

            safe_set_full_grad(p, (grad.float() * scale).to(grad.dtype))
    return finite


def _clip_plain(params: list[torch.nn.Parameter], clip: float, eps: float) -> ClippedFinite:
    """AGC of gradients held in ``p.grad`` (ZeRO 0): the per-unit norms of all parameters are
    computed one matrix at a time (vectors and scalars, whose unit is the whole tensor, in one
    fused norm over all of them), compared and clamped in one go, and every gradient scaled in
    one fused multiply: a handful of ops in all rather than a handful per parameter. (Norms
    written into one preallocated buffer with ``out=`` instead of concatenated were slower.)"""
    flat = [p for p in params if p.ndim <= 1]
    mats = [p for p in params if p.ndim > 1]
    rows = [p.shape[0] for p in mats]
    norm = torch.linalg.vector_norm
    w, g = [], []
    if flat:
        w.append(torch.stack(torch._foreach_norm([p.detach().float() for p in flat])))
        g.append(torch.stack(torch._foreach_norm([p.grad.float() for p in flat])))
    w += [norm(p.detach().float().reshape(r, -1), dim=1) for p, r in zip(mats, rows)]
    g += [norm(p.grad.float().reshape(r, -1), dim=1) for p, r in zip(mats, rows)]
    grad_norms = torch.cat(g)
    scales = (torch.cat(w).clamp_min(eps) * clip / grad_norms.clamp_min(1e-6)).clamp(max=1.0)
    flat_scales, *mat_scales = scales.split([len(flat)] + rows)
    factors = [*flat_scales.unbind(), *(s.view((r,) + (1,) * (p.ndim - 1)) for s, r, p in zip(mat_scales, rows, mats))]
    grads = [p.grad for p in flat + mats]
    torch._foreach_mul_(grads, [f.to(g.dtype) for f, g in zip(factors, grads)])
    return ClippedFinite(grads, grad_norms, scales)


class ClippedFinite:
    """What adaptive clipping's norms say about the finiteness of the gradients it scaled, so the
    guard need not take their norms again. ``certain`` (a bool tensor, left on the device) is
    true only where the guard's own test, ``isfinite(get_total_norm(grads))`` on the clipped
    gradients, is true: every unit's norm ``n`` and scale ``s`` finite (so every element of
    ``g * s`` is), and ``‖s·n‖`` below 1e18, far from the 1.8e19 at which float32's sum of
    squares overflows (the clipped gradients' true norm is that within float rounding). Where
    it is false the guard takes the norm as before: that also decides the cases it cannot, such
    as a unit whose norm overflowed while its elements are finite (its scale is 0, so its
    clipped gradient is 0)."""

    def __init__(self, grads: list[Tensor], grad_norms: Tensor, scales: Tensor) -> None:
        self.grads = grads
        self.certain = torch.isfinite(grad_norms).all() & torch.isfinite(scales).all() & (
            torch.linalg.vector_norm(scales * grad_norms) < 1e18
        )


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that applies a step only when every rank's loss and gradients are finite.

    The training step sets :attr:`loss_ok` (this rank's losses were finite: a bool, or a bool
    tensor on the device) before ``engine.step()`` and reads :attr:`applied` afterwards.
    ``applied`` stays False when DeepSpeed's own overflow check skipped the step before reaching
    this optimiser."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.loss_ok: bool | Tensor = True
        self.applied = False
        # DeepSpeed reads ``overflow`` of the optimiser it steps (this one at stage 0 fp32, its
        # ZeRO/bf16 wrapper otherwise: ``outer``) and then neither counts the step nor advances the
        # learning-rate schedule.
        self.overflow = False
        self.outer: object | None = None
        # Set by the training step after adaptive clipping, read (and cleared) by the next guard.
        self.clipped: ClippedFinite | None = None

    def grads_finite(self) -> Tensor:
        """Whether this rank's gradients are all finite, as a bool tensor left on the device: one
        fused norm over every gradient (a NaN or an infinity makes it non-finite; so does a norm
        past the float range, |g| ~ 1e19 in fp32). On CPU, where reading a flag costs nothing,
        :attr:`clipped` answers instead when it covers these gradients and is certain."""
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        clipped, self.clipped = self.clipped, None
        if not grads:
            return torch.ones((), dtype=torch.bool, device=self._device())
        if (clipped is not None and not clipped.certain.is_cuda and len(clipped.grads) == len(grads)
                and {id(g) for g in clipped.grads} == {id(g) for g in grads} and bool(clipped.certain)):
            return clipped.certain
        return torch.isfinite(torch.nn.utils.get_total_norm(grads))

    def _device(self) -> torch.device:
        return next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))

    def gradients_ok(self) -> bool:
        """Every rank's loss and gradients are finite; the same answer on all ranks. One
        all-reduce, and its read is the step's one host sync (``loss_ok`` may be a device flag)."""
        from ngkit.engine.distributed import all_ranks_agree

        return all(all_ranks_agree(self.loss_ok, self.grads_finite(), device=self._device()))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        ok = self.gradients_ok()
        self.overflow = not ok
        if not ok:
            if self.outer is not None:
                self.outer.overflow = True
            return None
        self.applied = True
        return super().step(closure)
