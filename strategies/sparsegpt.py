"""SparseGPT: one-shot pruning with OBS weight reconstruction (Frantar & Alistarh, 2023; IST-DASLab/sparsegpt).

For each linear with Hessian H = X Xᵀ of its calibration inputs (``fasterprune`` of the reference):

1. dead inputs (H_jj = 0) get H_jj = 1 and their weights set to 0;
2. dampening: H += λ·I with λ = ``percdamp`` (1%) of the mean diagonal;
3. U = upper Cholesky factor of H⁻¹;
4. columns are processed in blocks of ``blocksize`` (128). Unstructured: in each block the mask takes the
   lowest w²/[U]_jj² of the whole block (adaptive mask selection). N:M: every M columns, per row, the M−N
   lowest of that group. Column by column, the pruned weights are zeroed and the error (w − q)/U_jj is
   propagated to the remaining columns of the block with row j of U, then to later blocks at once.

Two implementations of step 4 (steps 1–3 are the same operations in both, so U is bitwise the same):

- ``fasterprune_reference``: our port of the reference's loop, as written (one matrix at a time, a rank-1 update
  of the whole rest of the block per column, a full stable sort per block for the unstructured mask);
- ``fasterprune_group`` (the default; ``fasterprune`` for one matrix): the same formulas organised for fewer,
  larger tensor operations. (a) Linears that read one input (q/k/v, gate/up) share one Hessian, so one U serves
  them all and their rows are stacked into one column loop (rows never mix; the unstructured mask is still chosen
  per matrix per block). (b) Inside a block, columns go in sub-blocks of ``SUBBLOCK`` (16): rank-1 updates within
  the sub-block, one matrix product for the rest of the block (the reference's lazy update, one level down).
  (c) Per column, three in-place operations on contiguous rows (the block is held transposed) instead of boolean
  indexing, clones and an outer-product temporary. (d) The block's k lowest scores by ``kthvalue`` (linear
  time) instead of a full stable sort, with the sort's tie rule (lower row-major index first): the same mask.

Differences from the reference: it runs in float32 on GPU; we run the solve in float64 (CPU, better
conditioned, same algorithm). The reference's block threshold ``tmp <= sorted[k]`` prunes k+1 weights per
block; we prune exactly ``int(block_numel · sparsity)``. N:M semantics: the reference's ``prunen:prunem`` counts
pruned weights (they coincide for 2:4 and 4:8); ours counts kept weights (NVIDIA's convention). The default path
sums the errors propagated inside a block in another order (by sub-block, with fused multiply-adds), so its
weights equal the reference loop's to float64 rounding (relative differences ~1e-15 on SmolLM2) and its masks are
the same (bitwise, on every tiny family and on real SmolLM2 layers: ``tests/test_sparsegpt_speed.py``);
``SparseGPT(fast=False)`` runs ``fasterprune_reference`` per linear.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prunekit.arch import LinearRef
from prunekit.errors import PrunekitError
from prunekit.masks import lowest_global
from prunekit.observe import Observed
from prunekit.plans import WeightMask
from prunekit.stats import Hessian, Statistic
from prunekit.strategy import PruningStrategy

SUBBLOCK = 16  # columns per inner sub-block of the fast path (a multiple of M for N:M patterns)
STACK_BYTES = 1 << 29  # at most this many bytes of float64 weights stacked into one column loop (512 MiB)


def _check_blocksize(nm: tuple[int, int] | None, blocksize: int) -> None:
    if nm is not None and blocksize % nm[1]:
        raise PrunekitError(f"blocksize={blocksize} must be a multiple of M={nm[1]} for an N:M pattern")


def fasterprune_reference(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune an (out, in) weight given H = X Xᵀ; return (updated weight, mask with True = pruned).

    The reference's loop as it is written (kept to check and time the default ``fasterprune`` against)."""
    _check_blocksize(nm, blocksize)
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


def inverse_factor(hessian: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U = upper Cholesky factor of (H + λI)⁻¹ after the dead-input fix (steps 1–3, the reference's
    operations, so U is bitwise the reference's); ``dead``: the inputs with H_jj = 0."""
    H = hessian.to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True), dead


def lowest_count(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The mask of the ``k`` lowest scores of the whole matrix, ties to the lower row-major index: the same mask
    as ``prunekit.masks.lowest_global`` (a stable sort), found with ``kthvalue`` in linear time."""
    flat = scores.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    if k <= 0:
        return mask.view(scores.shape)
    kth = torch.kthvalue(flat, k).values
    if torch.isnan(kth):  # NaN scores: keep the sort's order (NaN last)
        mask[torch.sort(flat, stable=True)[1][:k]] = True
        return mask.view(scores.shape)
    torch.lt(flat, kth, out=mask)
    ties = k - int(mask.sum())
    if ties:
        equal = flat == kth
        mask |= equal & (equal.cumsum(0) <= ties)
    return mask.view(scores.shape)


def _block_columns(Wb: torch.Tensor, Eb: torch.Tensor, Mb: torch.Tensor, U: torch.Tensor,
                   nm: tuple[int, int] | None) -> None:
    """Steps of one block, in place. ``Wb``: the block's weights as (columns, rows); ``Eb``: receives the scaled
    errors (columns, rows); ``Mb``: the float mask (1 = pruned), filled here group by group for N:M; ``U``: the
    block's diagonal block of the H⁻¹ factor."""
    count, rows = Wb.shape
    d = torch.diag(U)
    divisors = d.tolist()
    ws, es, ms = Wb.unbind(0), Eb.unbind(0), Mb.unbind(0)
    sub = SUBBLOCK if nm is None else max(nm[1], SUBBLOCK // nm[1] * nm[1])
    for s0 in range(0, count, sub):
        s1 = min(s0 + sub, count)
        for i in range(s0, s1):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                scores = Wb[i : i + m].T.square() / d[i : i + m].reshape(1, -1).square()  # (rows, M), as the reference
                pruned = torch.topk(scores, m - n, dim=1, largest=False)[1]
                Mb[i : i + m] = torch.zeros(rows, scores.shape[1], dtype=Mb.dtype).scatter_(1, pruned, 1.0).T
            err = es[i]
            torch.mul(ws[i], ms[i], out=err)  # w − q: the pruned entries, 0 elsewhere
            err.div_(divisors[i])
            if i + 1 < s1:
                Wb[i + 1 : s1].addcmul_(U[i, i + 1 : s1].unsqueeze(1), err, value=-1)
        if s1 < count:
            Wb[s1:].addmm_(U[s0:s1, s1:].T, Eb[s0:s1], alpha=-1)


def _prune_stacked(WT: torch.Tensor, Hinv: torch.Tensor, bounds: list[int], sparsity: float,
                   nm: tuple[int, int] | None, blocksize: int) -> torch.Tensor:
    """Steps 4 on stacked weights stored as (in, out): rows ``bounds[j]:bounds[j+1]`` of the stack (columns of
    ``WT``) are matrix j. In place; returns the mask, also (in, out)."""
    cols, rows = WT.shape
    MT = torch.zeros(cols, rows, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        Wb, U = WT[i1:i2], Hinv[i1:i2, i1:i2]
        if nm is None:
            scores = Wb.T.square() / torch.diag(U).reshape(1, -1).square()  # (rows, count), as the reference
            for a, b in zip(bounds, bounds[1:]):
                MT[i1:i2, a:b] = lowest_count(scores[a:b], int(scores[a:b].numel() * sparsity)).T
            Mf = MT[i1:i2].to(torch.float64)
        else:
            Mf = torch.zeros_like(Wb)
        Eb = torch.empty_like(Wb)
        _block_columns(Wb, Eb, Mf, U, nm)
        if nm is not None:
            MT[i1:i2] = Mf != 0
        Wb.masked_fill_(MT[i1:i2], 0)
        if i2 < cols:
            WT[i2:].addmm_(Hinv[i1:i2, i2:].T, Eb, alpha=-1)
    return MT


def _stacks(sizes: list[int], cols: int) -> list[list[int]]:
    """Consecutive matrices stacked while their float64 copy stays within ``STACK_BYTES`` (at least one each)."""
    out: list[list[int]] = []
    total = 0
    for j, rows in enumerate(sizes):
        if out and total + rows * cols * 8 <= STACK_BYTES:
            out[-1].append(j)
            total += rows * cols * 8
        else:
            out.append([j])
            total = rows * cols * 8
    return out


def fasterprune_group(
    weights: Sequence[torch.Tensor],
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    dtype: torch.dtype = torch.float64,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Prune several (out, in) weights that read the same input (one H = X Xᵀ): per weight, (updated weight in
    ``dtype``, mask with True = pruned) — the masks of ``fasterprune_reference`` on each, the weights to float64
    rounding."""
    _check_blocksize(nm, blocksize)
    Hinv, dead = inverse_factor(hessian, percdamp)
    cols = Hinv.shape[0]
    for w in weights:
        if w.dim() != 2 or w.shape[1] != cols:
            raise PrunekitError(f"weight of shape {tuple(w.shape)} does not read the {cols} inputs of the Hessian")
    sizes = [w.shape[0] for w in weights]
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    for stack in _stacks(sizes, cols):
        bounds = [0]
        for j in stack:
            bounds.append(bounds[-1] + sizes[j])
        WT = torch.empty(cols, bounds[-1], dtype=torch.float64)  # (in, stacked out): a column is a contiguous row
        for j, a, b in zip(stack, bounds, bounds[1:]):
            WT[:, a:b] = weights[j].T
        WT[dead] = 0
        MT = _prune_stacked(WT, Hinv, bounds, sparsity, nm, blocksize)
        for a, b in zip(bounds, bounds[1:]):
            out.append((WT[:, a:b].T.to(dtype, memory_format=torch.contiguous_format),
                        MT[:, a:b].T.contiguous()))
    return out


def fasterprune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune an (out, in) weight given H = X Xᵀ; return (updated weight in float64, mask with True = pruned).
    The fast path (``fasterprune_group`` of one matrix); ``fasterprune_reference`` is the reference's loop."""
    return fasterprune_group([weight], hessian, sparsity, nm, blocksize, percdamp)[0]


class SparseGPT(PruningStrategy):
    """SparseGPT: Hessian-based OBS pruning with weight reconstruction (unstructured or N:M).

    Args (beyond the base ones):
        blocksize: columns per lazy-update block (reference: 128).
        percdamp: dampening as a fraction of the mean Hessian diagonal (reference: 0.01).
        fast: the fast path (``fasterprune_group``: one H⁻¹ factor and one column loop for the linears that read
            the same input); ``false`` runs the reference's loop per linear (``fasterprune_reference``). Same
            masks; weights equal to float64 rounding.
    """

    name = "sparsegpt"
    statistics = {"hessian": Hessian}

    def __init__(self, blocksize: int = 128, percdamp: float = 0.01, fast: bool = True, **kwargs) -> None:
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
        self.blocksize, self.percdamp, self.fast = blocksize, percdamp, bool(fast)

    def decide(self, model, observed: Observed, layer: int | None, context) -> WeightMask:
        """Per linear, as the base class; the fast path prunes the linears sharing one Hessian together."""
        if not self.fast:
            return super().decide(model, observed, layer, context)
        refs = [r for r in self.targets(model) if layer is None or r.layer == layer]
        shared: dict[int, tuple[Hessian, list[LinearRef]]] = {}
        for ref in refs:
            stat = observed.get(ref.name, {}).get("hessian")
            if stat is None:
                raise PrunekitError(f"sparsegpt: no Hessian was observed for {ref.name}")
            shared.setdefault(id(stat), (stat, []))[1].append(ref)
        result: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for stat, group in shared.values():
            dtypes = {r.weight.dtype for r in group}
            dtype = dtypes.pop() if len(dtypes) == 1 else torch.float64
            outs = fasterprune_group([r.weight for r in group], stat.xtx, self.sparsity, self.nm, self.blocksize,
                                     self.percdamp, dtype=dtype)
            for ref, (w, mask) in zip(group, outs):
                result[ref.name] = (mask, w.to(ref.weight.dtype))
        return WeightMask({r.name: result[r.name][0] for r in refs}, {r.name: result[r.name][1] for r in refs})

    def layerwise(self, model) -> bool:
        return True  # one decision per linear (per group of linears of one layer): per-layer decisions compose

    def prune_linear(self, ref: LinearRef, stats: dict[str, Statistic]) -> tuple[torch.Tensor, torch.Tensor]:
        """The mask and the reconstructed weight (a ``WeightMask`` plan carries both)."""
        prune = fasterprune if self.fast else fasterprune_reference
        W, mask = prune(ref.weight, stats["hessian"].xtx, self.sparsity, self.nm, self.blocksize, self.percdamp)
        return mask, W.to(ref.weight.dtype)
