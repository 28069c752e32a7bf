"""Sparse SGD updates of linear models on sparse CSR batches, as HOGWILD! makes them.

For scores ``S = X W^T + b`` on a CSR batch ``X`` (B x d), the gradient of
the loss is ``dL/dW = G^T X`` with ``G = dL/dS`` (B x C): column ``u`` of
``dL/dW`` is nonzero only where feature ``u`` occurs in the batch. So a step
computes ``G`` (B x C, autograd on the scores alone, so any loss works),
gathers it onto the batch's nonzeros, and writes only those columns. A
worker sharing its parameters with others (Hogwild!) then touches a handful
of coordinates per step, which is what makes lock-free updates rarely
collide (Niu, Recht, Ré, Wright, "HOGWILD!", NIPS 2011, section 2).

The L2 term ``0.5 * l2 * ||W||^2`` would touch every coordinate each step.
As in the paper's sparse SVM, it is split over the examples instead: an
example containing feature ``u`` carries ``0.5 * l2 * (N / n_u) * W_u^2``,
where ``n_u`` of the N training examples contain ``u``. Summed over the
examples that is the whole L2 term again, so the expected step equals dense
SGD's, but each step shrinks only the coordinates it touches.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import nn

from downpour.flat import FlatParams, SparseUpdate
from downpour.models import MODELS
from downpour.models.linear import LinearModel
from downpour.models.sparse_sgd import LOSSES, SparseSGD, batch_gradient


def supports_sparse_updates(model: nn.Module, sparse_inputs: bool) -> bool:
    """Whether ``model`` is one affine map over sparse CSR inputs, so steps can be sparse."""
    return sparse_inputs and isinstance(model, LinearModel)


def feature_scale(x: torch.Tensor) -> torch.Tensor:
    """``N / n_u`` per feature of the CSR matrix ``x`` (N rows), 0 where no row holds ``u``.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [1.0, 1.0]]).to_sparse_csr()
        >>> feature_scale(x).tolist()
        [1.0, 2.0]
    """
    counts = torch.bincount(x.col_indices(), minlength=x.shape[1]).to(torch.float32)
    return torch.where(counts > 0, x.shape[0] / counts.clamp(min=1), torch.zeros_like(counts))


class SparseStep(NamedTuple):
    """One sparse step: the update of the flat vector (a gradient: subtract ``lr`` times it) and the loss."""

    update: SparseUpdate
    loss: float


class SparseLinearGradient:
    """Sparse gradients of a :class:`LinearModel`, as updates of its flat parameter vector.

    Args:
        flat: the model's flat parameters (the weight and bias are views into it).
        loss_fn: ``loss_fn(scores, y) -> scalar``, averaged over the batch.
        x_train: the CSR training inputs the feature frequencies come from
            (a worker's own shard).

    Example:
        >>> from downpour.models import build, default_loss
        >>> x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]).to_sparse_csr()
        >>> model = build("svm", (3,), 2)
        >>> step = SparseLinearGradient(FlatParams(model), default_loss("svm"), x)(x, torch.tensor([0, 1]), lr=0.1)
        >>> step.update.nnz  # two classes x two touched features, plus two biases
        6
    """

    def __init__(self, flat: FlatParams, loss_fn, x_train: torch.Tensor) -> None:
        model = flat.module
        if not isinstance(model, LinearModel):
            raise TypeError(f"sparse updates need a linear model, got {type(model).__name__}")
        self.flat = flat
        self.loss_fn = loss_fn
        self.weight = model.linear.weight
        self.bias = model.linear.bias
        self.l2, self.bias_lr = model.l2, model.bias_lr
        self.scale = feature_scale(x_train)
        offsets = {id(p): offset for p, offset in zip(flat.parameters, _offsets(flat))}
        num_classes, self.num_features = self.weight.shape
        # Positions of W[c, 0] and of the biases in the flat vector (W is row-major).
        self.rows = offsets[id(self.weight)] + torch.arange(num_classes) * self.num_features
        self.bias_index = offsets[id(self.bias)] + torch.arange(num_classes)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor, *, lr: float) -> SparseStep:
        """The gradient of the loss on the CSR batch ``(x, y)``, nonzero only on its features.

        ``lr`` caps the L2 shrinkage at zeroing a coordinate, so a feature
        rarer than ``lr * l2 * N`` examples is never pushed past zero.
        """
        weight, batch = self.weight, len(y)
        scores = torch.sparse.mm(x, weight.t()) + self.bias
        with torch.enable_grad():
            scores.requires_grad_(True)
            loss = self.loss_fn(scores, y)
            (grad_scores,) = torch.autograd.grad(loss, scores)
        rows = torch.repeat_interleave(x.crow_indices().diff())  # the example of each nonzero
        columns, inverse, counts = torch.unique(x.col_indices(), return_inverse=True, return_counts=True)
        contributions = grad_scores[rows] * x.values().unsqueeze(1)  # (nnz, C)
        grad = torch.zeros(len(columns), weight.shape[0]).index_add_(0, inverse, contributions)  # (U, C)
        touched = weight[:, columns]  # a racy read under Hogwild, as in the paper
        regularization = 0.0
        if self.l2 > 0:
            coefficient = (self.l2 * self.scale[columns] * counts / batch).clamp(max=1.0 / lr)
            grad.add_(coefficient.unsqueeze(1) * touched.t())
            regularization = 0.5 * float((coefficient * touched.pow(2).sum(0)).sum())
        # Row-major positions of W[c, u] for every class c and touched u: increasing, then the biases.
        index = (self.rows.unsqueeze(1) + columns.unsqueeze(0)).reshape(-1)
        values = torch.cat([grad.t().reshape(-1), grad_scores.sum(0) * self.bias_lr])
        update = SparseUpdate(torch.cat([index, self.bias_index]), values, self.flat.numel)
        return SparseStep(update, float(loss) + regularization)


def _offsets(flat: FlatParams) -> list[int]:
    offsets, offset = [], 0
    for p in flat.parameters:
        offsets.append(offset)
        offset += p.numel()
    return offsets


def _kernel_model(job: Any, model: nn.Module) -> str | None:
    """The kernel's name for ``model`` where it can stand in for torch: a linear model trained
    with its own loss on in-memory sparse CSR data, on the CPU; else None."""
    data = job.data
    if getattr(data, "streamed", False) or not getattr(data, "sparse", False):
        return None
    if not isinstance(model, LinearModel) or str(job.device) != "cpu":
        return None
    name = next((n for n, cls in MODELS.items() if cls is type(model)), None)
    if name not in LOSSES or job.loss is not getattr(type(model), "criterion", None):
        return None
    return name


def compiled_kernel(job: Any, model: nn.Module, *, average: int = 0) -> SparseSGD | None:
    """The compiled kernel that takes exactly ``job``'s steps on ``model``, or None where none does.

    It does for a linear model trained with its own loss on in-memory sparse
    CSR inputs, on the CPU, by plain SGD (no momentum or weight decay) at a
    constant rate; anything else (a user's loss, Adam, a cosine schedule, a
    GPU) trains through torch. ``average``: the kernel's averaged SGD (see
    :class:`SparseSGD`).
    """
    spec = job.optimizer
    name = _kernel_model(job, model)
    if name is None:
        return None
    plain = spec.name == "sgd" and not any(spec.kwargs.get(k) for k in ("momentum", "weight_decay"))
    if not plain or spec.schedule != "constant" or spec.warmup_steps:
        return None
    weight, bias = model.linear.weight, model.linear.bias
    kernel = SparseSGD(name, num_features=weight.shape[1], num_classes=weight.shape[0],
                       lr=spec.lr, l2=float(model.l2), batch_size=job.batch_size, average=average,
                       bias_lr=model.bias_lr)
    kernel.set_weights(weight.detach().numpy(), bias.detach().numpy())
    return kernel


def load_kernel_weights(kernel: SparseSGD, model: nn.Module) -> None:
    """Copy the kernel's coefficients into ``model`` (its parameters keep their storage)."""
    weights, bias = kernel.coefficients()
    with torch.no_grad():
        model.linear.weight.copy_(torch.from_numpy(weights))
        model.linear.bias.copy_(torch.from_numpy(bias))


def compiled_gradient(job: Any, model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], float] | None:
    """``gradient(x, y) -> loss``: the compiled kernel's gradient of ``model`` (into its ``.grad``)
    on a sparse CSR batch, where it equals autograd's: a linear model with its own loss on
    in-memory sparse data, on the CPU. Any optimizer then steps on it. None elsewhere."""
    name = _kernel_model(job, model)
    if name is None:
        return None
    weight, bias, l2 = model.linear.weight, model.linear.bias, float(model.l2)
    return partial(_compiled_step, name, weight, bias, l2, model.bias_lr)


def _compiled_step(name: str, weight: torch.Tensor, bias: torch.Tensor, l2: float,
                   bias_lr: float, x: torch.Tensor, y: torch.Tensor) -> float:
    if x.layout != torch.sparse_csr:
        raise TypeError("the compiled gradient takes CSR batches")
    return batch_gradient(name, x, y, weight, bias, l2, bias_lr)
