"""Independent references for the tests: Opacus' microbatch per-sample gradients, clipped and summed by hand."""

from __future__ import annotations

from collections.abc import Callable

import torch
from opacus.utils.per_sample_gradients_utils import compute_microbatch_grad_sample
from torch import nn

from opacus_fast.clipping import ClipBound
from opacus_fast.engine import BKEngine

RTOL = 1e-6  # relative error allowed against the references, in float64


def per_sample_norms(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """Flat per-example norms over all parameters of Opacus' per-sample gradient dict."""
    return torch.stack([g.reshape(g.shape[0], -1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()


def reference_clipped_sum(
    model: nn.Module, x: torch.Tensor, max_grad_norm: float, loss_reduction: str = "sum"
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``{name: sum_i min(1, C/(||G_i||+1e-6)) G_i}`` and the per-example norms, from one-example backward passes."""
    grads = compute_microbatch_grad_sample(x, model, loss_reduction=loss_reduction)
    return clip_and_sum(grads, max_grad_norm), per_sample_norms(grads)


def clip_and_sum(grads: dict[str, torch.Tensor], max_grad_norm: float) -> dict[str, torch.Tensor]:
    """``{name: sum_i min(1, C/(||G_i||+1e-6)) G_i}`` from Opacus' per-sample gradient dict."""
    factor = (max_grad_norm / (per_sample_norms(grads) + 1e-6)).clamp(max=1.0)
    return {n: torch.einsum("b,b...->...", factor, g) for n, g in grads.items()}


def loop_clipped_sum(
    model: nn.Module, x: torch.Tensor, max_grad_norm: float, loss_reduction: str = "sum",
    loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Second reference: one ``torch.autograd.grad`` per example over the trainable parameters only (the loss of
    an example's output is ``loss``, by default the L1 loss)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    loss = loss or (lambda out: l1_loss(out, loss_reduction))
    per_example = [
        [torch.zeros_like(p) if g is None else g
         for p, g in zip(params.values(), torch.autograd.grad(loss(model(x[i:i + 1])), list(params.values()),
                                                              allow_unused=True))]
        for i in range(x.shape[0])
    ]
    out = dict.fromkeys(params, 0)
    for grads in per_example:
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        factor = (max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        for n, g in zip(params, grads):
            out[n] = out[n] + factor * g
    return out


def l1_loss(out: torch.Tensor, reduction: str) -> torch.Tensor:
    """The loss Opacus' oracle uses: L1 distance of the output to zero."""
    return nn.L1Loss(reduction=reduction)(out, torch.zeros_like(out))


def bk_clipped_sum(
    model: nn.Module, x: torch.Tensor, max_grad_norm: float, loss_reduction: str = "sum"
) -> dict[str, torch.Tensor]:
    """The BK engine's clipped sum on the same batch and loss (engine attached, one backward, then detached)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    engine = BKEngine(model, bound=ClipBound(max_grad_norm), loss_reduction=loss_reduction)
    try:
        l1_loss(model(x), loss_reduction).backward()
        for n, p in params.items():
            assert p.grad is None, f"autograd wrote an ordinary gradient into {n}"
        return {n: p.summed_grad for n, p in params.items()}
    finally:
        engine.detach()
        for p in params.values():
            p.summed_grad = None


def median_bound(norms: torch.Tensor) -> float:
    """A clip bound strictly between the smallest and largest per-example norm: some examples clipped, some not."""
    s = norms.sort().values
    mid = len(s) // 2
    return float((s[mid - 1] + s[mid]) / 2)


def assert_exact(model: nn.Module, x: torch.Tensor, loss_reduction: str = "sum") -> None:
    """Choose C so that some examples are clipped and some are not, then compare every parameter's clipped sum
    from the BK engine with the microbatch oracle's."""
    grads = compute_microbatch_grad_sample(x, model, loss_reduction=loss_reduction)
    norms = per_sample_norms(grads)
    bound = median_bound(norms)
    assert (norms > bound).any() and (norms < bound).any()
    expected = clip_and_sum(grads, bound)
    got = bk_clipped_sum(model, x, bound, loss_reduction)
    assert set(got) == set(expected)
    total = torch.sqrt(sum(r.pow(2).sum() for r in expected.values()))
    for name, ref in expected.items():
        # a parameter whose true gradient vanishes (a bias before a norm layer) is compared to the total's scale
        err = (got[name] - ref).norm() / torch.maximum(ref.norm(), 1e-6 * total)
        assert err <= RTOL, f"{name}: relative error {err:.2e}"
