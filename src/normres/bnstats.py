"""Batch norm's statistics at test time (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm").

A layer with running statistics is trained on batch statistics but tested on population statistics,
by default the exponential moving average (EMA) of the batch statistics seen in training, which
lags behind the weights. Wu & Johnson compare it with

* **PreciseBN**: population statistics recomputed with the weights frozen, over a number of
  training images in the training batch size, without augmentation (:func:`precise_statistics_model`);
  each layer's running mean and variance become the plain averages of its batch means and (unbiased)
  variances, which is what ``momentum=None`` (a cumulative average) computes in ``nn.BatchNorm2d``
  and in every layer following its protocol (:func:`normres.norms.running_stat_layers`);
* **test-batch statistics**: train-mode normalization at test time, each test batch normalized by
  its own statistics (:func:`batch_statistics_model`).

Both work on copies: the trained model, and its file, are never changed. The same recalibration
adapts a model to shifted test data (Schneider et al. 2020; :mod:`normres.robustness`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from normres.norms import running_stat_layers

__all__ = ["batch_statistics_model", "precise_statistics_model", "recalibrated"]


@torch.no_grad()
def recalibrated(model: nn.Module, x: Tensor, normalize: Callable[[Tensor], Tensor], batch_size: int) -> nn.Module:
    """A copy of ``model`` whose running statistics are recomputed on the uint8 images ``x``, in
    batches of ``batch_size`` in the order given (the caller draws the images). Eval mode."""
    net = copy.deepcopy(model)
    layers = running_stat_layers(net)
    momenta = [layer.momentum for layer in layers]
    net.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average: every batch weighs the same
        layer.train()
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size]
        if len(xb) < 2:  # a last batch of one image has no batch variance
            continue
        net.features(normalize(xb))
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    return net.eval()


def precise_statistics_model(
    model: nn.Module,
    train_x: Tensor,
    normalize: Callable[[Tensor], Tensor],
    batch_size: int,
    images: int | None,
    seed: int,
) -> nn.Module:
    """PreciseBN: a copy of ``model`` with running statistics recomputed over ``images`` training
    images (all when None), drawn by a seeded permutation, unaugmented, in the training batch size."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_x), generator=g)[: images or len(train_x)].to(train_x.device)
    return recalibrated(model, train_x[order], normalize, batch_size)


def batch_statistics_model(model: nn.Module, n_test: int, seed: int) -> tuple[nn.Module, Tensor]:
    """A copy of ``model`` whose running-statistics layers normalize every batch by its own
    statistics (train mode; everything else in eval mode), and the seeded order in which the test
    images are to be batched (a random mix of classes, as training batches are)."""
    net = copy.deepcopy(model).eval()
    for layer in running_stat_layers(net):
        layer.train()
    order = torch.randperm(n_test, generator=torch.Generator().manual_seed(seed))
    return net, order
