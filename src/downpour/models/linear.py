"""Linear models: multiclass perceptron, linear SVMs and logistic regression.

All four are one affine map ``x @ W.T + b`` over the flattened input; they
differ only in their loss and in their L2 term. The input may be dense (any
shape, flattened per example) or a sparse CSR matrix ``(N, d)`` such as an
svmlight/RCV1 batch, which is multiplied without ever being densified.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from downpour.errors import check_range

_SPARSE_LAYOUTS = (torch.sparse_csr, torch.sparse_coo)


def perceptron_loss(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean perceptron criterion ``max(0, max_j s_j - s_y)``.

    Its gradient is zero on correctly classified examples and moves the true
    class up and the winning class down on mistakes: Rosenblatt's update,
    averaged over the batch.

    Example:
        >>> float(perceptron_loss(torch.tensor([[2.0, 0.5]]), torch.tensor([1])))
        1.5
    """
    true = scores.gather(1, y.long().view(-1, 1)).squeeze(1)
    return F.relu(scores.max(dim=1).values - true).mean()


def hinge_loss(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One-vs-rest hinge loss, summed over classes and averaged over the batch.

    Class ``j`` is a binary SVM with target ``+1`` when ``y == j`` and ``-1``
    otherwise.

    Example:
        >>> float(hinge_loss(torch.tensor([[1.0, -1.0]]), torch.tensor([0])))
        0.0
    """
    targets = torch.full_like(scores, -1.0)
    targets.scatter_(1, y.long().view(-1, 1), 1.0)
    return F.relu(1.0 - targets * scores).sum(dim=1).mean()


def squared_hinge_loss(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One-vs-rest squared hinge ``sum_j max(0, 1 - t_j s_j)^2``, batch mean (the L2-SVM).

    Smooth, unlike the hinge, so batch methods (L-BFGS, CG) apply to it.

    Example:
        >>> float(squared_hinge_loss(torch.tensor([[0.5, -1.0]]), torch.tensor([0])))
        0.25
    """
    targets = torch.full_like(scores, -1.0)
    targets.scatter_(1, y.long().view(-1, 1), 1.0)
    return F.relu(1.0 - targets * scores).square().sum(dim=1).mean()


def multiclass_hinge_loss(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Crammer–Singer multiclass hinge ``max(0, 1 + max_{j != y} s_j - s_y)``, batch mean.

    Crammer & Singer, "On the algorithmic implementation of multiclass
    kernel-based vector machines", JMLR 2001.

    Example:
        >>> float(multiclass_hinge_loss(torch.tensor([[3.0, 1.0]]), torch.tensor([0])))
        0.0
    """
    index = y.long().view(-1, 1)
    true = scores.gather(1, index).squeeze(1)
    # -inf on the true class takes it out of the max without a boolean copy of the batch.
    others = scores.scatter(1, index, float("-inf")).max(dim=1).values
    return F.relu(1.0 + others - true).mean()


class LinearModel(nn.Module):
    """Scores ``x @ W.T + b`` for dense or sparse ``x``, plus an optional L2 term.

    The weights start at zero, as scikit-learn's ``SGDClassifier``, Bottou's sgd
    and Vowpal Wabbit start (the losses are convex: the start decides no optimum);
    a two-class model then trains as one binary weight vector would (see
    :meth:`downpour.models.sparse_sgd.SparseSGD.set_weights`). The perceptron starts
    at random: at zero every score ties and its criterion has no gradient.

    Args:
        input_shape: shape of one example; it is flattened to ``prod(input_shape)`` features.
        num_classes: number of outputs.
        l2: strength of ``regularization() = 0.5 * l2 * ||W||^2`` (the bias is not penalized).
        bias_lr: the bias's gradient is scaled by it, so plain SGD moves the bias at ``bias_lr``
            times the rate of the weights (scikit-learn's ``SGDClassifier`` and Bottou's sgd take
            0.01 on sparse inputs: at the constant rates that suit such data a full-rate bias
            jumps by the rate at every margin error, and the last iterate's test error with it).
            The scores keep the bias's value; 0 leaves the bias where it starts.

    Example:
        >>> model = LinearModel((2, 3), 4)
        >>> model(torch.zeros(5, 2, 3)).shape
        torch.Size([5, 4])
    """

    start_at_zero = True

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, *, l2: float = 0.0,
                 bias_lr: float = 1.0) -> None:
        super().__init__()
        check_range("l2", l2, 0.0)
        check_range("bias_lr", bias_lr, 0.0)
        self.num_features = math.prod(input_shape)
        self.l2 = float(l2)
        self.bias_lr = float(bias_lr)
        self.linear = nn.Linear(self.num_features, num_classes)
        if self.start_at_zero:
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.linear.weight, self.linear.bias
        if self.bias_lr != 1.0:  # the same value, its gradient times bias_lr
            bias = bias.detach() + (bias - bias.detach()) * self.bias_lr
        if x.layout in _SPARSE_LAYOUTS:
            self._check_features(x.dim() == 2 and x.shape[1] == self.num_features, x.shape)
            # torch.sparse.mm differentiates through the dense weight and returns a
            # dense gradient (checked for torch 2.13 in the tests), so autograd
            # accumulates it in place into a flat gradient buffer as usual.
            return torch.sparse.mm(x.to(weight.dtype), weight.t()) + bias
        x = x.reshape(x.shape[0], -1)
        self._check_features(x.shape[1] == self.num_features, x.shape)
        return F.linear(x.to(weight.dtype), weight, bias)

    def regularization(self) -> torch.Tensor:
        """Return ``0.5 * l2 * ||W||^2``; :func:`downpour.models.backward` adds it to the loss."""
        return 0.5 * self.l2 * self.linear.weight.pow(2).sum()

    def _check_features(self, ok: bool, shape: torch.Size) -> None:
        if not ok:
            raise ValueError(
                f"{type(self).__name__} expects {self.num_features} features per example, "
                f"got a batch of shape {tuple(shape)}"
            )


class Perceptron(LinearModel):
    """Multiclass perceptron; trained with :func:`perceptron_loss` (SGD at lr 1 is Rosenblatt's rule).

    Example:
        >>> Perceptron((4,), 3)(torch.zeros(2, 4)).shape
        torch.Size([2, 3])
    """

    criterion = staticmethod(perceptron_loss)
    start_at_zero = False  # every score would tie at zero, where the criterion has no gradient


class LinearSVM(LinearModel):
    """One-vs-rest linear SVM: :func:`hinge_loss` plus ``0.5 * l2 * ||W||^2``.

    Example:
        >>> LinearSVM((4,), 3, l2=1e-3).regularization().shape
        torch.Size([])
    """

    criterion = staticmethod(hinge_loss)

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, *, l2: float = 1e-4,
                 bias_lr: float = 1.0) -> None:
        super().__init__(input_shape, num_classes, l2=l2, bias_lr=bias_lr)


class SquaredHingeSVM(LinearSVM):
    """One-vs-rest L2-SVM: :func:`squared_hinge_loss` plus ``0.5 * l2 * ||W||^2``; smooth.

    Example:
        >>> SquaredHingeSVM((4,), 3).criterion.__name__
        'squared_hinge_loss'
    """

    criterion = staticmethod(squared_hinge_loss)


class MulticlassSVM(LinearModel):
    """Crammer–Singer multiclass SVM: :func:`multiclass_hinge_loss` plus ``0.5 * l2 * ||W||^2``.

    Example:
        >>> MulticlassSVM((4,), 3)(torch.zeros(2, 4)).shape
        torch.Size([2, 3])
    """

    criterion = staticmethod(multiclass_hinge_loss)

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, *, l2: float = 1e-4,
                 bias_lr: float = 1.0) -> None:
        super().__init__(input_shape, num_classes, l2=l2, bias_lr=bias_lr)


class LogisticRegression(LinearModel):
    """Multinomial logistic regression (softmax scores, cross-entropy loss).

    Example:
        >>> LogisticRegression((4,), 3)(torch.zeros(2, 4)).shape
        torch.Size([2, 3])
    """

    criterion = staticmethod(F.cross_entropy)
