"""A matrix W = left·right (rank k), or W = base + left·right, that a model reads without its dense m × n copy.

`LowRankWeight(left, right)` (left m × k, right k × n) is swapped into a module like any cut tensor; with `base` (an
m × n tensor the model holds anyway, e.g. its own untouched weight) it stands for base + left·right, which is how a
truncation that removes only a few components is held: W_k = W − (removed components), no new m × n buffer. Through
`__torch_function__` the operations models use on weights are rewritten:
- `F.linear(x, W, b)` = x·Wᵀ + b as (x·rightᵀ)·leftᵀ + b: k(m + n) multiply-adds per row instead of m·n;
- `F.embedding(ids, W)` = W[ids] as left[ids]·right;
- `x @ W`, `torch.mm(x, W)`, `torch.addmm(b, x, W)` (Hugging Face's Conv1D) as (x·left)·right;
each plus the same operation on `base` where there is one. Shape, dtype and device queries answer from the wrapper;
any other operation sees the dense matrix, so a model that does something unusual with a weight is still right, only
not faster. `dense()` gives the matrix itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

RESIDUAL_SHARE = 0.5  # see `cheaper_residual`; measured in bench/bench_whatif.py (memory against move time)
RESIDUAL_MIN_ELEMENTS = 1 << 18  # smaller matrices stay dense: their buffers are cheap, and the demo's moves were
# 16% slower held as base + factors (0.109 s against 0.094 s a move; bench/bench_whatif.py)

# queries answered without the dense product (the wrapper holds a zero-stride placeholder of the right shape)
_METADATA = {"shape", "size", "dim", "ndim", "dtype", "device", "numel", "is_floating_point", "is_complex", "layout",
             "requires_grad", "is_sparse", "is_quantized", "is_meta", "is_cuda", "__len__", "element_size",
             "data_ptr", "_version"}


class LowRankWeight(torch.Tensor):
    """W = left @ right as a tensor the model can read (see the module docstring)."""

    left: torch.Tensor
    right: torch.Tensor
    base: torch.Tensor | None

    @staticmethod
    def __new__(cls, left: torch.Tensor, right: torch.Tensor, base: torch.Tensor | None = None):
        if left.dim() != 2 or right.dim() != 2 or left.shape[1] != right.shape[0]:
            raise ValueError(f"left {tuple(left.shape)} and right {tuple(right.shape)} do not multiply")
        if base is not None and tuple(base.shape) != (left.shape[0], right.shape[1]):
            raise ValueError(f"base {tuple(base.shape)} is not {left.shape[0]} x {right.shape[1]}")
        placeholder = torch.zeros((), dtype=left.dtype, device=left.device).expand(left.shape[0], right.shape[1])
        self = torch.Tensor._make_subclass(cls, placeholder, False)
        self.left, self.right, self.base = left, right, base
        return self

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])

    def dense(self) -> torch.Tensor:
        """The m × n matrix (a new tensor)."""
        with torch._C.DisableTorchFunctionSubclass():
            if self.base is None:
                return self.left @ self.right
            return torch.addmm(self.base, self.left, self.right)

    def transposed(self) -> LowRankWeight:
        """Wᵀ = rightᵀ·leftᵀ (+ baseᵀ), still factorised."""
        return LowRankWeight(self.right.T, self.left.T, None if self.base is None else self.base.T)

    def __repr__(self) -> str:
        extra = "" if self.base is None else ", plus a base matrix"
        return f"LowRankWeight(shape={tuple(self.shape)}, rank={self.rank}{extra})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__get__":
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        if name in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if func is F.linear:
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(w, LowRankWeight) and not isinstance(x, LowRankWeight):
                out = F.linear(F.linear(x, w.right), w.left, _plain(bias))
                return out if w.base is None else out.add_(F.linear(x, w.base))
        if func is F.embedding:
            ids, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            if isinstance(w, LowRankWeight) and not isinstance(ids, LowRankWeight):
                rest = {k: v for k, v in kwargs.items() if k != "weight"}
                out = F.embedding(ids, w.left, *args[2:], **rest) @ w.right
                return out if w.base is None else out.add_(F.embedding(ids, w.base, *args[2:], **rest))
        if func in (torch.matmul, torch.mm, torch.Tensor.matmul, torch.Tensor.mm, torch.Tensor.__matmul__) \
                and len(args) == 2 and isinstance(args[1], LowRankWeight) and not isinstance(args[0], LowRankWeight):
            x, w = _plain(args[0]), args[1]
            out = (x @ w.left) @ w.right
            return out if w.base is None else out.add_(x @ w.base)
        if func in (torch.addmm, torch.Tensor.addmm) and len(args) >= 3 and isinstance(args[2], LowRankWeight) \
                and not isinstance(args[1], LowRankWeight) and not kwargs:
            x, w = _plain(args[1]), args[2]
            out = torch.addmm(_plain(args[0]), x @ w.left, w.right)
            return out if w.base is None else out.addmm_(x, w.base)
        dense_args = [_plain(a) for a in args]
        dense_kwargs = {k: _plain(v) for k, v in kwargs.items()}
        with torch._C.DisableTorchFunctionSubclass():
            return func(*dense_args, **dense_kwargs)


def _plain(value):
    """A LowRankWeight as its dense product; anything else unchanged."""
    return value.dense() if isinstance(value, LowRankWeight) else value


def cheaper_factorised(shape: tuple[int, int], rank: int) -> bool:
    """Two thin matmuls cost k(m + n) per row against m·n for the dense matrix (and store as much less)."""
    m, n = shape
    return 0 < rank and rank * (m + n) < m * n


def most_factorised(shape: tuple[int, int]) -> int:
    """The largest rank `cheaper_factorised` accepts for this shape."""
    m, n = shape
    return (m * n - 1) // (m + n)


def most_residual(shape: tuple[int, int]) -> int:
    """The most removed components `cheaper_residual` accepts for this shape (0 for matrices it leaves dense)."""
    m, n = shape
    return int(RESIDUAL_SHARE * m * n // (m + n)) if m * n > RESIDUAL_MIN_ELEMENTS else 0


def residual_preferred(kept: int, removed: int) -> bool:
    """Of the two forms, both cheaper than a dense copy, hold W minus its `removed` components rather than its
    `kept` ones when that holds fewer: memory is what each session adds to the shared model, and what-if moves were
    within their time targets either way (bench/bench_whatif.py, 2026-12-01: held as fewer components, GPT-2's peak
    RSS 3.84x -> 3.48x the file and SmolLM2's 4.22x -> 4.11x, for 0.4-0.6 s more per full evaluation, as the
    residual form computes m·n + removed·(m + n) multiply-adds per row against kept·(m + n)). GPT-2's 50257 × 768
    embedding at energy 0.98 (rank 749): 19 components, 3.6 MiB, instead of 749, 144 MiB."""
    return removed < kept


def cheaper_residual(shape: tuple[int, int], removed: int) -> bool:
    """base + left·right with `removed` components costs (m + n) per removed component beyond the base's m·n per row,
    and stores only those: worth it (against a new dense m × n buffer) while that is under RESIDUAL_SHARE of m·n, for
    matrices of more than RESIDUAL_MIN_ELEMENTS entries."""
    m, n = shape
    return m * n > RESIDUAL_MIN_ELEMENTS and 0 < removed and removed * (m + n) <= RESIDUAL_SHARE * m * n
