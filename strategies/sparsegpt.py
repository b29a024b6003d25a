"""SparseGPT: one-shot pruning with OBS weight reconstruction (Frantar & Alistarh, 2023; IST-DASLab/sparsegpt).

For each linear with Hessian H = X Xᵀ of its calibration inputs (``fasterprune`` of the reference):

1. dead inputs (H_jj = 0) get H_jj = 1 and their weights set to 0;
2. dampening: H += λ·I with λ = ``percdamp`` (1%) of the mean diagonal;
3. U = upper Cholesky factor of H⁻¹;
4. columns are processed in blocks of ``blocksize`` (128). Unstructured: in each block the mask takes the
   lowest w²/[U]_jj² of the whole block (adaptive mask selection). N:M: every M columns, per row, the M−N
   lowest of that group. Column by column, the pruned weights are zeroed and the error (w − q)/U_jj is
   propagated to the remaining columns of the block with row j of U, then to later blocks at once.

Differences: the reference runs in float32 on GPU; we run the solve in float64 (CPU, better conditioned,
same algorithm). The reference's block threshold ``tmp <= sorted[k]`` prunes k+1 weights per block; we prune
exactly ``int(block_numel · sparsity)``. N:M semantics: the reference's ``prunen:prunem`` counts pruned weights
(they coincide for 2:4 and 4:8); ours counts kept weights (NVIDIA's convention).
"""

from __future__ import annotations

import torch

from prunekit.arch import LinearRef
from prunekit.errors import PrunekitError
from prunekit.masks import lowest_global
from prunekit.stats import Hessian, Statistic
from prunekit.strategy import PruningStrategy


def fasterprune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune an (out, in) weight given H = X Xᵀ; return (updated weight, mask with True = pruned)."""
    if nm is not None and blocksize % nm[1]:
        raise PrunekitError(f"blocksize={blocksize} must be a multiple of M={nm[1]} for an N:M pattern")
    W = weight.to(torch.float64).clone()
    H = hessian.to(torch.float64).clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    H += damp * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        if nm is None:
            mask1 = lowest_global(W1.square() / d1.reshape(1, -1).square(), sparsity)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                tmp = W1[:, i : i + m].square() / d1[i : i + m].reshape(1, -1).square()
                mask1.scatter_(1, i + torch.topk(tmp, m - n, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W, mask


class SparseGPT(PruningStrategy):
    """SparseGPT: Hessian-based OBS pruning with weight reconstruction (unstructured or N:M).

    Args (beyond the base ones):
        blocksize: columns per lazy-update block (reference: 128).
        percdamp: dampening as a fraction of the mean Hessian diagonal (reference: 0.01).
    """

    name = "sparsegpt"
    statistics = {"hessian": Hessian}

    def __init__(self, blocksize: int = 128, percdamp: float = 0.01, **kwargs) -> None:
        super().__init__(**kwargs)
        if blocksize < 1:
            raise PrunekitError(f"blocksize must be >= 1, got {blocksize}")
        if percdamp < 0:
            raise PrunekitError(f"percdamp must be >= 0, got {percdamp}")
        if self.nm is not None and blocksize % self.nm[1]:
            raise PrunekitError(
                f"blocksize={blocksize} must be a multiple of M={self.nm[1]} for the {self.pattern} pattern "
                "(N:M groups are aligned within blocks, as in the reference)"
            )
        self.blocksize, self.percdamp = blocksize, percdamp

    def prune_linear(self, ref: LinearRef, stats: dict[str, Statistic]) -> tuple[torch.Tensor, torch.Tensor]:
        """The mask and the reconstructed weight (a ``WeightMask`` plan carries both)."""
        W, mask = fasterprune(ref.weight, stats["hessian"].xtx, self.sparsity, self.nm, self.blocksize, self.percdamp)
        return mask, W.to(ref.weight.dtype)
