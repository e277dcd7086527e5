"""spectral/lowrank.py: a rank-k matrix read by a model as two thin matmuls, checked against the dense product, and a
heavily cut model evaluated through it against the same cut applied densely."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from spectral.lowrank import (
    ImplicitWeight,
    LowRankWeight,
    ProjectedWeight,
    cheaper_factorised,
    most_factorised,
    projected_cost,
)
from spectral.whatif import Choice, WhatIfSession
from tests.tiny_models import save_tiny_gpt


@pytest.fixture
def factors():
    g = torch.Generator().manual_seed(0)
    left, right = torch.randn(30, 4, generator=g), torch.randn(4, 20, generator=g)
    return left, right, left @ right


def test_linear_embedding_and_matmuls_equal_the_dense_product(factors):
    left, right, dense = factors
    w = LowRankWeight(left, right)
    x, ids = torch.randn(5, 20), torch.tensor([[0, 7, 29]])
    bias = torch.randn(30)
    torch.testing.assert_close(F.linear(x, w, bias), F.linear(x, dense, bias))
    torch.testing.assert_close(F.embedding(ids, w), F.embedding(ids, dense))
    y = torch.randn(5, 30)
    torch.testing.assert_close(y @ w, y @ dense)
    torch.testing.assert_close(torch.addmm(torch.ones(20), y, w), torch.addmm(torch.ones(20), y, dense))
    torch.testing.assert_close(w.transposed().dense(), dense.T)


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)))[0]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("keep", [True, False])
def test_a_projected_weight_equals_the_dense_projection_in_every_rewritten_operation(side, keep):
    """P·W or W·P, P = QQᵀ or I − QQᵀ, built densely here: each rewritten operation, the transpose, `dense()`, an
    operation nobody rewrote, and an embedding with max_norm (which renormalises rows: the dense route)."""
    base = torch.randn(30, 20, generator=torch.Generator().manual_seed(1))
    q = orthonormal(30 if side == "left" else 20, 4, seed=2)
    p = q @ q.T if keep else torch.eye(q.shape[0]) - q @ q.T
    dense = p @ base if side == "left" else base @ p
    w = ProjectedWeight(base, q, side, keep)
    x, ids, y, bias = torch.randn(5, 20), torch.tensor([[0, 7, 29]]), torch.randn(5, 30), torch.randn(30)
    torch.testing.assert_close(F.linear(x, w, bias), F.linear(x, dense, bias))
    torch.testing.assert_close(F.linear(x, w), F.linear(x, dense))
    torch.testing.assert_close(F.embedding(ids, w), F.embedding(ids, dense))
    torch.testing.assert_close(y @ w, y @ dense)
    torch.testing.assert_close(torch.addmm(torch.ones(20), y, w), torch.addmm(torch.ones(20), y, dense))
    torch.testing.assert_close(w.dense(), dense)
    torch.testing.assert_close(w.transposed().dense(), dense.T)
    torch.testing.assert_close(y @ w.transposed().transposed(), y @ dense)
    torch.testing.assert_close(w * 2.0, dense * 2.0)
    torch.testing.assert_close(F.embedding(ids, w, max_norm=1.0), F.embedding(ids, dense.clone(), max_norm=1.0))
    assert tuple(w.shape) == (30, 20) and isinstance(w, ImplicitWeight)


def test_a_projected_weight_refuses_a_projection_of_the_wrong_size():
    with pytest.raises(ValueError, match="does not project"):
        ProjectedWeight(torch.randn(30, 20), orthonormal(20, 4, seed=0), "left", True)
    with pytest.raises(ValueError, match="side"):
        ProjectedWeight(torch.randn(30, 20), orthonormal(30, 4, seed=0), "top", True)


def test_shape_queries_do_not_build_the_dense_matrix_and_anything_else_sees_it(factors):
    left, right, dense = factors
    w = LowRankWeight(left, right)
    assert w.shape == (30, 20) and w.dtype == torch.float32 and w.dim() == 2 and w.size(1) == 20 and w.rank == 4
    torch.testing.assert_close(w * 2.0, dense * 2.0)  # an operation nobody rewrote: the dense product
    assert torch.linalg.matrix_rank(w) == 4


def test_modules_read_it_through_functional_call(factors):
    left, right, dense = factors
    linear, embedding = torch.nn.Linear(20, 30), torch.nn.Embedding(30, 20)
    x, ids = torch.randn(3, 20), torch.tensor([1, 2])
    torch.testing.assert_close(functional_call(linear, {"weight": LowRankWeight(left, right)}, (x,)),
                               functional_call(linear, {"weight": dense}, (x,)))
    torch.testing.assert_close(functional_call(embedding, {"weight": LowRankWeight(left, right)}, (ids,)), dense[ids])


def test_factors_are_used_where_cheaper_than_the_dense_matrix_and_twice_the_projection(monkeypatch):
    """k(m + n) multiply-adds, against m·n and FACTORISED_SPEEDUP⁻¹ · (m·n + 2M·min(k, M − k)) by hand: at the
    default 2, k ≤ M/2 on a square matrix and on GPT-2's embedding; at 4, a quarter of that or less."""
    import spectral.lowrank

    assert spectral.lowrank.FACTORISED_SPEEDUP == 2.0
    assert projected_cost((100, 100), 30) == 10_000 + 2 * 100 * 30
    assert projected_cost((100, 100), 70) == 10_000 + 2 * 100 * 30
    assert cheaper_factorised((100, 100), 49) and not cheaper_factorised((100, 100), 50)  # 50: as dense
    assert cheaper_factorised((50257, 768), 384) and not cheaper_factorised((50257, 768), 385)
    assert not cheaper_factorised((100, 100), 0)
    monkeypatch.setattr(spectral.lowrank, "FACTORISED_SPEEDUP", 4.0)
    # 4·200k ≤ 10000 + 200k  ⇔  k ≤ 16.7
    assert cheaper_factorised((100, 100), 16) and not cheaper_factorised((100, 100), 17)


@pytest.mark.parametrize("speedup", [2.0, 4.0, 1.0])
@pytest.mark.parametrize("shape", [(100, 100), (50257, 768), (768, 3072), (3072, 768), (1000, 1000), (40, 90),
                                   (1, 300_000), (1, 1)])
def test_the_most_components_the_factorised_form_holds_is_the_largest_its_rule_accepts(shape, speedup, monkeypatch):
    """`most_factorised` bounds what a held range may grow to: the largest rank `cheaper_factorised` accepts, every
    rank below it accepted and every one above refused (checked one by one), or 0 where it accepts none."""
    import spectral.lowrank

    monkeypatch.setattr(spectral.lowrank, "FACTORISED_SPEEDUP", speedup)
    most = most_factorised(shape)
    ranks = range(1, min(min(shape), 2000) + 1)
    assert [cheaper_factorised(shape, k) for k in ranks] == [k <= most for k in ranks]
    if speedup == 2.0:
        assert most_factorised((50257, 768)) == 384 and most_factorised((100, 100)) == 49
    assert most_factorised((1, 1)) == 0


def test_a_light_cut_is_the_model_weight_projected_off_its_tail_with_no_dense_buffer(tmp_path, monkeypatch):
    """Rank 90%: each matrix is the model's own weight projected off its removed components (no new m × n buffer,
    nothing held beside it), its dense form equals W_k from a float64 SVD, and the evaluation equals the same cut
    applied densely."""
    path = save_tiny_gpt(tmp_path / "tiny.safetensors")
    session = WhatIfSession.open(path, positions=256)
    result = session.run(Choice("rank", 0.9))
    overrides = session.pruner.overrides()
    held = [t for t in overrides.values() if isinstance(t, ProjectedWeight)]
    assert held and not any(t.keep for t in held)
    assert all(s.buffer is None and s.held is None for s in session.pruner._working.values())
    model = {p.untyped_storage().data_ptr() for p in session.runtime.require().module.parameters()}
    assert all(t.base.untyped_storage().data_ptr() in model for t in held), "the base is the model's own weight"
    for info in session.workspace.matrices:
        cut = result.plan.cuts.get(info.name)
        if cut is None or cut.kept_rank is None:
            continue
        U, S, Vh = torch.linalg.svd(session.workspace.weight(info.name).double(), full_matrices=False)
        k = cut.kept_rank
        exact = (U[:, :k] * S[:k]) @ Vh[:k]
        got = session.pruner.matrix(info.name).double()
        assert float((got - exact).norm() / exact.norm()) < 1e-5, info.name
    dense = {name: t.dense() if isinstance(t, ImplicitWeight) else t for name, t in overrides.items()}
    plain = session.evaluator.evaluate(dense)
    assert result.metrics.kl == pytest.approx(plain.kl, rel=1e-4, abs=1e-9)
    assert result.metrics.agreement == pytest.approx(plain.agreement, abs=1 / 256)


def test_slider_moves_through_held_components_equal_a_fresh_cut_every_time(tmp_path):
    """Energy moves up and down, crossing between the projected and the factorised forms: after each, every cut
    matrix, built from what was held across moves, equals the same plan applied by a fresh pruner and the SVD
    truncation (tests/test_factors.py checks that only new components are computed)."""
    from spectral.pruning import Pruner

    path = save_tiny_gpt(tmp_path / "tiny.safetensors")
    session = WhatIfSession.open(path, positions=64)
    svd = {m.name: torch.linalg.svd(session.workspace.weight(m.name).double(), full_matrices=False)
           for m in session.workspace.matrices}
    forms = set()
    for value in (0.999, 0.99, 0.9, 0.5, 0.2, 0.6, 0.95, 0.995, 0.3):
        result = session.run(Choice("energy", value))
        fresh = Pruner(session.workspace, session.runtime.require())
        fresh.apply(result.plan)
        for info in session.workspace.matrices:
            state = session.pruner._working.get(info.name)
            if state is not None and state.active and state.implicit is not None:
                forms.add(type(state.implicit).__name__)
            got = session.pruner.matrix(info.name)
            torch.testing.assert_close(got, fresh.matrix(info.name), rtol=1e-5, atol=1e-6)
            k = result.plan.cut(info.name).kept_rank
            if k is not None:
                U, S, Vh = svd[info.name]
                exact = (U[:, :k] * S[:k]) @ Vh[:k]
                assert float((got.double() - exact).norm() / exact.norm()) < 1e-5, (value, info.name)
    assert forms == {"ProjectedWeight", "LowRankWeight"}


def test_a_heavily_cut_model_evaluates_through_factors_like_the_dense_cut(tmp_path):
    path = save_tiny_gpt(tmp_path / "tiny.safetensors")
    session = WhatIfSession.open(path, positions=256)
    factorised = session.run(Choice("rank", 0.1))
    overrides = session.pruner.overrides()
    assert any(isinstance(t, LowRankWeight) for t in overrides.values())
    dense = {name: t.dense() if isinstance(t, ImplicitWeight) else t for name, t in overrides.items()}
    plain = session.evaluator.evaluate(dense)
    assert factorised.metrics.kl == pytest.approx(plain.kl, rel=1e-4)
    assert factorised.metrics.agreement == pytest.approx(plain.agreement, abs=1 / 256)
    for info in session.workspace.matrices:  # the saved / analysed view is dense and equals the factors' product
        assert session.pruner.matrix(info.name).shape == tuple(info.shape)


def test_a_cut_matrix_moves_to_the_model_device_still_factorised():
    """spectral/evaluation.py `to_device`: the pruner makes cut matrices on the CPU; on a GPU model they move there
    (here the meta device stands in for one: no data, only placement), a factorised one as its two factors."""
    from spectral.evaluation import to_device

    left, right = torch.randn(6, 2), torch.randn(2, 5)
    moved = to_device(LowRankWeight(left, right), torch.device("meta"))
    assert isinstance(moved, LowRankWeight) and moved.rank == 2 and tuple(moved.shape) == (6, 5)
    assert moved.left.device.type == moved.right.device.type == "meta"
    projection = to_device(ProjectedWeight(torch.randn(6, 5), orthonormal(5, 2, seed=0), "right", False),
                           torch.device("meta"))
    assert isinstance(projection, ProjectedWeight) and tuple(projection.shape) == (6, 5)
    assert projection.base.device.type == projection.q.device.type == "meta" and projection.side == "right"
    dense = to_device(torch.randn(3, 4), torch.device("meta"))
    assert dense.device.type == "meta" and not isinstance(dense, ImplicitWeight)
