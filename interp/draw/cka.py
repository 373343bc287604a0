"""Linear centred kernel alignment (CKA) between two sets of representations.

For representations ``X`` (``n x p``) and ``Y`` (``n x q``) of the same ``n``
inputs, linear CKA (Kornblith et al., 2019, "Similarity of Neural Network
Representations Revisited", eq. 6) is

.. math:: \\mathrm{CKA}(X, Y) = \\frac{\\lVert Y_c^\\top X_c \\rVert_F^2}
          {\\lVert X_c^\\top X_c \\rVert_F \\, \\lVert Y_c^\\top Y_c \\rVert_F}

with ``X_c``, ``Y_c`` column-centred. It is computed here from the ``n x n``
Gram matrices ``K = X X^T`` and ``L = Y Y^T``, centred as ``H K H``
(``H = I - 11^T/n``): ``CKA = <K_c, L_c>_F / (||K_c||_F ||L_c||_F)``, which is
the same number and costs ``O(n^2)`` memory whatever the feature widths, so a
layer-by-layer matrix needs one Gram matrix per layer. Values lie in [0, 1];
CKA is invariant to orthogonal transforms and isotropic scaling of either side,
and CKA(X, X) = 1.
"""
from __future__ import annotations

import torch

__all__ = ["gram_linear", "center_gram", "cka_from_grams", "linear_cka", "cka_matrix"]


def gram_linear(x: torch.Tensor) -> torch.Tensor:
    """``X X^T`` in float64 for ``x`` of shape ``n x ...`` (flattened per row)."""
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    return x @ x.T


def center_gram(k: torch.Tensor) -> torch.Tensor:
    """``H K H`` with ``H = I - 11^T / n`` (double centring of a Gram matrix)."""
    k = k.to(torch.float64)
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def cka_from_grams(k: torch.Tensor, l: torch.Tensor) -> float:
    """Linear CKA from two ``n x n`` Gram matrices of the same inputs.

    Raises
    ------
    ValueError
        If the shapes differ, there are fewer than 2 inputs, or one side is
        constant over the inputs (its centred Gram matrix is zero, CKA undefined).
    """
    if k.shape != l.shape or k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"CKA needs two n x n Gram matrices of the same inputs, got {tuple(k.shape)} and {tuple(l.shape)}")
    if k.shape[0] < 2:
        raise ValueError("CKA needs at least 2 inputs; use more images (--limit)")
    kc, lc = center_gram(k), center_gram(l)
    nk, nl = torch.linalg.norm(kc), torch.linalg.norm(lc)
    if nk == 0 or nl == 0:
        raise ValueError("CKA is undefined for a representation that is the same for every input (all-zero layer?)")
    return float((kc * lc).sum() / (nk * nl))


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between ``x`` (``n x ...``) and ``y`` (``n x ...``), rows = the same inputs."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same inputs (rows): {x.shape[0]} vs {y.shape[0]}")
    return cka_from_grams(gram_linear(x), gram_linear(y))


def cka_matrix(grams_a: list[torch.Tensor], grams_b: list[torch.Tensor]) -> torch.Tensor:
    """``len(grams_a) x len(grams_b)`` matrix of CKA between every pair of layers' Gram matrices."""
    ca = [center_gram(k) for k in grams_a]
    cb = [center_gram(k) for k in grams_b]
    na = [torch.linalg.norm(k) for k in ca]
    nb = [torch.linalg.norm(k) for k in cb]
    for name, norms in (("first", na), ("second", nb)):
        if any(n == 0 for n in norms):
            raise ValueError(f"a layer of the {name} model is the same for every image: CKA undefined")
    out = torch.empty(len(ca), len(cb), dtype=torch.float64)
    for i, k in enumerate(ca):
        for j, l in enumerate(cb):
            out[i, j] = (k * l).sum() / (na[i] * nb[j])
    return out
