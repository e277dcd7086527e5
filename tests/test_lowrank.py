"""spectral/lowrank.py: a rank-k matrix read by a model as two thin matmuls, checked against the dense product, and a
heavily cut model evaluated through it against the same cut applied densely."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from spectral.lowrank import (
    RESIDUAL_SHARE,
    LowRankWeight,
    cheaper_factorised,
    cheaper_residual,
    most_factorised,
    most_residual,
    residual_preferred,
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


def test_a_base_plus_factors_equals_the_dense_sum_in_every_rewritten_operation(factors):
    """W = base + left·right (how a cut that removes few components is held): each rewritten operation, the
    transpose and `dense()` against the dense sum."""
    left, right, _ = factors
    base = torch.randn(30, 20, generator=torch.Generator().manual_seed(1))
    w, dense = LowRankWeight(left, right, base), base + left @ right
    x, ids, y, bias = torch.randn(5, 20), torch.tensor([[0, 7, 29]]), torch.randn(5, 30), torch.randn(30)
    torch.testing.assert_close(F.linear(x, w, bias), F.linear(x, dense, bias))
    torch.testing.assert_close(F.embedding(ids, w), F.embedding(ids, dense))
    torch.testing.assert_close(y @ w, y @ dense)
    torch.testing.assert_close(torch.addmm(torch.ones(20), y, w), torch.addmm(torch.ones(20), y, dense))
    torch.testing.assert_close(w.transposed().dense(), dense.T)
    torch.testing.assert_close(w * 2.0, dense * 2.0)
    with pytest.raises(ValueError, match="base"):
        LowRankWeight(left, right, base.T)


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


def test_factors_are_used_only_where_they_are_cheaper():
    assert cheaper_factorised((100, 100), 49) and not cheaper_factorised((100, 100), 50)
    assert not cheaper_factorised((100, 100), 0)
    removable = int(RESIDUAL_SHARE * 1000 * 1000 / 2000)  # (m + n)·r ≤ share·m·n
    assert cheaper_residual((1000, 1000), removable) and not cheaper_residual((1000, 1000), removable + 1)
    assert not cheaper_residual((1000, 1000), 0)
    assert not cheaper_residual((100, 100), 1), "small matrices stay dense"
    assert residual_preferred(749, 19) and not residual_preferred(16, 16) and not residual_preferred(10, 758)


@pytest.mark.parametrize("shape", [(100, 100), (50257, 768), (768, 3072), (3072, 768), (1000, 1000), (513, 512),
                                   (512, 512), (40, 90), (1, 300_000), (1, 1)])
def test_the_most_components_each_form_holds_is_the_largest_its_rule_accepts(shape):
    """`most_factorised` and `most_residual` bound what a held range may grow to: each is the largest value its
    `cheaper_*` rule accepts (one more is refused), or 0 where the rule accepts none: the residual form for matrices
    of at most RESIDUAL_MIN_ELEMENTS entries (512 × 512 is exactly that many) or whose one component costs over
    RESIDUAL_SHARE of them (1 × 300000), the factorised form for a 1 × 1 matrix."""
    for most, cheaper in ((most_factorised(shape), cheaper_factorised), (most_residual(shape), cheaper_residual)):
        assert most >= 0 and not cheaper(shape, most + 1)
        if most:
            assert cheaper(shape, most)
        else:
            assert not any(cheaper(shape, r) for r in range(1, min(shape) + 1))
    assert most_factorised((50257, 768)) == 756 and most_residual((50257, 768)) == 378
    assert most_residual((512, 512)) == 0 and most_residual((513, 512)) == 128
    assert most_factorised((1, 1)) == 0 and most_residual((1, 300_000)) == 0


def test_a_light_cut_is_held_as_the_model_weight_minus_its_tail_with_no_dense_buffer(tmp_path, monkeypatch):
    """Rank 90% (the size floor lowered to the tiny model's matrices): each matrix is W minus its removed components
    over the model's own weight (no new m × n buffer), its dense form equals W_k from a float64 SVD, and the
    evaluation equals the same cut applied densely."""
    import spectral.lowrank

    monkeypatch.setattr(spectral.lowrank, "RESIDUAL_MIN_ELEMENTS", 0)
    path = save_tiny_gpt(tmp_path / "tiny.safetensors")
    session = WhatIfSession.open(path, positions=256)
    result = session.run(Choice("rank", 0.9))
    overrides = session.pruner.overrides()
    held = [t for t in overrides.values() if isinstance(t, LowRankWeight) and t.base is not None]
    assert held and all(s._working[n].buffer is None for s in [session.pruner] for n in s._working)
    for info in session.workspace.matrices:
        cut = result.plan.cuts.get(info.name)
        if cut is None or cut.kept_rank is None:
            continue
        U, S, Vh = torch.linalg.svd(session.workspace.weight(info.name).double(), full_matrices=False)
        k = cut.kept_rank
        exact = (U[:, :k] * S[:k]) @ Vh[:k]
        got = session.pruner.matrix(info.name).double()
        assert float((got - exact).norm() / exact.norm()) < 1e-5, info.name
    dense = {name: t.dense() if isinstance(t, LowRankWeight) else t for name, t in overrides.items()}
    plain = session.evaluator.evaluate(dense)
    assert result.metrics.kl == pytest.approx(plain.kl, rel=1e-4, abs=1e-9)
    assert result.metrics.agreement == pytest.approx(plain.agreement, abs=1 / 256)


def test_slider_moves_through_held_components_equal_a_fresh_cut_every_time(tmp_path, monkeypatch):
    """Energy moves up and down, crossing between the residual and the factorised forms (the size floor lowered to
    the tiny model's matrices): after each, every cut matrix, built from components held across moves, equals the
    same plan applied by a fresh pruner (tests/test_factors.py checks that only new components are computed)."""
    import spectral.lowrank
    from spectral.pruning import Pruner

    monkeypatch.setattr(spectral.lowrank, "RESIDUAL_MIN_ELEMENTS", 0)
    path = save_tiny_gpt(tmp_path / "tiny.safetensors")
    session = WhatIfSession.open(path, positions=64)
    forms = set()
    for value in (0.999, 0.99, 0.9, 0.5, 0.2, 0.6, 0.95, 0.995, 0.3):
        result = session.run(Choice("energy", value))
        fresh = Pruner(session.workspace, session.runtime.require())
        fresh.apply(result.plan)
        for info in session.workspace.matrices:
            state = session.pruner._working.get(info.name)
            if state is not None and state.active and state.low_rank is not None:
                forms.add("residual" if state.base is not None else "factorised")
            torch.testing.assert_close(session.pruner.matrix(info.name), fresh.matrix(info.name),
                                       rtol=1e-5, atol=1e-6)
    assert forms == {"residual", "factorised"}


def test_a_heavily_cut_model_evaluates_through_factors_like_the_dense_cut(tmp_path):
    path = save_tiny_gpt(tmp_path / "tiny.safetensors")
    session = WhatIfSession.open(path, positions=256)
    factorised = session.run(Choice("rank", 0.1))
    overrides = session.pruner.overrides()
    assert any(isinstance(t, LowRankWeight) for t in overrides.values())
    dense = {name: t.dense() if isinstance(t, LowRankWeight) else t for name, t in overrides.items()}
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
    dense = to_device(torch.randn(3, 4), torch.device("meta"))
    assert dense.device.type == "meta" and not isinstance(dense, LowRankWeight)
