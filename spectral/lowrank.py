"""A rank-k matrix W = left·right that runs as two thin matmuls where a model reads it, never as the dense m × n.

`LowRankWeight(left, right)` (left m × k, right k × n) is swapped into a module like any cut tensor. Through
`__torch_function__` the operations models use on weights are rewritten:
- `F.linear(x, W, b)` = x·Wᵀ + b as (x·rightᵀ)·leftᵀ + b: k(m + n) multiply-adds per row instead of m·n;
- `F.embedding(ids, W)` = W[ids] as left[ids]·right;
- `x @ W`, `torch.mm(x, W)`, `torch.addmm(b, x, W)` (Hugging Face's Conv1D) as (x·left)·right.
Shape, dtype and device queries answer from the wrapper; any other operation sees the dense product, so a model that
does something unusual with a weight is still right, only not faster. `dense()` gives the product itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# queries answered without the dense product (the wrapper holds a zero-stride placeholder of the right shape)
_METADATA = {"shape", "size", "dim", "ndim", "dtype", "device", "numel", "is_floating_point", "is_complex", "layout",
             "requires_grad", "is_sparse", "is_quantized", "is_meta", "is_cuda", "__len__", "element_size",
             "data_ptr", "_version"}


class LowRankWeight(torch.Tensor):
    """W = left @ right as a tensor the model can read (see the module docstring)."""

    left: torch.Tensor
    right: torch.Tensor

    @staticmethod
    def __new__(cls, left: torch.Tensor, right: torch.Tensor):
        if left.dim() != 2 or right.dim() != 2 or left.shape[1] != right.shape[0]:
            raise ValueError(f"left {tuple(left.shape)} and right {tuple(right.shape)} do not multiply")
        placeholder = torch.zeros((), dtype=left.dtype, device=left.device).expand(left.shape[0], right.shape[1])
        self = torch.Tensor._make_subclass(cls, placeholder, False)
        self.left, self.right = left, right
        return self

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])

    def dense(self) -> torch.Tensor:
        """The m × n product (a new tensor)."""
        with torch._C.DisableTorchFunctionSubclass():
            return self.left @ self.right

    def transposed(self) -> LowRankWeight:
        """Wᵀ = rightᵀ·leftᵀ, still factorised."""
        return LowRankWeight(self.right.T, self.left.T)

    def __repr__(self) -> str:
        return f"LowRankWeight(shape={tuple(self.shape)}, rank={self.rank})"

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
                return F.linear(F.linear(x, w.right), w.left, _plain(bias))
        if func is F.embedding:
            ids, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            if isinstance(w, LowRankWeight) and not isinstance(ids, LowRankWeight):
                rest = {k: v for k, v in kwargs.items() if k != "weight"}
                return F.embedding(ids, w.left, *args[2:], **rest) @ w.right
        if func in (torch.matmul, torch.mm, torch.Tensor.matmul, torch.Tensor.mm, torch.Tensor.__matmul__) \
                and len(args) == 2 and isinstance(args[1], LowRankWeight) and not isinstance(args[0], LowRankWeight):
            return (_plain(args[0]) @ args[1].left) @ args[1].right
        if func in (torch.addmm, torch.Tensor.addmm) and len(args) >= 3 and isinstance(args[2], LowRankWeight) \
                and not isinstance(args[1], LowRankWeight) and not kwargs:
            return torch.addmm(_plain(args[0]), _plain(args[1]) @ args[2].left, args[2].right)
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
