"""Section 7's measurements against known answers and against arithmetic done another way.

The references never call an SVD: subspaces are built from orthonormal bases we choose (QR of a
Gaussian), and projectors come from eigh(AᵀA) or from P = X (XᵀX)⁻¹ Xᵀ, so a test compares the
module with independent arithmetic, not with itself.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from lora_np.analysis import (
    amplification_factor,
    projection_norm,
    random_projection_norm,
    subspace_similarity,
    subspace_similarity_grid,
    weight_similarity_grid,
)
from lora_np.lora import delta_weight

from lora_np import LoraConfig, ModelConfig, init_lora, init_params

seeds = st.integers(0, 2**32 - 1)
TOL = 1e-9  # float64 round-off through one SVD of a small, well-conditioned matrix is ~1e-14


def orthonormal(rng, n, k):
    """(n, k) with orthonormal columns spanning a uniformly random k-dimensional subspace of R^n."""
    Q, _ = np.linalg.qr(rng.normal(size=(n, k)))
    return Q


def invertible(rng, k):
    """(k, k) random matrix, kept well-conditioned by adding a multiple of the identity."""
    return rng.normal(size=(k, k)) + 3.0 * np.eye(k)


def top_right_projector(A, k):
    """Projector onto A's top-k right-singular subspace, from the eigenvectors of AᵀA (no SVD)."""
    _, vecs = np.linalg.eigh(A.T @ A)  # eigenvalues ascending: the last k are the top ones
    V = vecs[:, -k:]  # (d_in, k)
    return V @ V.T


def top_left_projector(A, k):
    """Projector onto A's top-k left-singular subspace: the right one of Aᵀ, from eigh(A Aᵀ)."""
    return top_right_projector(A.T, k)


def span_projector(X):
    """Projector onto the column space of X (n, k) of full column rank: X (XᵀX)⁻¹ Xᵀ."""
    return X @ np.linalg.solve(X.T @ X, X.T)


def assert_close(name, got, want, atol):
    got, want = np.asarray(got), np.asarray(want)
    err = np.abs(got - want)
    assert np.all(err <= atol), (
        f"{name}: shape {got.shape}, max abs error {err.max():.3g} > {atol:.1g}; "
        f"got {got.ravel()[:4]}, want {want.ravel()[:4]}"
    )


# ----------------------------------------------------------------------------
# 1. normalized subspace similarity φ, eq. (4)


@given(r=st.integers(1, 6), extra=st.integers(0, 8), seed=seeds)
def test_identical_subspaces_give_one(r, extra, seed):
    A = np.random.default_rng(seed).normal(size=(r, r + extra))
    phi = subspace_similarity_grid(A, A.copy())
    assert phi.shape == (r, r)
    assert_close("φ(A, A)", phi, np.ones((r, r)), TOL)


@given(r1=st.integers(1, 5), r2=st.integers(1, 5), extra=st.integers(0, 6), seed=seeds)
def test_orthogonal_subspaces_give_zero(r1, r2, extra, seed):
    rng = np.random.default_rng(seed)
    Q = orthonormal(rng, r1 + r2 + extra, r1 + r2)  # (d_in, r1 + r2): two orthogonal blocks
    A1 = invertible(rng, r1) @ Q[:, :r1].T  # (r1, d_in), row space span(Q[:, :r1])
    A2 = invertible(rng, r2) @ Q[:, r1:].T  # (r2, d_in), row space orthogonal to A1's
    assert_close("φ(A1, A2)", subspace_similarity_grid(A1, A2), np.zeros((r1, r2)), TOL)


@given(r=st.integers(1, 6), extra=st.integers(0, 8), seed=seeds)
def test_rotated_basis_of_the_same_row_space_gives_one(r, extra, seed):
    rng = np.random.default_rng(seed)
    A1 = rng.normal(size=(r, r + extra))
    # Orthogonal R: A2 = (R·U1)·Σ1·V1ᵀ has A1's own right singular vectors, so every entry is 1.
    R = orthonormal(rng, r, r)
    assert_close("φ(A1, R·A1), R orthogonal", subspace_similarity_grid(A1, R @ A1), np.ones((r, r)), TOL)
    # Invertible R: the same row space, but other singular directions, so only the whole space
    # (j = r) is certain to contain A1's top-i directions.
    A2 = invertible(rng, r) @ A1
    for i in range(1, r + 1):
        assert_close(f"φ(A1, R·A1, {i}, r)", subspace_similarity(A1, A2, i, r), 1.0, TOL)


@given(r1=st.integers(1, 6), r2=st.integers(1, 6), extra=st.integers(0, 8), seed=seeds)
def test_phi_is_the_trace_of_two_projectors_and_lies_in_unit_interval(r1, r2, extra, seed):
    # ||V1_iᵀ V2_j||_F² = tr(V2_jᵀ V1_i V1_iᵀ V2_j) = tr(P1_i P2_j), with Pk = Vk Vkᵀ from eigh
    rng = np.random.default_rng(seed)
    d_in = max(r1, r2) + extra
    A1, A2 = rng.normal(size=(r1, d_in)), rng.normal(size=(r2, d_in))
    want = np.array(
        [
            [np.trace(top_right_projector(A1, i) @ top_right_projector(A2, j)) / min(i, j) for j in range(1, r2 + 1)]
            for i in range(1, r1 + 1)
        ]
    )  # (r1, r2)
    phi = subspace_similarity_grid(A1, A2)
    assert phi.shape == (r1, r2)
    assert_close("φ grid vs tr(P1 P2)/min(i, j)", phi, want, 1e-8)  # eigh of AᵀA squares the condition number
    assert np.all(phi >= -1e-12) and np.all(phi <= 1 + 1e-12), f"φ outside [0, 1]: {phi.min()}, {phi.max()}"
    i, j = int(rng.integers(1, r1 + 1)), int(rng.integers(1, r2 + 1))
    assert_close(f"φ(A1, A2, {i}, {j})", subspace_similarity(A1, A2, i, j), want[i - 1, j - 1], 1e-8)


@given(r1=st.integers(1, 6), r2=st.integers(1, 6), extra=st.integers(0, 8), seed=seeds)
def test_symmetric_in_its_arguments(r1, r2, extra, seed):
    rng = np.random.default_rng(seed)
    d_in = max(r1, r2) + extra
    A1, A2 = rng.normal(size=(r1, d_in)), rng.normal(size=(r2, d_in))
    assert_close("φ(A1, A2) vs φ(A2, A1)ᵀ", subspace_similarity_grid(A1, A2), subspace_similarity_grid(A2, A1).T, TOL)
    i = min(r1, r2)
    assert_close(f"φ(A1, A2, {i}, {i})", subspace_similarity(A1, A2, i, i), subspace_similarity(A2, A1, i, i), TOL)


@given(r1=st.integers(1, 5), more=st.integers(1, 5), extra=st.integers(0, 6), seed=seeds)
def test_subspace_nested_in_a_larger_one_gives_one(r1, more, extra, seed):
    # The paper's r = 8 vs r = 64 question, in the case where the answer is "all of it".
    rng = np.random.default_rng(seed)
    r2 = r1 + more
    A1 = rng.normal(size=(r1, r2 + extra))
    A2 = invertible(rng, r2) @ np.vstack([A1, rng.normal(size=(more, r2 + extra))])  # row space ⊃ A1's
    for i in range(1, r1 + 1):
        assert_close(f"φ(A1, A2, {i}, r2)", subspace_similarity(A1, A2, i, r2), 1.0, TOL)


@given(i=st.integers(1, 6), j=st.integers(1, 6), d_in=st.integers(400, 1500), seed=seeds)
def test_random_pair_in_high_dimension_gives_about_ij_over_d(i, j, d_in, seed):
    # For independent uniformly random subspaces E||V1ᵀV2||_F² = i·j/d: each of the i·j squared
    # cosines is Beta(1/2, (d-1)/2), mean 1/d, standard deviation ≈ sqrt(2)/d.
    rng = np.random.default_rng(seed)
    A1, A2 = rng.normal(size=(6, d_in)), rng.normal(size=(6, d_in))
    captured = subspace_similarity(A1, A2, i, j) * min(i, j)
    sigma = np.sqrt(2 * i * j) / d_in
    assert abs(captured - i * j / d_in) <= 6 * sigma, f"||V1ᵀV2||² = {captured:.4g}, expected {i * j / d_in:.4g}"


@given(r1=st.integers(1, 4), r2=st.integers(1, 4), extra=st.integers(0, 6), seed=seeds)
def test_left_singular_version_for_B_is_the_function_of_B_transposed(r1, r2, extra, seed):
    # Footnote 7: the same analysis with B and its left singular vectors. At full rank the top
    # r-dimensional left subspace of B (d_out, r) is its column space, whose projector needs no SVD.
    rng = np.random.default_rng(seed)
    d_out = max(r1, r2) + extra
    B1, B2 = rng.normal(size=(d_out, r1)), rng.normal(size=(d_out, r2))
    want = np.trace(span_projector(B1) @ span_projector(B2)) / min(r1, r2)
    assert_close("φ(B1ᵀ, B2ᵀ, r1, r2)", subspace_similarity(B1.T, B2.T, r1, r2), want, 1e-9)


# ----------------------------------------------------------------------------
# 1b. φ between a weight and its update (Appendix H.3, Figure 8)


@given(d_out=st.integers(2, 9), d_in=st.integers(2, 9), r=st.integers(1, 4), side=st.sampled_from(["right", "left"]),
       seed=seeds)  # fmt: skip
def test_weight_similarity_is_the_trace_of_two_projectors(d_out, d_in, r, side, seed):
    # W full rank, M = B·A of rank r: φ(W, M, i, j) = tr(P_W,i P_M,j)/min(i, j), projectors from eigh (no SVD)
    rng = np.random.default_rng(seed)
    r = min(r, d_out, d_in)
    W = rng.normal(size=(d_out, d_in))
    M = rng.normal(size=(d_out, r)) @ rng.normal(size=(r, d_in))  # (d_out, d_in), rank r
    k = min(d_out, d_in)
    proj = top_right_projector if side == "right" else top_left_projector
    want = np.array([[np.trace(proj(W, i) @ proj(M, j)) / min(i, j) for j in range(1, r + 1)] for i in range(1, k + 1)])
    got = weight_similarity_grid(W, M, k, r, side=side)
    assert got.shape == (k, r)
    assert_close(f"φ(W, M) {side} side vs tr(P1 P2)/min(i, j)", got, want, 1e-7)  # eigh squares the condition number


@given(st.data())
def test_update_along_W_own_directions_counts_the_shared_ones(data):
    # ΔW built from W's singular pairs number idx (any of them, the weakest included), strongest
    # first by |c|: its top-j directions are W's directions idx[:j], so φ(W, ΔW, i, j) counts how
    # many of them are among W's top i: |{0..i-1} ∩ idx[:j]| / min(i, j), on either side
    rng = np.random.default_rng(data.draw(seeds))
    d_out, d_in = data.draw(st.integers(2, 8)), data.draw(st.integers(2, 8))
    k = min(d_out, d_in)
    s = np.arange(k, 0, -1) + 0.5  # distinct singular values, descending
    Q1, Q2 = orthonormal(rng, d_out, k), orthonormal(rng, d_in, k)
    W = Q1 @ np.diag(s) @ Q2.T  # (d_out, d_in)
    idx = np.array(data.draw(st.permutations(range(k)))[: data.draw(st.integers(1, k))])
    c = np.arange(len(idx), 0, -1) * 2.0 * rng.choice([-1.0, 1.0], size=len(idx))  # |c| distinct, descending
    dW = Q1[:, idx] @ np.diag(c) @ Q2[:, idx].T  # (d_out, d_in), rank len(idx)
    want = np.array([[len(set(range(i)) & set(idx[:j].tolist())) / min(i, j) for j in range(1, len(idx) + 1)]
                     for i in range(1, k + 1)])  # fmt: skip
    for side in ("right", "left"):
        assert_close(f"φ(W, ΔW) {side}, ΔW on W's directions {idx.tolist()}",
                     weight_similarity_grid(W, dW, k, len(idx), side=side), want, TOL)  # fmt: skip


# ----------------------------------------------------------------------------
# 2. projection of W onto ΔW's subspace, amplification factor (Section 7.3)


@st.composite
def weights_with_known_svd(draw):
    """W = Q1·diag(s)·Q2ᵀ with chosen, distinct singular values s (descending), and the factors."""
    d_out, d_in = draw(st.integers(2, 9)), draw(st.integers(2, 9))
    rng = np.random.default_rng(draw(seeds))
    k = min(d_out, d_in)
    s = np.sort(rng.uniform(0.5, 5.0, size=k))[::-1] + np.arange(k, 0, -1) * 0.1  # distinct
    Q1, Q2 = orthonormal(rng, d_out, d_out), orthonormal(rng, d_in, d_in)  # full bases
    W = Q1[:, :k] @ np.diag(s) @ Q2[:, :k].T  # (d_out, d_in)
    return W, s, Q1, Q2, rng


@given(weights_with_known_svd(), st.data())
def test_delta_built_from_W_own_directions_projects_to_their_singular_values(setup, data):
    W, s, Q1, Q2, rng = setup
    k = len(s)
    # any r of W's singular pairs, not only the top ones: ΔW "amplifies directions not emphasized in W"
    idx = np.array(data.draw(st.lists(st.integers(0, k - 1), min_size=1, max_size=k, unique=True)))
    r = len(idx)
    c = rng.uniform(0.1, 10.0, size=r) * rng.choice([-1.0, 1.0], size=r)  # ΔW's own strengths, any sign
    dW = Q1[:, idx] @ np.diag(c) @ Q2[:, idx].T  # (d_out, d_in), rank r
    # U_rᵀ W V_r = diag(s[idx]) up to signs and order, so its norm is sqrt(Σ s[idx]²)
    want = np.sqrt(np.sum(s[idx] ** 2))
    assert_close("||U_rᵀ W V_r||_F", projection_norm(W, dW, r), want, TOL * want)
    want_factor = np.sqrt(np.sum(c**2)) / want
    assert_close("amplification", amplification_factor(W, dW, r), want_factor, TOL * want_factor)
    # Table 7's middle column: W projected on its own top r directions
    want_top = np.sqrt(np.sum(s[:r] ** 2))
    assert_close("||U_rᵀ W V_r||_F with M = W", projection_norm(W, W, r), want_top, TOL * want_top)


@given(weights_with_known_svd(), st.data())
def test_delta_orthogonal_to_W_gives_zero_projection(setup, data):
    _, s, Q1, Q2, rng = setup
    d_out, d_in = Q1.shape[0], Q2.shape[0]
    k = len(s)
    if k < 2:
        return  # no room for both a W and a ΔW orthogonal to it
    k0 = data.draw(st.integers(1, k - 1))  # W lives in the first k0 directions
    r = data.draw(st.integers(1, k - k0))  # ΔW in r of the others
    W = Q1[:, :k0] @ np.diag(s[:k0]) @ Q2[:, :k0].T  # (d_out, d_in), rank k0
    free_in = rng.normal(size=(r, d_in))  # one side arbitrary: one orthogonal side is enough
    free_out = rng.normal(size=(d_out, r))
    dW_col = Q1[:, k0 : k0 + r] @ free_in  # columns ⊥ W's column space: U_rᵀ W = 0
    dW_row = free_out @ Q2[:, k0 : k0 + r].T  # rows ⊥ W's row space: W V_r = 0
    for name, dW in (("column", dW_col), ("row", dW_row)):
        assert_close(f"projection with ΔW ⊥ W's {name} space", projection_norm(W, dW, r), 0.0, 1e-12 * s[0])
        assert amplification_factor(W, dW, r) > 1e10


@given(weights_with_known_svd(), st.data())
def test_scaling_delta_by_c_scales_the_factor_by_abs_c(setup, data):
    W, s, _, _, rng = setup
    r = data.draw(st.integers(1, len(s)))
    dW = rng.normal(size=(W.shape[0], r)) @ rng.normal(size=(r, W.shape[1]))  # rank r
    c = data.draw(st.floats(0.01, 100.0)) * data.draw(st.sampled_from([-1.0, 1.0]))
    base = amplification_factor(W, dW, r)
    # the subspace does not move, so the projection does not change; only ||ΔW||_F does
    assert_close("projection of c·ΔW", projection_norm(W, c * dW, r), projection_norm(W, dW, r), 1e-9 * s[0])
    assert_close("factor of c·ΔW", amplification_factor(W, c * dW, r), abs(c) * base, 1e-9 * abs(c) * base)


@given(
    d_model=st.sampled_from([4, 6, 8]),
    d_mlp=st.integers(4, 10),
    target=st.sampled_from(["W_q", "W_v", "W_1", "W_2"]),
    r=st.integers(1, 4),
    seed=st.integers(0, 2**31),
)
def test_projection_of_a_lora_update_matches_explicit_projectors(d_model, d_mlp, target, r, seed):
    # ΔW = s·B·A has column space span(B) and row space span(Aᵀ), so
    # ||U_rᵀ W V_r||_F = ||P_B W P_A||_F with P_B = B(BᵀB)⁻¹Bᵀ, P_A = Aᵀ(AAᵀ)⁻¹A: no SVD needed.
    cfg = ModelConfig(vocab_size=5, context_length=4, d_model=d_model, n_heads=1, n_layers=1, d_mlp=d_mlp)
    lora = LoraConfig(r=r, alpha=2.0 * r, targets=(target,))
    params = init_params(cfg, seed)
    adapters = init_lora(cfg, lora, seed + 1)
    name = f"blocks.0.{target}"
    adapters[name + ".B"] = np.random.default_rng(seed).normal(size=adapters[name + ".B"].shape)  # "trained"
    W, A, B = params[name], adapters[name + ".A"], adapters[name + ".B"]
    dW = delta_weight(adapters, lora, name)  # (d_out, d_in)
    want = np.linalg.norm(span_projector(B) @ W @ span_projector(A.T))
    assert_close(f"projection for {name}", projection_norm(W, dW, r), want, 1e-9 * np.linalg.norm(W))
    want_factor = np.linalg.norm(lora.scaling * B @ A) / want
    assert_close(f"amplification for {name}", amplification_factor(W, dW, r), want_factor, 1e-8 * want_factor)


@pytest.mark.parametrize("shape, r", [((20, 30), 3), ((16, 16), 1)])
def test_random_projection_averages_to_r_norm_W_over_sqrt_d_out_d_in(shape, r):
    # Random (Haar) U_r, V_r independent of W: E||U_rᵀ W V_r||_F² = r²·||W||_F²/(d_out·d_in).
    W = np.random.default_rng(7).normal(size=shape)
    sq = np.array([random_projection_norm(W, r, seed) ** 2 for seed in range(400)])
    want = r**2 * np.sum(W**2) / (shape[0] * shape[1])
    # the mean of 400 draws: relative standard error ~0.02-0.07 for these shapes; allow about 4 of them
    assert abs(sq.mean() - want) <= 0.25 * want, f"mean of ||U_rᵀ W V_r||² = {sq.mean():.4g}, expected {want:.4g}"
    assert random_projection_norm(W, r, 3) == random_projection_norm(W, r, 3), "the same seed must give the same value"
    assert random_projection_norm(W, r, 3) != random_projection_norm(W, r, 4)


# ----------------------------------------------------------------------------
# bad input names the argument, the value and what is allowed

A_GOOD = np.random.default_rng(0).normal(size=(3, 8))


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: subspace_similarity([[1.0, 2.0]], A_GOOD, 1, 1), TypeError, r"A1 must be a numpy array, got list"),
        (lambda: subspace_similarity(A_GOOD, A_GOOD.astype(complex), 1, 1), TypeError, r"A2 must hold real numbers"),
        (lambda: subspace_similarity(A_GOOD[0], A_GOOD, 1, 1), ValueError, r"A1 must be a 2-D matrix, got 1-D"),
        (lambda: subspace_similarity_grid(A_GOOD, A_GOOD[None]), ValueError, r"A2 must be a 2-D matrix, got 3-D"),
        (lambda: subspace_similarity(A_GOOD, A_GOOD[:, :5], 1, 1), ValueError, r"same width d_in.*\(3, 8\).*\(3, 5\)"),
        (lambda: subspace_similarity(A_GOOD, A_GOOD, 0, 1), ValueError, r"i must be an int in 1\.\.3.*got i=0"),
        (lambda: subspace_similarity(A_GOOD, A_GOOD, 1, 4), ValueError, r"j must be an int in 1\.\.3.*got j=4"),
        (lambda: subspace_similarity(A_GOOD, A_GOOD, 1.0, 1), TypeError, r"i must be an int, got 1\.0"),
        (lambda: subspace_similarity(A_GOOD, A_GOOD, True, 1), TypeError, r"i must be an int, got True"),
        (lambda: subspace_similarity(A_GOOD * np.nan, A_GOOD, 1, 1), ValueError, r"A1 must be finite"),
        (lambda: subspace_similarity(np.zeros((3, 8)), A_GOOD, 1, 1), ValueError, r"A1 .* numerical rank 0 < i=1"),
        (lambda: projection_norm(np.eye(4), np.eye(5), 1), ValueError, r"same shape.*W \(4, 4\) and M \(5, 5\)"),
        (
            lambda: projection_norm(np.eye(4), np.eye(4), 5),
            ValueError,
            r"r must be an int in 1\.\.4: W has shape \(4, 4\).*got r=5",
        ),
        (lambda: amplification_factor(np.eye(4), np.zeros((4, 4)), 1), ValueError, r"dW .* numerical rank 0 < r=1"),
        (lambda: amplification_factor(np.eye(4), np.eye(3), 1), ValueError, r"W and dW must have the same shape"),
        (lambda: random_projection_norm(np.eye(4), 0, 1), ValueError, r"r must be an int in 1\.\.4.*got r=0"),
        (lambda: random_projection_norm(np.eye(4), 1, -1), ValueError, r"seed must be an int >= 0, got -1"),
        (
            lambda: weight_similarity_grid(np.eye(4), np.eye(4), 1, 1, side="up"),
            ValueError,
            r"side must be 'right' or 'left', got 'up'",
        ),
        (lambda: weight_similarity_grid(np.eye(4), np.eye(3), 1, 1), ValueError, r"W and M must have the same shape"),
        (
            lambda: weight_similarity_grid(np.eye(4), np.eye(4), 5, 1),
            ValueError,
            r"i_max must be an int in 1\.\.4.*i_max=5",
        ),
        (
            lambda: weight_similarity_grid(np.eye(4), np.outer(np.ones(4), np.ones(4)), 4, 2),
            ValueError,
            r"M \(shape \(4, 4\)\) has numerical rank 1 < j_max=2",
        ),
    ],
)
def test_bad_input_is_named(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_a_fresh_adapter_has_no_subspace_to_measure():
    # B = 0 at init, so ΔW = 0: its "top-r singular vectors" would be arbitrary; refuse, say why
    W = np.random.default_rng(0).normal(size=(6, 6))
    B, A = np.zeros((6, 2)), np.random.default_rng(1).normal(size=(2, 6))
    with pytest.raises(ValueError, match=r"M \(shape \(6, 6\)\) has numerical rank 0 < r=2.*not determined"):
        projection_norm(W, B @ A, 2)
