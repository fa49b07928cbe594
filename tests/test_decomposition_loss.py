"""kerasdet.losses decompNet terms: weighted_l2 by hand; the Hungarian set loss equals the
minimum over all step -> ground-truth permutations (brute force); the sum term."""
import itertools

import numpy as np
import pytest

from kerasdet.losses import decomposition_set_loss, match_instance_maps, weighted_l2


def test_weighted_l2_by_hand():
    x = np.array([[0.0, 1.0], [2.0, 0.5]], np.float32)
    y = np.array([[1.0, 1.0], [0.0, 0.0]], np.float32)
    # (y + p)(x - y)^2 with p = 0.3: 1.3 * 1 + 0 + 0.3 * 4 + 0.3 * 0.25
    assert float(weighted_l2(x, y, p=0.3)) == pytest.approx(1.3 + 1.2 + 0.075)


def _brute_force(maps, masks, n_valid, lam):
    """min over injective step -> mask assignments of sum D_lam(o_t, m_k) (plain L2 picks)."""
    t = maps.shape[0]
    best_cost, best_loss = np.inf, None
    for steps in itertools.permutations(range(t), n_valid):
        cost = sum(((maps[s] - masks[k]) ** 2).sum() for k, s in enumerate(steps))
        if cost < best_cost - 1e-9:
            best_cost = cost
            best_loss = sum(((masks[k] + lam) * (maps[s] - masks[k]) ** 2).sum() for k, s in enumerate(steps))
    return best_loss


@pytest.mark.parametrize("seed", range(6))
def test_hungarian_set_loss_equals_brute_force_permutations(seed):
    rng = np.random.default_rng(seed)
    n, t, k, s = 3, 5, 4, 6
    maps = rng.random((n, t, s, s)).astype(np.float32)
    masks = (rng.random((n, k, s, s)) > 0.6).astype(np.float32)
    n_valid = [4, 2, 0]
    valid = np.arange(k)[None, :] < np.array(n_valid)[:, None]
    inst, sums, assignment = decomposition_set_loss(maps, masks, valid, lam=0.7, gamma=0.4, eta=1.0)
    inst, sums, assignment = inst.numpy(), sums.numpy(), assignment.numpy()
    for i in range(n):
        expected = _brute_force(maps[i], masks[i], n_valid[i], 0.7) if n_valid[i] else 0.0
        assert inst[i] == pytest.approx(expected, rel=1e-5)
        matched = sorted(a for a in assignment[i] if a >= 0)
        assert matched == list(range(n_valid[i]))  # every real mask once, no padding row
        gt_sum = masks[i, :n_valid[i]].sum(0)
        assert sums[i] == pytest.approx(((gt_sum + 0.4) * (maps[i].sum(0) - gt_sum) ** 2).sum(), rel=1e-5)


def test_unmatched_zero_adds_surplus_steps_and_matching_is_stop_gradient():
    rng = np.random.default_rng(0)
    maps = rng.random((1, 3, 4, 4)).astype(np.float32)
    masks = np.zeros((1, 2, 4, 4), np.float32)
    masks[0, 0, :2] = 1
    valid = np.array([[True, False]])
    a = match_instance_maps(maps, masks, valid).numpy()[0]
    assert (a >= 0).sum() == 1
    inst_sum, _, _ = decomposition_set_loss(maps, masks, valid, lam=1.0)
    inst_zero, _, _ = decomposition_set_loss(maps, masks, valid, lam=1.0, unmatched="zero")
    surplus = [t for t in range(3) if a[t] < 0]
    extra = sum((1.0 * maps[0, t] ** 2).sum() for t in surplus)
    assert float(inst_zero[0]) == pytest.approx(float(inst_sum[0]) + extra, rel=1e-5)
    with pytest.raises(ValueError):
        decomposition_set_loss(maps, masks, valid, unmatched="bad")


def _brute_force_ordered(maps, masks, n_valid, lam):
    """Ordered loss by enumeration: the n masks onto the first n steps (all n! orders, plain L2
    picks), every later step against black."""
    best_cost, best_loss = np.inf, None
    for steps in itertools.permutations(range(n_valid)):
        cost = sum(((maps[s] - masks[k]) ** 2).sum() for k, s in enumerate(steps))
        if cost < best_cost - 1e-9:
            best_cost = cost
            best_loss = sum(((masks[k] + lam) * (maps[s] - masks[k]) ** 2).sum() for k, s in enumerate(steps))
    best_loss = best_loss or 0.0
    return best_loss + sum((lam * maps[t] ** 2).sum() for t in range(n_valid, maps.shape[0]))


@pytest.mark.parametrize("seed", range(4))
def test_ordered_loss_equals_brute_force(seed):
    rng = np.random.default_rng(10 + seed)
    n, t, k, s = 4, 5, 4, 5
    maps = rng.random((n, t, s, s)).astype(np.float32)
    masks = (rng.random((n, k, s, s)) > 0.5).astype(np.float32)
    n_valid = [3, 1, 0, 4]
    valid = np.arange(k)[None, :] < np.array(n_valid)[:, None]
    inst, sums, assignment = decomposition_set_loss(maps, masks, valid, lam=0.6, gamma=0.5, order="ordered")
    free, _, _ = decomposition_set_loss(maps, masks, valid, lam=0.6, gamma=0.5)
    for i in range(n):
        assert float(inst[i]) == pytest.approx(_brute_force_ordered(maps[i], masks[i], n_valid[i], 0.6), rel=1e-5)
        # the first n steps hold the n masks, the rest none
        np.testing.assert_array_equal(sorted(assignment.numpy()[i, :n_valid[i]]), list(range(n_valid[i])))
        assert (assignment.numpy()[i, n_valid[i]:] == -1).all()
        assert float(inst[i]) >= float(free[i]) - 1e-4  # a restriction of the free matching, plus black terms
    gt_sum = (masks * valid[:, :, None, None]).sum(1)
    np.testing.assert_allclose(sums, ((gt_sum + 0.5) * (maps.sum(1) - gt_sum) ** 2).sum((1, 2)), rtol=1e-5)


def test_ordered_loss_is_zero_for_a_perfect_ordered_output_only():
    masks = np.zeros((1, 3, 4, 4), np.float32)
    masks[0, 0, :2, :2] = 1
    masks[0, 1, 2:, 2:] = 1
    valid = np.array([[True, True, False]])
    perfect = np.zeros((1, 4, 4, 4), np.float32)
    perfect[0, 0], perfect[0, 1] = masks[0, 1], masks[0, 0]  # the two objects (any order), then black
    inst, sums, _ = decomposition_set_loss(perfect, masks, valid, order="ordered")
    assert float(inst[0]) == 0.0 and float(sums[0]) == 0.0
    late = np.zeros_like(perfect)
    late[0, 1], late[0, 3] = masks[0, 0], masks[0, 1]  # black first: the free loss is blind to it
    free_inst, free_sums, _ = decomposition_set_loss(late, masks, valid)
    assert float(free_inst[0]) == 0.0 and float(free_sums[0]) == 0.0
    inst, _, _ = decomposition_set_loss(late, masks, valid, order="ordered")
    assert float(inst[0]) > 1.0
    with pytest.raises(ValueError, match="order"):
        decomposition_set_loss(late, masks, valid, order="sorted")
