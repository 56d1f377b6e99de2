"""Section 7 of the paper: what the learned update looks like (subspace similarity, amplification).

Three measurements, all plain linear algebra on trained arrays (nothing here is trained):

1. Normalized subspace similarity φ (Section 7.2, eq. 4; Appendix G). How much of the space
   spanned by the top-i singular directions of one adapter matrix A1 lies in the space spanned
   by the top-j of another, A2 (different r, or different seeds: Figures 3 and 4):

       φ(A1, A2, i, j) = ||V1_iᵀ V2_j||_F² / min(i, j) ∈ [0, 1]

2. Projection of W onto ΔW's r-dimensional subspace and the amplification factor (Section 7.3,
   Table 7; Appendix H.4). With ΔW = U Σ Vᵀ:

       ||U_rᵀ W V_r||_F        and        ||ΔW||_F / ||U_rᵀ W V_r||_F

Which singular vectors. The paper names them two ways, and only one is well defined for our A:
- Section 7.2 (eq. 4): "we perform singular value decomposition and obtain the right-singular
  unitary matrices U_{A_r=8} and U_{A_r=64}"; footnote: "a similar analysis can be carried out
  with B and the left-singular unitary matrices".
- Appendix G: U_A^i ∈ R^{d×i} "obtained by taking columns of the left singular matrices of A and B".
A is (r, d_in) (the paper's A ∈ R^{r×k}). Its left singular vectors live in R^r, so those of an
r=8 and an r=64 adapter could not even be multiplied; its right singular vectors live in R^{d_in},
the input space both adapters read from, and have the d-long columns Appendix G describes
(Appendix G reads as if A were stored transposed, (d, r)). We follow Section 7.2: the columns of
V in A = U Σ Vᵀ, which are the rows of NumPy's `Vh`. For B (d_out, r), footnote 7's "left-singular"
analysis is the same function applied to Bᵀ (the left singular vectors of B are the right ones of Bᵀ).

Section 7.3 writes UᵀWVᵀ "with U/V being the left/right singular-vector matrix of ΔW". Its shapes
work when V is the r×d_in matrix whose *rows* are right singular vectors (ΔW = U Σ V, NumPy's
`Vh`), as in Appendix H.4, where "UUᵀWVᵀV gives the projection of W". In the usual notation, with
V's columns the right singular vectors, that is U_rᵀ W V_r, (r, d_out)(d_out, d_in)(d_in, r) = (r, r),
and that is what we compute.

3. φ between the weight and its update (Appendix H.3, Figure 8): the same eq. (4), with the top-i
   singular directions of the pretrained W_q against the top-j of ΔW_q (or of a random matrix, the
   figure's baseline). Which of W's directions does ΔW act on: its top ones, or ones W hardly uses?
   The paper does not say which side's singular vectors its figure uses; weight_similarity_grid
   takes `side` and defaults to the right (input) side, the one eq. (4) uses for A.

Dimension legend: d_in / d_out the adapted weight's input / output width (A is (r, d_in), ΔW and W
are (d_out, d_in)); r, r1, r2 adapter ranks (rows of A); i, j how many top singular directions;
k the number of singular vectors a matrix has, min of its two sides.

References
- Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685v2,
  Section 7.2 eq. (4), Section 7.3 Table 7, Appendix G, Appendix H.3 (Figure 8), Appendix H.4.
- Hamm & Lee 2008 (the paper's "Ham & Lee"), "Grassmann discriminant analysis", ICML: the
  Projection Metric d² = min(i, j) - ||V1_iᵀ V2_j||_F², of which φ = 1 - d²/min(i, j) is "a reverse".
"""

from numbers import Integral

import numpy as np

from ..core.params import check_seed

# ----------------------------------------------------------------------------
# checks and singular vectors shared by both measurements


def _check_matrix(name, M):
    """M as a float64 array, or a clear error. float64 because round-off in a float32 SVD
    (~1e-7) would show up in φ, whose interesting values can be as small as i·j/d."""
    if not isinstance(M, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(M).__name__}")
    if not (np.issubdtype(M.dtype, np.floating) or np.issubdtype(M.dtype, np.integer)):
        raise TypeError(f"{name} must hold real numbers (float or int dtype), got dtype {M.dtype}")
    if M.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got {M.ndim}-D with shape {M.shape}")
    if M.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {M.shape}")
    if not np.all(np.isfinite(M)):
        raise ValueError(f"{name} must be finite, got {np.sum(~np.isfinite(M))} NaN/inf entries")
    return M.astype(np.float64)


def _check_count(name, value, k, matrix_name, shape):
    """A number of top singular directions: an int in 1..k, k = min(shape) of the matrix."""
    if not isinstance(value, Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if not 1 <= value <= k:
        raise ValueError(
            f"{name} must be an int in 1..{k}: {matrix_name} has shape {shape}, so it has {k} singular "
            f"vectors on each side; got {name}={value}"
        )


def _svd(name, M, count_name, count):
    """SVD of M = U·diag(s)·Vh, after checking that its top-`count` subspaces are determined.

    Beyond the numerical rank the singular vectors span the null space in no particular order, so
    "the top-i directions" would be whatever LAPACK returns. A fresh adapter (B = 0, so ΔW = 0) is
    the common case; we refuse rather than return a number that means nothing.
    """
    U, s, Vh = np.linalg.svd(M, full_matrices=False)  # U: (m, k), s: (k,), Vh: (k, n)
    tol = s[0] * max(M.shape) * np.finfo(np.float64).eps  # np.linalg.matrix_rank's default
    rank = int(np.sum(s > tol))
    if rank < count:
        raise ValueError(
            f"{name} (shape {M.shape}) has numerical rank {rank} < {count_name}={count}, so its top-{count} "
            f"singular subspace is not determined; largest singular values: {np.round(s[: count + 1], 6)}"
        )
    return U, s, Vh


# ----------------------------------------------------------------------------
# 1. normalized subspace similarity, eq. (4)


def _right_bases(A1, A2):
    A1 = _check_matrix("A1", A1)
    A2 = _check_matrix("A2", A2)
    if A1.shape[1] != A2.shape[1]:
        raise ValueError(
            f"A1 and A2 must have the same width d_in (their row spaces must live in the same R^d_in), "
            f"got A1 {A1.shape} and A2 {A2.shape}"
        )
    return A1, A2


def subspace_similarity(A1, A2, i, j):
    """Normalized subspace similarity φ(A1, A2, i, j), paper eq. (4):

        φ = ||V1_iᵀ V2_j||_F² / min(i, j)

    V1_i: (d_in, i), the right singular vectors of A1 = U1·Σ1·V1ᵀ for its i largest singular
    values (Section 7.2's "right-singular unitary matrices"; see the module docstring); V2_j
    likewise. ||V1_iᵀ V2_j||_F² is the sum of the squared cosines of the principal angles between
    the two subspaces, so φ is 1 when one subspace contains the other and 0 when they are
    orthogonal (Appendix G). Only the row spaces' top directions matter: B, the scaling s and the
    lengths of A's rows do not enter.

    Inputs:
    - A1: (r1, d_in), e.g. adapters["blocks.0.W_q.A"] of an r=8 run
    - A2: (r2, d_in), e.g. the same name from an r=64 run
    - i: int in 1..min(r1, d_in), top directions of A1
    - j: int in 1..min(r2, d_in), top directions of A2

    Returns:
    - phi: float in [0, 1] (up to round-off, ~1e-15)

    For B (d_out, r), the footnote's "left-singular" version, pass B.T.
    """
    A1, A2 = _right_bases(A1, A2)
    _check_count("i", i, min(A1.shape), "A1", A1.shape)
    _check_count("j", j, min(A2.shape), "A2", A2.shape)
    _, _, Vh1 = _svd("A1", A1, "i", i)
    _, _, Vh2 = _svd("A2", A2, "j", j)
    # V1_iᵀ V2_j = Vh1[:i] @ Vh2[:j].T: rows of Vh are the right singular vectors
    overlap = Vh1[:i] @ Vh2[:j].T  # (i, j): cosines between the two sets of directions
    return float(np.sum(overlap**2) / min(i, j))


def subspace_similarity_grid(A1, A2):
    """φ(A1, A2, i, j) for every i in 1..k1 and j in 1..k2: the heatmaps of Figures 3 and 4.

    One SVD each, then the whole grid at once: with C = V1ᵀ V2 (k1, k2), ||V1_iᵀ V2_j||_F² is the
    sum of C² over its top-left i×j corner, which a cumulative sum along both axes gives for
    every (i, j).

    Inputs:
    - A1: (r1, d_in)
    - A2: (r2, d_in)

    Returns:
    - phi: (k1, k2) with k = min(r, d_in), which is (r1, r2) for any adapter (r <= d_in);
      phi[i - 1, j - 1] = φ(A1, A2, i, j). Row/column 0 is the top singular direction, as the
      paper's figures label it with i = 1 / j = 1.

    Raises ValueError unless A1 and A2 have full rank k1 and k2 (every entry must be determined).
    """
    A1, A2 = _right_bases(A1, A2)
    k1, k2 = min(A1.shape), min(A2.shape)
    _, _, Vh1 = _svd("A1", A1, "min(A1.shape)", k1)
    _, _, Vh2 = _svd("A2", A2, "min(A2.shape)", k2)
    return _phi_grid(Vh1[:k1], Vh2[:k2])


def _phi_grid(V1, V2):
    """φ for every (i, j) from two orthonormal bases, stored as rows, best direction first.

    V1: (k1, n), V2: (k2, n). With C = V1 V2ᵀ (k1, k2), ||V1_iᵀ V2_j||_F² is the sum of C² over
    its top-left i×j corner, which a cumulative sum along both axes gives for every (i, j).
    """
    k1, k2 = len(V1), len(V2)
    C2 = (V1 @ V2.T) ** 2  # (k1, k2): squared cosine between direction a of the first and b of the second
    captured = C2.cumsum(axis=0).cumsum(axis=1)  # (k1, k2): [i-1, j-1] = ||V1_iᵀ V2_j||_F²
    min_ij = np.minimum.outer(np.arange(1, k1 + 1), np.arange(1, k2 + 1))  # (k1, k2)
    return captured / min_ij


def weight_similarity_grid(W, M, i_max, j_max, side="right"):
    """φ(W, M, i, j) of eq. (4) between the top-i singular directions of W and the top-j of M:
    Appendix H.3's Figure 8, with W the pretrained W_q and M its update ΔW_q (or a random matrix,
    the figure's baseline).

    ΔW = s·B·A has rank r, so only its top r directions are determined; W is full rank, and all of
    its directions count: a ΔW whose directions sit at large i acts on what W hardly uses.

    Inputs:
    - W: (d_out, d_in), the pretrained weight
    - M: (d_out, d_in), e.g. ΔW = lora.delta_weight(...), or a random matrix of W's shape
    - i_max: int in 1..min(W.shape), how many of W's top directions (rows of the grid)
    - j_max: int in 1..min(M.shape), at most M's numerical rank (columns of the grid)
    - side: "right" for the singular vectors in R^d_in (columns of V in W = U Σ Vᵀ), "left" for
      those in R^d_out (columns of U)

    Returns:
    - phi: (i_max, j_max), phi[i - 1, j - 1] = φ(W, M, i, j)
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    W = _check_matrix("W", W)
    M = _check_matrix("M", M)
    if W.shape != M.shape:
        raise ValueError(f"W and M must have the same shape (d_out, d_in), got W {W.shape} and M {M.shape}")
    _check_count("i_max", i_max, min(W.shape), "W", W.shape)
    _check_count("j_max", j_max, min(M.shape), "M", M.shape)
    U1, _, Vh1 = _svd("W", W, "i_max", i_max)
    U2, _, Vh2 = _svd("M", M, "j_max", j_max)
    if side == "right":
        return _phi_grid(Vh1[:i_max], Vh2[:j_max])  # rows of Vh: right singular vectors, (i_max, d_in)
    return _phi_grid(U1[:, :i_max].T, U2[:, :j_max].T)  # columns of U, as rows: (i_max, d_out)


# ----------------------------------------------------------------------------
# 2. projection of W onto ΔW's subspace, and the amplification factor (Section 7.3)


def projection_norm(W, M, r):
    """||U_rᵀ W V_r||_F: the size of W inside the top-r singular subspaces of M (Table 7's row).

    U_r: (d_out, r) and V_r: (d_in, r), the left and right singular vectors of M = U·Σ·Vᵀ for its
    r largest singular values. This is the paper's UᵀWVᵀ (Section 7.3), reading its V as the
    r×d_in matrix whose rows are right singular vectors (see the module docstring). U_rᵀ W V_r is
    (r, r), and since U_r, V_r have orthonormal columns its norm equals ||P_U W P_V||_F with
    P_U = U_r U_rᵀ, P_V = V_r V_rᵀ (Appendix H.4's "UUᵀWVᵀV"): the part of W that maps M's top
    input directions to M's top output directions.

    Table 7's three columns are M = ΔW, M = W (which gives sqrt(σ1² + ... + σr²) of W) and M a
    random matrix (random_projection_norm).

    Inputs:
    - W: (d_out, d_in), the pretrained weight
    - M: (d_out, d_in), whose singular vectors span the subspace, usually ΔW = s·B·A
    - r: int in 1..min(d_out, d_in), and at most the numerical rank of M

    Returns:
    - norm: float >= 0
    """
    return _projection(W, M, r, "M")


def _projection(W, M, r, m_name):
    # m_name: what the caller calls M ("M", "dW", or "the random matrix"), so errors name it
    W = _check_matrix("W", W)
    M = _check_matrix(m_name, M)
    if W.shape != M.shape:
        raise ValueError(
            f"W and {m_name} must have the same shape (d_out, d_in), got W {W.shape} and {m_name} {M.shape}"
        )
    _check_count("r", r, min(W.shape), "W", W.shape)
    U, _, Vh = _svd(m_name, M, "r", r)
    # U_rᵀ·W·V_r, with V_r = Vh[:r].T
    return float(np.linalg.norm(U[:, :r].T @ W @ Vh[:r].T))  # (r, d_out)(d_out, d_in)(d_in, r) = (r, r)


def amplification_factor(W, dW, r):
    """Feature amplification factor ||ΔW||_F / ||U_rᵀ W V_r||_F (Section 7.3; Appendix H.4).

    U_r, V_r: the top-r left/right singular vectors of ΔW, as in projection_norm(W, dW, r).
    How much ΔW amplifies the directions of W it acts on: Table 7 reports 6.91 / 0.32 ≈ 21.5 for
    ΔW_q of GPT-3 with r = 4. ΔW includes the LoRA scaling s (use lora.delta_weight), so the
    factor grows linearly with α; it is invariant to the sign of ΔW.

    Inputs:
    - W: (d_out, d_in), the pretrained weight W0
    - dW: (d_out, d_in), the update ΔW = s·B·A
    - r: int, at most the numerical rank of dW; usually the adapter's rank

    Returns:
    - factor: float > 0; inf when W has exactly nothing in ΔW's subspace
    """
    proj = _projection(W, dW, r, "dW")
    if proj == 0.0:
        return float("inf")
    return float(np.linalg.norm(dW) / proj)


def random_projection_norm(W, r, seed):
    """Table 7's "Random" column: projection_norm(W, G, r) for G ~ N(0, 1) of W's shape.

    The singular vectors of a Gaussian matrix are uniformly distributed (Haar) and independent of
    W, so this is W's size in a random pair of r-dimensional subspaces. On average
    E ||U_rᵀ W V_r||_F² = r²·||W||_F² / (d_out·d_in): Table 7's GPT-3 W_q (||W_q||_F = 61.95,
    d = 12288) gives 4·61.95/12288 ≈ 0.020 for r = 4 and 0.32 for r = 64 (reported: 0.02, 0.33).

    Inputs:
    - W: (d_out, d_in)
    - r: int in 1..min(d_out, d_in)
    - seed: int >= 0, for the random matrix

    Returns:
    - norm: float >= 0
    """
    W = _check_matrix("W", W)
    check_seed(seed)
    G = np.random.default_rng(seed).standard_normal(W.shape)  # (d_out, d_in)
    return _projection(W, G, r, "the random matrix")
