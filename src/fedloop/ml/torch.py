"""PyTorch adapter: modules to and from Weights, and the local-training terms of FedProx,
SCAFFOLD and FedCurv.

Representation of a module as ``Weights``: the full ``state_dict`` (parameters and buffers such
as BatchNorm running statistics and its int64 ``num_batches_tracked`` counter), in
``state_dict`` order, each tensor copied to a numpy array of the same dtype. numpy has no
bfloat16, so bfloat16 tensors become float32 arrays (exact: every bfloat16 value is a
float32 value); ``load_weights`` casts every array to the dtype the module's own tensor has,
so a bfloat16 module round-trips bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from fedloop.errors import FedloopError
from fedloop.types import Weights

__all__ = [
    "fedcurv_penalty",
    "fisher_diagonal",
    "load_weights",
    "proximal_term",
    "scaffold_correction",
    "scaffold_update_control",
    "tensors_like",
    "to_weights",
    "trainable_names",
]

ArrayOrTensor = np.ndarray | torch.Tensor

# Tensor dtypes numpy cannot hold, and the numpy-representable dtype they travel as.
_WIDENED = {torch.bfloat16: torch.float32}


def to_weights(module: nn.Module) -> Weights:
    """Return a copy of the module's full state_dict (parameters and buffers) as numpy arrays."""
    out: Weights = {}
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu()
        if t.dtype in _WIDENED:
            t = t.to(_WIDENED[t.dtype])
        try:
            out[name] = t.numpy().copy()
        except TypeError as exc:
            raise FedloopError(
                f"tensor {name!r} has dtype {t.dtype}, which has no numpy equivalent; "
                "cast the module to a supported dtype before exporting it."
            ) from exc
    return out


def load_weights(module: nn.Module, weights: Mapping[str, ArrayOrTensor]) -> None:
    """Copy ``weights`` into the module in place, cast to each of the module's tensor dtypes.

    Strict: a missing or unexpected name, or a shape that differs, raises ``FedloopError``
    naming the tensor, and nothing is changed.
    """
    state = module.state_dict()
    missing = [n for n in state if n not in weights]
    unexpected = [n for n in weights if n not in state]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected}")
        raise FedloopError(
            "weights do not match the model: " + "; ".join(parts) + ". "
            "Check that the aggregator and this agent use the same model definition."
        )
    sources: dict[str, torch.Tensor] = {}
    for name, target in state.items():
        src = _as_tensor(name, weights[name])
        if tuple(src.shape) != tuple(target.shape):
            raise FedloopError(
                f"tensor {name!r} has shape {tuple(src.shape)} but the model expects "
                f"{tuple(target.shape)}; check that both sides use the same model definition."
            )
        sources[name] = src
    with torch.no_grad():
        for name, target in state.items():
            target.copy_(sources[name])


def _as_tensor(name: str, value: ArrayOrTensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    arr = np.asarray(value)
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise FedloopError(f"tensor {name!r} has unsupported dtype {arr.dtype}.")
    # np.array copies: from_numpy needs a writable array, and the caller keeps its own.
    return torch.from_numpy(np.array(arr))


def trainable_names(module: nn.Module) -> list[str]:
    """Return the names of the module's parameters that require gradients."""
    return [n for n, p in module.named_parameters() if p.requires_grad]


def tensors_like(
    module: nn.Module, weights: Mapping[str, ArrayOrTensor], names: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """Return ``weights[name]`` as tensors with the dtype and device of the module's parameters.

    Converting once per round and passing the result to ``proximal_term`` or the SCAFFOLD
    helpers avoids a numpy-to-tensor copy on every optimizer step.
    """
    params = dict(module.named_parameters())
    wanted = list(params) if names is None else list(names)
    out: dict[str, torch.Tensor] = {}
    for name in wanted:
        if name not in params:
            raise FedloopError(f"the model has no parameter {name!r}.")
        if name not in weights:
            raise FedloopError(f"tensor {name!r} is missing from the given weights.")
        p = params[name]
        t = _as_tensor(name, weights[name])
        if tuple(t.shape) != tuple(p.shape):
            raise FedloopError(
                f"tensor {name!r} has shape {tuple(t.shape)} but the model expects "
                f"{tuple(p.shape)}."
            )
        out[name] = t.to(device=p.device, dtype=p.dtype)
    return out


def proximal_term(
    module: nn.Module, global_weights: Mapping[str, ArrayOrTensor], mu: float
) -> torch.Tensor:
    """Return FedProx's mu/2 * ||w - w_global||^2 over the trainable parameters (differentiable).

    Buffers (BatchNorm statistics) are not trained by gradient and are left out.
    """
    params = dict(module.named_parameters())
    total: torch.Tensor | None = None
    for name in trainable_names(module):
        p = params[name]
        g = _param_tensor(name, _need(global_weights, name, "global weights"), p)
        term = (p - g.detach()).pow(2).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return 0.5 * mu * total


def scaffold_correction(
    module: nn.Module,
    c_global: Mapping[str, ArrayOrTensor],
    c_local: Mapping[str, ArrayOrTensor],
) -> None:
    """Correct the gradients in place after ``backward()``: g <- g - c_i + c (SCAFFOLD).

    Parameters without a gradient are skipped. Pre-convert the controls with
    ``tensors_like`` to avoid copying them on every step.
    """
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            if p.grad is None:
                continue
            if name not in c_global or name not in c_local:
                raise FedloopError(f"control variate for parameter {name!r} is missing.")
            c = _param_tensor(name, c_global[name], p)
            ci = _param_tensor(name, c_local[name], p)
            p.grad.add_(c - ci)


def _param_tensor(name: str, value: ArrayOrTensor, p: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor) and value.dtype == p.dtype and value.device == p.device:
        t = value.detach()
        if t.shape == p.shape:
            return t
    t = _as_tensor(name, value)
    if tuple(t.shape) != tuple(p.shape):
        raise FedloopError(
            f"control variate {name!r} has shape {tuple(t.shape)}, parameter has {tuple(p.shape)}."
        )
    return t.to(device=p.device, dtype=p.dtype)


def scaffold_update_control(
    c_local: Weights,
    c_global: Weights,
    global_weights: Weights,
    local_weights: Weights,
    local_steps: int,
    lr: float,
) -> tuple[Weights, Weights]:
    """Return SCAFFOLD's new local control and its change: (c_i+, c_i+ - c_i).

    Option II of Karimireddy et al. 2020: c_i+ = c_i - c + (x - y_i) / (K * lr), with x the
    global model received, y_i the model after K local steps of learning rate lr. Computed
    in float64, returned in each control's own dtype, over the names of ``c_local``.
    """
    if local_steps < 1 or lr <= 0:
        raise FedloopError(
            f"SCAFFOLD needs local_steps >= 1 and lr > 0, got {local_steps} and {lr}."
        )
    new: Weights = {}
    delta: Weights = {}
    scale = 1.0 / (local_steps * lr)
    for name, ci in c_local.items():
        for label, source in (("c_global", c_global), ("global", global_weights)):
            if name not in source:
                raise FedloopError(f"{label} weights lack tensor {name!r}.")
        if name not in local_weights:
            raise FedloopError(f"local weights lack tensor {name!r}.")
        ci64 = np.asarray(ci, dtype=np.float64)
        updated = (
            ci64
            - np.asarray(c_global[name], dtype=np.float64)
            + (
                np.asarray(global_weights[name], dtype=np.float64)
                - np.asarray(local_weights[name], dtype=np.float64)
            )
            * scale
        )
        dtype = np.asarray(ci).dtype
        new[name] = updated.astype(dtype)
        delta[name] = (updated - ci64).astype(dtype)
    return new, delta


def fisher_diagonal(
    module: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    max_batches: int | None = None,
) -> Weights:
    """Return the empirical Fisher diagonal: the mean over samples of each squared per-sample
    gradient of the loss (negative log-likelihood of the true label), per trainable parameter.

    Per-sample gradients come from ``torch.func`` (vmap over grad); the module is run in eval
    mode so BatchNorm uses its running statistics. ``loss_fn(outputs, targets)`` must reduce
    by mean; the default is cross-entropy.
    """
    from torch.func import functional_call, grad, vmap

    loss = loss_fn if loss_fn is not None else nn.functional.cross_entropy
    names = trainable_names(module)
    params = {n: p.detach() for n, p in module.named_parameters() if n in names}
    buffers = {n: b.detach() for n, b in module.named_buffers()}
    sums = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    count = 0

    def sample_loss(ps: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(module, (ps, buffers), (x.unsqueeze(0),))
        return loss(out, y.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    was_training = module.training
    module.eval()
    try:
        for i, (x, y) in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            grads = per_sample(params, x, y)
            for n, g in grads.items():
                sums[n] += g.detach().to(torch.float64).pow(2).sum(dim=0)
            count += int(x.shape[0])
    finally:
        module.train(was_training)
    if count == 0:
        raise FedloopError("fisher_diagonal got no samples; pass at least one batch.")
    out: Weights = {}
    for n, s in sums.items():
        dtype = _WIDENED.get(params[n].dtype, params[n].dtype)
        out[n] = (s / count).to(dtype).cpu().numpy()
    return out


def fedcurv_penalty(
    module: nn.Module,
    fisher_sum: Mapping[str, ArrayOrTensor],
    fisher_weight_sum: Mapping[str, ArrayOrTensor],
    own_fisher: Mapping[str, ArrayOrTensor] | None,
    own_fisher_weight: Mapping[str, ArrayOrTensor] | None,
    lam: float,
) -> torch.Tensor:
    """Return FedCurv's penalty (Shoham et al. 2019) for this agent's trainable parameters w:

        lam * sum[(F_total - F_own) * w^2 - 2 * (FW_total - FW_own) * w]

    where F_total = sum_j F_j and FW_total = sum_j F_j * w_j over the agents of the previous
    round, and F_own, FW_own are this agent's own share (pass None on its first round). This is
    lam * sum_{j != own} (w - w_j)^T diag(F_j) (w - w_j) less a constant that does not depend on
    w, so gradients are exact and the value may be negative.
    """
    params = dict(module.named_parameters())
    total: torch.Tensor | None = None
    for name in trainable_names(module):
        p = params[name]
        f = _param_tensor(name, _need(fisher_sum, name, "fisher_sum"), p)
        fw = _param_tensor(name, _need(fisher_weight_sum, name, "fisher_weight_sum"), p)
        if own_fisher is not None:
            f = f - _param_tensor(name, _need(own_fisher, name, "own_fisher"), p)
        if own_fisher_weight is not None:
            fw = fw - _param_tensor(name, _need(own_fisher_weight, name, "own_fisher_weight"), p)
        term = (f * p.pow(2)).sum() - 2.0 * (fw * p).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return lam * total


def _need(m: Mapping[str, ArrayOrTensor], name: str, label: str) -> ArrayOrTensor:
    if name not in m:
        raise FedloopError(f"{label} lacks tensor {name!r}.")
    return m[name]
