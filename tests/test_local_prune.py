"""The local pruner: exact refit, saliency beats magnitude, edge sparsities."""

from __future__ import annotations

import pytest
import torch

from tyr_core.local_prune import damp, layer_error, magnitude_prune, prune_linear
from tyr_core.sublayer_layout import scatter_columns


def _problem(d_in=64, d_out=48, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g) / d_in**0.5
    x = torch.randn(n, d_in, generator=g) @ mix + 0.3 * torch.randn(n, d_in, generator=g)
    x[:, :8] *= 4  # uneven channel scales, as real activations have
    w = torch.randn(d_out, d_in, generator=g)
    return w, x.t() @ x


@pytest.mark.parametrize("group_size,keep,rounds", [(16, 2, 1), (1, 24, 16), (1, 40, 4), (8, 5, 2)])
def test_refit_is_least_squares_optimum_on_support(group_size, keep, rounds):
    w, h = _problem()
    copy = prune_linear(w, h, group_size, keep, rounds)
    assert copy.kept.numel() == keep and copy.weight.shape == (48, keep * group_size)
    full = scatter_columns(copy, 64, group_size)
    hd = damp(h, 0.01)
    grad = (full - w).double() @ hd.double()  # d/dW_hat of tr((W_hat - W) H (W_hat - W)^T) / 2
    cols = torch.nonzero(full.abs().sum(0) > 0).flatten()
    scale = (w.double() @ hd.double()).abs().max()
    assert grad[:, cols].abs().max() / scale < 1e-5
    # the removed columns do carry a gradient: the support constraint is active
    assert grad.abs().max() / scale > 1e-3


@pytest.mark.parametrize("group_size,keep,rounds", [(16, 2, 1), (1, 32, 16)])
def test_pruned_copy_beats_magnitude_and_no_refit(group_size, keep, rounds):
    w, h = _problem(seed=3)
    ours = scatter_columns(prune_linear(w, h, group_size, keep, rounds), 64, group_size)
    no_refit = scatter_columns(prune_linear(w, h, group_size, keep, rounds, refit_weights=False), 64, group_size)
    mag = scatter_columns(magnitude_prune(w, group_size, keep), 64, group_size)
    e_ours, e_plain, e_mag = (layer_error(w, h, m) for m in (ours, no_refit, mag))
    assert e_ours < e_plain and e_ours < e_mag


def test_sparsity_zero_is_dense_and_one_removes_everything():
    w, h = _problem()
    dense = prune_linear(w, h, 16, 4, 1)
    assert torch.equal(dense.weight, w) and torch.equal(dense.kept, torch.arange(4))
    gone = prune_linear(w, h, 16, 0, 1)
    assert gone.kept.numel() == 0 and gone.weight.shape == (48, 0)
    assert torch.equal(scatter_columns(gone, 64, 16), torch.zeros(48, 64))


def test_dead_inputs_are_zeroed_and_dropped_first():
    w, h = _problem()
    h[:, 5] = 0
    h[5, :] = 0
    copy = prune_linear(w, h, 1, 63, 16)
    assert 5 not in copy.kept.tolist()


def test_keep_out_of_range_is_rejected():
    w, h = _problem()
    with pytest.raises(ValueError, match="outside"):
        prune_linear(w, h, 16, 5, 1)


def test_dense_target_refit_fits_dense_outputs_from_pruned_inputs():
    from tyr_core.local_prune import prepare, prune_prepared

    g = torch.Generator().manual_seed(7)
    x = torch.randn(512, 64, generator=g)
    x_pruned = x + 0.3 * torch.randn(512, 64, generator=g)  # upstream pruning perturbed the inputs
    w = torch.randn(48, 64, generator=g)
    h, cross = x_pruned.t() @ x_pruned, x_pruned.t() @ x
    same = prune_prepared(prepare(w, h, 0.01, cross=h), 1, 40, 16)
    assert torch.equal(same.weight, prune_linear(w, h, 1, 40, 16).weight)  # identical streams: the reference
    copy = prune_prepared(prepare(w, h, 0.01, cross=cross), 1, 40, 16)
    full = scatter_columns(copy, 64, 1).double()
    lam = (damp(h, 0.01) - h).double()
    grad = full @ (h.double() + lam) - w.double() @ (cross.double().t() + lam)  # of ||X W^T - X~ W_hat^T||^2 + ridge
    assert grad[:, copy.kept].abs().max() / grad.abs().max() < 1e-4
    err = lambda m: float(((x @ w.t()) - (x_pruned @ m.float().t())).pow(2).sum())  # noqa: E731
    assert err(full) < err(scatter_columns(prune_linear(w, h, 1, 40, 16), 64, 1))


def test_first_order_weight_one_is_the_reference_and_zero_is_pure_obs():
    w, h = _problem(seed=5)
    default = prune_linear(w, h, 1, 24, 4)
    one = prune_linear(w, h, 1, 24, 4, first_order=1.0)
    assert torch.equal(default.kept, one.kept) and torch.equal(default.weight, one.weight)
    assert not torch.equal(prune_linear(w, h, 1, 24, 4, first_order=0.0).kept, one.kept)
    # pure OBS ranks groups by the error left after compensation: over several problems it leaves less of it
    ratios = []
    for seed in range(4):
        w, h = _problem(seed=seed)
        err = [
            layer_error(w, damp(h, 0.01), scatter_columns(prune_linear(w, h, 1, 32, 16, first_order=f), 64, 1))
            for f in (0.0, 1.0)
        ]
        ratios.append(err[0] / err[1])
    assert sum(ratios) / len(ratios) < 0.97
