"""Cut matrices a model reads without their dense m × n copy: W = left·right (rank k), or W projected onto (or off)
some of its singular directions, P·W or W·P with P = QQᵀ or I − QQᵀ.

`LowRankWeight(left, right)` (left m × k, right k × n) runs as two thin matmuls: k(m + n) multiply-adds per row
instead of m·n, so a heavily cut model evaluates faster than the untouched one. `ProjectedWeight(base, q, side,
keep)` is the truncation W_k = U_kU_kᵀ·W = W·V_kV_kᵀ (Eckart-Young: the projection of W onto its top-k singular
vectors is its best rank-k approximation) over `base`, the model's own untouched weight, and q, columns of the
short side's singular vectors the pruner keeps anyway (spectral/factors.py): on the CPU it holds no new memory at
all, and it costs m·n + 2·M·j per row (M the short side, j the columns of q; the pruner projects onto the kept
components or off the removed ones, whichever are fewer). Through `__torch_function__` the operations models use on weights are
rewritten:
- `F.linear(x, W, b)` = x·Wᵀ + b;
- `F.embedding(ids, W)` = W[ids];
- `x @ W`, `torch.mm(x, W)`, `torch.addmm(b, x, W)` (Hugging Face's Conv1D);
each through the factors. Shape, dtype and device queries answer from the wrapper; any other operation sees the
dense matrix, so a model that does something unusual with a weight is still right, only not faster. `dense()` gives
the matrix itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FACTORISED_SPEEDUP = 2.0  # see `cheaper_factorised`: factors only where they run at least this many times faster
# than the projection, which holds nothing (bench/bench_whatif.py, 2026-12-01: with factors wherever cheaper than
# the dense matrix, SmolLM2's shape held ~400 MiB more across energy moves, 3.58x the file against 2.7x, for moves
# no faster)

# queries answered without the dense product (the wrapper holds a zero-stride placeholder of the right shape)
_METADATA = {"shape", "size", "dim", "ndim", "dtype", "device", "numel", "is_floating_point", "is_complex", "layout",
             "requires_grad", "is_sparse", "is_quantized", "is_meta", "is_cuda", "__len__", "element_size",
             "data_ptr", "_version"}
_MATMULS = (torch.matmul, torch.mm, torch.Tensor.matmul, torch.Tensor.mm, torch.Tensor.__matmul__)


class ImplicitWeight(torch.Tensor):
    """A matrix held as something cheaper than its entries; subclasses say how the rewritten operations run."""

    @classmethod
    def _placeholder(cls, rows: int, cols: int, like: torch.Tensor) -> ImplicitWeight:
        """A new instance over a zero-stride placeholder of this shape (no m × n memory)."""
        placeholder = torch.zeros((), dtype=like.dtype, device=like.device).expand(rows, cols)
        return torch.Tensor._make_subclass(cls, placeholder, False)

    def dense(self) -> torch.Tensor:
        """The m × n matrix (a new tensor)."""
        raise NotImplementedError

    def transposed(self) -> ImplicitWeight:
        raise NotImplementedError

    def to_device(self, device: torch.device) -> ImplicitWeight:
        raise NotImplementedError

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x·Wᵀ + bias."""
        raise NotImplementedError

    def rows(self, ids: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """W[ids], as `F.embedding(ids, W, *args, **kwargs)`."""
        raise NotImplementedError

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x·W."""
        raise NotImplementedError

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__get__":
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        if name in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            if func is F.linear:
                x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                if isinstance(w, ImplicitWeight) and not isinstance(x, ImplicitWeight):
                    return w.linear(x, _plain(bias))
            if func is F.embedding:
                ids, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
                rest = {k: v for k, v in kwargs.items() if k != "weight"}
                if isinstance(w, ImplicitWeight) and not isinstance(ids, ImplicitWeight) \
                        and rest.get("max_norm") is None and (len(args) < 4 or args[3] is None):  # max_norm renorms W
                    return w.rows(ids, args[2:], rest)
            if func in _MATMULS and len(args) == 2 and isinstance(args[1], ImplicitWeight) \
                    and not isinstance(args[0], ImplicitWeight):
                return args[1].matmul(args[0])
            if func in (torch.addmm, torch.Tensor.addmm) and len(args) == 3 and not kwargs \
                    and isinstance(args[2], ImplicitWeight) and not isinstance(args[1], ImplicitWeight):
                return args[2].matmul(args[1]).add_(_plain(args[0]))
            return func(*[_plain(a) for a in args], **{k: _plain(v) for k, v in kwargs.items()})


class LowRankWeight(ImplicitWeight):
    """W = left @ right, read as two thin matmuls (see the module docstring)."""

    left: torch.Tensor
    right: torch.Tensor

    @staticmethod
    def __new__(cls, left: torch.Tensor, right: torch.Tensor):
        if left.dim() != 2 or right.dim() != 2 or left.shape[1] != right.shape[0]:
            raise ValueError(f"left {tuple(left.shape)} and right {tuple(right.shape)} do not multiply")
        self = cls._placeholder(left.shape[0], right.shape[1], left)
        self.left, self.right = left, right
        return self

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])

    def dense(self) -> torch.Tensor:
        with torch._C.DisableTorchFunctionSubclass():
            return self.left @ self.right

    def transposed(self) -> LowRankWeight:
        """Wᵀ = rightᵀ·leftᵀ, still factorised."""
        return LowRankWeight(self.right.T, self.left.T)

    def to_device(self, device: torch.device) -> LowRankWeight:
        return LowRankWeight(self.left.to(device), self.right.to(device))

    def linear(self, x, bias):
        return F.linear(F.linear(x, self.right), self.left, bias)

    def rows(self, ids, args, kwargs):
        return F.embedding(ids, self.left, *args, **kwargs) @ self.right

    def matmul(self, x):
        return (x @ self.left) @ self.right

    def __repr__(self) -> str:
        return f"LowRankWeight(shape={tuple(self.shape)}, rank={self.rank})"


class ProjectedWeight(ImplicitWeight):
    """W = P·base (side "left", q m × j) or base·P (side "right", q n × j), P = q·qᵀ (`keep`) or I − q·qᵀ, for q
    with orthonormal columns: a truncation over the model's own weight (see the module docstring)."""

    base: torch.Tensor
    q: torch.Tensor
    side: str
    keep: bool

    @staticmethod
    def __new__(cls, base: torch.Tensor, q: torch.Tensor, side: str, keep: bool):
        if side not in ("left", "right"):
            raise ValueError(f"side is 'left' or 'right', not {side!r}")
        if base.dim() != 2 or q.dim() != 2 or q.shape[0] != base.shape[0 if side == "left" else 1]:
            raise ValueError(f"q {tuple(q.shape)} does not project base {tuple(base.shape)} on the {side}")
        self = cls._placeholder(base.shape[0], base.shape[1], base)
        self.base, self.q, self.side, self.keep = base, q, side, keep
        return self

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """z·P over z's last dimension (P is symmetric): (z·q)·qᵀ, or z minus it."""
        part = (z @ self.q) @ self.q.T
        return part if self.keep else z - part

    def dense(self) -> torch.Tensor:
        with torch._C.DisableTorchFunctionSubclass():
            if self.side == "right":
                return self.project(self.base)
            return self.project(self.base.T).T.contiguous()

    def transposed(self) -> ProjectedWeight:
        """(P·W)ᵀ = Wᵀ·P and (W·P)ᵀ = P·Wᵀ: the same projection on the other side."""
        return ProjectedWeight(self.base.T, self.q, "right" if self.side == "left" else "left", self.keep)

    def to_device(self, device: torch.device) -> ProjectedWeight:
        return ProjectedWeight(self.base.to(device), self.q.to(device), self.side, self.keep)

    def linear(self, x, bias):
        if self.side == "right":  # x·(W·P)ᵀ = (x·P)·Wᵀ
            return F.linear(self.project(x), self.base, bias)
        out = self.project(F.linear(x, self.base))  # x·(P·W)ᵀ = (x·Wᵀ)·P
        return out if bias is None else out.add_(bias)

    def rows(self, ids, args, kwargs):
        if self.side == "right":  # (W·P)[ids] = W[ids]·P
            return self.project(F.embedding(ids, self.base, *args, **kwargs))
        # (P·W)[ids] = P[ids]·W with P[ids] = q[ids]·qᵀ (or the identity's rows minus it): j·n per row after the
        # j·m·n of qᵀ·W, instead of m·n per row
        part = F.embedding(ids, self.q) @ (self.q.T @ self.base)
        return part if self.keep else F.embedding(ids, self.base, *args, **kwargs) - part

    def matmul(self, x):
        if self.side == "right":  # x·W·P
            return self.project(x @ self.base)
        return self.project(x) @ self.base  # x·P·W

    def __repr__(self) -> str:
        kind = "onto" if self.keep else "off"
        return f"ProjectedWeight(shape={tuple(self.shape)}, {self.side}, {kind} {self.q.shape[1]} directions)"


def _plain(value):
    """An implicit weight as its dense matrix; anything else unchanged."""
    return value.dense() if isinstance(value, ImplicitWeight) else value


def projected_cost(shape: tuple[int, int], rank: int) -> int:
    """Multiply-adds per row of the rank-k truncation as a `ProjectedWeight`: m·n + 2·M·j, j = min(k, M − k) (onto
    the kept components or off the removed ones)."""
    m, n = shape
    short = min(m, n)
    return m * n + 2 * short * min(rank, short - rank)


def cheaper_factorised(shape: tuple[int, int], rank: int) -> bool:
    """Two thin matmuls, k(m + n) multiply-adds per row: used where that is cheaper than the dense matrix (m·n; a
    heavily cut model then runs faster than the untouched one) and FACTORISED_SPEEDUP times cheaper than the
    projection. At the default 2 that is k ≤ M/2 (M the short side), so the factors' long side holds at most half
    the matrix."""
    m, n = shape
    cost = rank * (m + n)
    return 0 < rank and cost < m * n and FACTORISED_SPEEDUP * cost <= projected_cost(shape, rank)


def most_factorised(shape: tuple[int, int]) -> int:
    """The largest rank `cheaper_factorised` accepts. Both of its bounds grow more slowly in k than the factors'
    cost (the projection's by at most 2M per component against m + n ≥ 2M), so it accepts exactly 1..this."""
    lo, hi = 0, min(shape)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cheaper_factorised(shape, mid) else (lo, mid - 1)
    return lo
