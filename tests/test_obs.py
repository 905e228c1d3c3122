"""OBS math against brute force on random matrices."""
import itertools

import pytest
import torch

from slimc import obs
from slimc.errors import SlimcError


def _problem(out=6, d_in=12, n=200, seed=0, correlated=True):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    if correlated:  # correlated inputs make grouped and per-column scores differ
        X = X @ torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    W = torch.randn(out, d_in, generator=g, dtype=torch.float64)
    H = 2 / n * X.T @ X
    return W, X, H


def _lstsq_error(W, X, keep):
    """Brute force: best reconstruction of W X^T from the kept input columns alone."""
    target = X @ W.T
    sol = torch.linalg.lstsq(X[:, keep], target).solution  # [k, out]
    resid = target - X[:, keep] @ sol
    return resid.pow(2).sum(), sol.T


def test_group_error_equals_explicit_block_obs():
    W, _, H = _problem()
    Hinv = torch.linalg.inv(H)
    groups = torch.arange(12).view(4, 3)
    got = obs.group_errors(W, Hinv, groups)
    for gi, P in enumerate(groups):
        block_inv = torch.linalg.inv(Hinv[P][:, P])
        expected = torch.einsum("rp,pq,rq->", W[:, P], block_inv, W[:, P])
        assert torch.allclose(got[gi], expected, rtol=1e-9)


def test_group_error_is_half_scaled_reconstruction_error():
    """E(P) with H = 2/n X^T X equals 2/n times the least-squares reconstruction error of dropping P."""
    W, X, H = _problem(n=300)
    Hinv = torch.linalg.inv(H)
    P = torch.tensor([1, 5, 7])
    keep = torch.tensor([i for i in range(12) if i not in P.tolist()])
    err, _ = _lstsq_error(W, X, keep)
    assert torch.allclose(obs.group_errors(W, Hinv, P[None])[0], 2 / 300 * err, rtol=1e-8)


def test_obs_update_equals_least_squares_optimum():
    W, X, H = _problem()
    Hinv = torch.linalg.inv(H)
    P = torch.tensor([0, 4, 9])
    keep = torch.tensor([i for i in range(12) if i not in P.tolist()])
    W_new, Hinv_new = obs.obs_remove(W, Hinv, P)
    _, W_ls = _lstsq_error(W, X, keep)
    assert torch.allclose(W_new[:, keep], W_ls, atol=1e-8)
    assert torch.all(W_new[:, P] == 0)
    # the updated Hinv is the inverse of H restricted to the kept columns
    assert torch.allclose(Hinv_new[keep][:, keep], torch.linalg.inv(H[keep][:, keep]), atol=1e-8)


def test_remove_columns_with_a_given_selection_is_the_least_squares_optimum():
    """A selection made elsewhere (learned masks): the kept columns are refit by least squares, the error is
    the joint OBS error (2/n x the residual), a dead input costs nothing and its column goes to zero."""
    W, X, H = _problem(n=300)
    X[:, 3] = 0  # a dead input: never active on the calibration text
    H = 2 / 300 * X.T @ X
    kept = torch.tensor([7, 0, 2, 3, 5, 8, 10, 11])  # unsorted on purpose
    r = obs.remove_columns(W, H, kept, percdamp=0.0)
    assert r.kept.tolist() == sorted(kept.tolist()) and r.removal_order == [1, 4, 6, 9]
    alive = torch.tensor([0, 2, 5, 7, 8, 10, 11])
    err, W_ls = _lstsq_error(W, X, alive)
    assert torch.allclose(r.weight[:, alive], W_ls, atol=1e-8)
    assert torch.all(r.weight[:, [1, 3, 4, 6, 9]] == 0)
    assert r.error == pytest.approx(2 / 300 * float(err), rel=1e-6)
    assert obs.remove_columns(W, H, torch.arange(12)).weight.equal(W)  # nothing to remove


def test_compensation_lowers_reconstruction_error():
    W, X, H = _problem(out=8, d_in=16, n=400, seed=3)
    units = torch.arange(16).view(4, 4)
    comp = obs.prune_units_greedy(W, H, units, 2, percdamp=0.0)
    plain = obs.prune_units_greedy(W, H, units, 2, compensate=False, percdamp=0.0)
    assert torch.equal(comp.kept, plain.kept)
    err = lambda W2: (X @ W.T - X @ W2.T).pow(2).sum()  # noqa: E731
    assert err(comp.weight) < 0.9 * err(plain.weight)


@pytest.mark.parametrize("seed", range(4))
def test_greedy_single_removal_is_exhaustive_optimum(seed):
    W, X, H = _problem(seed=seed)
    units = torch.arange(12).view(4, 3)
    res = obs.prune_units_greedy(W, H, units, 1, percdamp=0.0)
    errors = []
    for u in range(4):
        keep = torch.cat([units[i] for i in range(4) if i != u])
        errors.append(_lstsq_error(W, X, keep)[0])
    assert res.removal_order == [int(torch.stack(errors).argmin())]


def test_batched_greedy_with_batch_one_equals_one_at_a_time():
    W, _, H = _problem(d_in=18, seed=5)
    units = torch.arange(18).view(6, 3)
    batched = obs.prune_units_greedy(W, H, units, 3, batch=1)
    # one at a time, by hand: remove the cheapest unit, update, re-score
    Hinv = obs.inverse_hessian(H, 0.01)
    Wc, alive, order = W.clone(), list(range(6)), []
    for _ in range(3):
        err = obs.group_errors(Wc, Hinv, units[alive])
        u = alive[int(err.argmin())]
        Wc, Hinv = obs.obs_remove(Wc, Hinv, units[u])
        alive.remove(u)
        order.append(u)
    assert batched.removal_order == order
    assert torch.allclose(batched.weight, Wc)


def test_grouped_score_beats_column_score_on_correlated_inputs():
    """Scoring heads as a whole should never choose a worse head than summing independent column errors."""
    wins = 0
    for seed in range(10):
        W, X, H = _problem(out=4, d_in=16, n=400, seed=seed)
        units = torch.arange(16).view(4, 4)
        grouped = obs.prune_units_greedy(W, H, units, 1, score="grouped", percdamp=0.0)
        column = obs.prune_units_greedy(W, H, units, 1, score="column", percdamp=0.0)
        e = lambda r: (X @ W.T - X @ r.weight.T).pow(2).sum()  # noqa: E731
        assert e(grouped) <= e(column) + 1e-9
        wins += bool(e(grouped) < e(column) - 1e-9)
    assert wins > 0


def test_partitioned_removal_is_even():
    W, _, H = _problem(d_in=24, seed=2)
    units = torch.arange(24).view(8, 3)
    partition = torch.arange(8) // 4  # two groups of four heads
    res = obs.prune_units_greedy(W, H, units, 4, partition=partition)
    assert torch.bincount(partition[res.kept], minlength=2).tolist() == [2, 2]


def test_dynamic_group_sizes_shrink_and_sum():
    sizes = obs.dynamic_group_sizes(1000, max_group=256, min_group=8)
    assert sum(sizes) == 1000
    assert sizes[0] == 256 and sizes[-1] <= 8
    assert all(a >= b for a, b in zip(sizes, sizes[1:]))


def test_column_pruning_matches_brute_force_for_single_column():
    W, X, H = _problem(seed=7)
    res = obs.prune_columns_dynamic(W, H, 1, percdamp=0.0)
    errs = [_lstsq_error(W, X, torch.tensor([j for j in range(12) if j != i]))[0] for i in range(12)]
    assert res.removal_order == [int(torch.stack(errs).argmin())]


def test_column_pruning_compensation_near_least_squares():
    W, X, H = _problem(out=5, d_in=20, n=500, seed=9)
    res = obs.prune_columns_dynamic(W, H, 8, max_group=4, min_group=2, percdamp=0.0)
    err_obs = (X @ W.T - X @ res.weight.T).pow(2).sum()
    err_ls, _ = _lstsq_error(W, X, res.kept)
    assert torch.allclose(err_obs, err_ls, rtol=1e-6)  # joint OBS removals stay exactly optimal for the kept set


def test_singular_hessian_retries_with_more_damping():
    X = torch.randn(3, 10, dtype=torch.float64)  # rank 3 < 10: singular, dead columns included
    X[:, 4] = 0
    H = X.T @ X
    Hinv = obs.inverse_hessian(H, percdamp=0.0)
    assert torch.isfinite(Hinv).all()


def test_hopeless_hessian_raises_clear_error():
    H = torch.full((4, 4), float("nan"), dtype=torch.float64)
    with pytest.raises(SlimcError, match="singular"):
        obs.inverse_hessian(H)


def test_exhaustive_two_of_four_units_close_to_greedy():
    """Greedy is not exact for several removals, but on small problems it must be near the optimum."""
    W, X, H = _problem(d_in=12, n=300, seed=11)
    units = torch.arange(12).view(4, 3)
    res = obs.prune_units_greedy(W, H, units, 2, percdamp=0.0)
    best = min(_lstsq_error(W, X, torch.cat([units[k] for k in range(4) if k not in c]))[0]
               for c in itertools.combinations(range(4), 2))
    got = (X @ W.T - X @ res.weight.T).pow(2).sum()
    assert got <= 1.5 * best


def _correlated_heads(seed=0):
    """4 query heads of 2 columns in 2 KV groups (heads 0,1 | 2,3); head 2's inputs copy head 0's (plus a
    little noise), so either can go alone almost for free -- but not both."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(600, 8, generator=g, dtype=torch.float64)
    X[:, 4:6] = X[:, 0:2] + 0.01 * torch.randn(600, 2, generator=g, dtype=torch.float64)
    W = torch.randn(6, 8, generator=g, dtype=torch.float64)
    W[:, 2:4] *= 0.8  # heads 1 and 3: independent and of moderate importance
    W[:, 6:8] *= 0.8
    H = 2 / 600 * X.T @ X
    units = torch.arange(8).view(4, 2)
    return W, H, units, torch.tensor([0, 0, 1, 1]), X


def test_sequential_gqa_greedy_is_never_worse_than_joint_on_correlated_heads():
    for seed in range(5):
        W, H, units, part, X = _correlated_heads(seed)
        joint = obs.prune_units_greedy(W, H, units, 2, partition=part, percdamp=0.0)
        seq = obs.prune_units_greedy(W, H, units, 2, partition=part, percdamp=0.0, sequential=True)

        def true_error(res):  # squared output error on the calibration inputs, recomputed from scratch
            return float(((X @ W.T - X @ res.weight.T) ** 2).sum() * 2 / 600)

        assert true_error(seq) <= true_error(joint) * (1 + 1e-9)
        assert sorted(torch.bincount(torch.tensor(seq.removal_order) // 2, minlength=2).tolist()) == [1, 1]
    # the constructed case: joint removes both copies (each looked free alone), sequential keeps one
    W, H, units, part, X = _correlated_heads(0)
    joint = obs.prune_units_greedy(W, H, units, 2, partition=part, percdamp=0.0)
    seq = obs.prune_units_greedy(W, H, units, 2, partition=part, percdamp=0.0, sequential=True)
    assert sorted(joint.removal_order) == [0, 2] and sorted(seq.removal_order) != [0, 2]
    assert seq.error < 0.75 * joint.error  # 17.7 vs 29.0 here


def test_dead_columns_are_scored_free_and_zeroed():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(300, 6, generator=g, dtype=torch.float64)
    X[:, 3] = 0.0  # an input that never fires on the calibration text
    H = 2 / 300 * X.T @ X
    W = torch.randn(4, 6, generator=g, dtype=torch.float64)
    W[:, 3] = 50.0  # huge weights on it: scored by weight size it would be kept first
    r = obs.prune_columns_dynamic(W, H, 1)
    assert r.removal_order == [3] and r.error == pytest.approx(0.0, abs=1e-12)
    assert obs.without_dead_columns(W, H)[:, 3].abs().sum() == 0
    heads = obs.prune_units_greedy(W, H, torch.arange(6).view(3, 2), 1)
    assert heads.removal_order == [1]  # the unit holding the dead column is the cheap one


def test_ffn_group_schedule_starts_moderate_and_shrinks():
    assert obs.dynamic_group_sizes(641)[0] == 321  # the default: half of all removals in the first round
    sizes = obs.dynamic_group_sizes(641, max_group=64, min_group=8)
    assert sum(sizes) == 641 and sizes[0] == 64 and max(sizes) == 64 and sizes[-1] <= 8
    assert all(a >= b for a, b in zip(sizes, sizes[1:]))
