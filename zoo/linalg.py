"""Principal axes of a symmetric matrix, the one copy shared by PPCA's maximum-likelihood
solution and the figures that project data or codes on a plane."""

from __future__ import annotations

import torch
from torch import Tensor


def principal_axes(S: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
    """The k largest eigenvalues ``Lambda: [k]`` of a symmetric ``S: [D, D]``, in descending
    order, and their eigenvectors ``U: [D, k]`` (all D when ``k`` is None), each vector signed
    so that its entry of largest magnitude is positive: the answer does not depend on the
    eigensolver's signs."""
    Lambda, U = torch.linalg.eigh(S)                            # ascending
    k = S.shape[-1] if k is None else k
    Lambda, U = Lambda.flip(-1)[:k], U.flip(-1)[:, :k]           # descending
    return Lambda, U * U.gather(0, U.abs().argmax(0, keepdim=True)).sign()
