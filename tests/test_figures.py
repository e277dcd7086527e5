"""spectral/figures.py: what each figure draws, checked against independent counts, plus server-side export."""
from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from spectral import figures, mp
from spectral.analysis import Settings, Spectrum, analyze_spectrum, role_table
from spectral.workspace import Workspace


def spiked_spectrum(m=300, n=600, spikes=(8.0, 5.0, 3.0), sigma=0.05, seed=0, name="blocks.0.mlp.c_fc.weight",
                    role="mlp_up") -> Spectrum:
    """Gaussian noise of std σ plus rank-one spikes of strength θ (RMT.md §0), as a Spectrum."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0.0, sigma, (m, n))
    N = max(m, n)
    for i, theta in enumerate(spikes):
        u = rng.normal(size=m)
        v = rng.normal(size=n)
        w += theta * sigma * math.sqrt(N) * np.outer(u / np.linalg.norm(u), v / np.linalg.norm(v))
    s = np.linalg.svd(w, compute_uv=False)
    return Spectrum(name, (m, n), role, (), s)


@pytest.fixture(scope="module")
def spiked():
    sp = spiked_spectrum()
    return sp, analyze_spectrum(sp, Settings())


def test_histogram_counts_every_singular_value_once_split_at_the_edges(spiked):
    sp, rep = spiked
    h = figures.histogram_data(sp, rep)
    assert h.bulk.sum() + h.above.sum() + h.below.sum() == sp.M
    assert h.above.sum() == rep.n_signal == 3
    assert h.below.sum() == rep.n_below


def test_mp_overlay_is_the_expected_count_per_bin(spiked):
    """RMT.md §1.6: the curve at a bin centre equals M·(F(b) − F(a)) over that bin, F the MP CDF at σ̂."""
    sp, rep = spiked
    h = figures.histogram_data(sp, rep)
    law = mp.MarchenkoPastur(sp.q, rep.sigma)
    width = h.edges[1] - h.edges[0]
    x = h.curve_x[len(h.curve_x) // 2]
    expected = sp.M * (law.cdf((x + width / 2) ** 2 / sp.N) - law.cdf((x - width / 2) ** 2 / sp.N))
    assert h.curve_y[len(h.curve_x) // 2] == pytest.approx(expected, rel=1e-9)
    # the whole curve, summed bin by bin, holds about the M − outliers values of the bulk
    centres = 0.5 * (h.edges[:-1] + h.edges[1:])
    per_bin = np.interp(centres, h.curve_x, h.curve_y, left=0, right=0)
    assert per_bin.sum() == pytest.approx(sp.M - rep.n_signal, rel=0.05)


def test_eigenvalue_space_and_log_axes_keep_the_same_classes(spiked):
    sp, rep = spiked
    h = figures.histogram_data(sp, rep, space="eigen", log_x=True)
    assert h.above.sum() == rep.n_signal
    assert h.upper == pytest.approx(rep.edge_upper ** 2 / sp.N)
    assert np.all(np.diff(np.log(h.edges)) == pytest.approx(np.log(h.edges[1] / h.edges[0])))  # log-spaced bins


def test_histogram_figure_names_the_matrix_settings_and_edges(spiked):
    sp, rep = spiked
    fig = figures.spectrum_histogram(sp, rep, settings=Settings(confidence=0.95), context="demo (sha256 abc)")
    assert "blocks.0.mlp.c_fc.weight" in fig.layout.title.text and "300×600" in fig.layout.title.text
    assert "demo (sha256 abc)" in fig.layout.title.subtitle.text
    names = [t.name for t in fig.data]
    assert any(n and n.startswith("upper edge, c = 0.95") for n in names)
    assert any(n and n.startswith("MP fit") for n in names)
    assert fig.layout.template.layout.paper_bgcolor == "white"
    assert fig.layout.xaxis2.title.text.startswith("singular value s (weight units)")


def test_rank_contrast_shows_signal_and_energy_percent_per_row():
    rows = [{"label": "a", "rank": 100, "n_signal": 5, "energy_rank": 90, "signal_pct": 5.0, "utilization_pct": 90.0}]
    fig = figures.rank_contrast(rows, title="t")
    bars = {t.name: t for t in fig.data}
    assert list(next(v for k, v in bars.items() if k.startswith("MP signal")).x) == [5.0]
    assert list(next(v for k, v in bars.items() if k.startswith("energy rank")).x) == [90.0]


def _workspace() -> Workspace:
    from safetensors.torch import save

    from spectral.checkpoint import load_checkpoint_bytes

    torch.manual_seed(0)
    tensors = {"blocks.0.attn.c_attn.weight": torch.randn(192, 64), "blocks.0.mlp.c_fc.weight": torch.randn(256, 64),
               "blocks.0.mlp.c_proj.weight": torch.randn(64, 256)}
    return Workspace.open(load_checkpoint_bytes(save(tensors), "three.safetensors"))


def test_role_and_matrix_charts_and_grid_from_an_analysis():
    ws = _workspace()
    analysis = ws.analyze(Settings())
    by_role = figures.rank_contrast_by_role(analysis, role_table(analysis))
    assert "three.safetensors" in by_role.layout.title.subtitle.text
    assert len(figures.rank_contrast_by_matrix(analysis).data[0].y) == 3
    spectra = ws.spectra()
    grid = figures.spectrum_grid([spectra[r.name] for r in analysis.matrices], analysis.matrices, title="all",
                                 settings=analysis.settings)
    assert len(grid.layout.annotations) == 3  # one panel title per matrix
    assert figures.params_kept_bars(analysis).data[0].x[-1] == analysis.summary["matrix_params"]


def test_compression_vs_kl_draws_references_groups_and_the_current_plan():
    points = [{"label": "fp16", "compression": 2.0, "kl": 0.0}, {"label": "MP z>2", "compression": 5.0, "kl": 1.5},
              {"label": "99%", "compression": 1.2, "kl": 0.01, "group": "energy"},
              {"label": "98%", "compression": 1.4, "kl": 0.05, "group": "energy"}]
    fig = figures.compression_vs_kl(points, current={"label": "now", "compression": 1.3, "kl": 0.02})
    names = [t.name for t in fig.data]
    assert names == ["energy", "standard strategies", "current: now"]
    assert fig.data[1].y[0] == figures.KL_FLOOR  # KL 0 sits on the floor of the log axis
    assert fig.layout.yaxis.type == "log"


def test_compression_vs_damage_for_encoders_plots_one_minus_cosine():
    points = [{"label": "fp16", "compression": 2.0, "kl": None, "cosine": 0.999},
              {"label": "MP z>2", "compression": 5.0, "kl": None, "cosine": 0.75}]
    fig = figures.compression_vs_kl(points, current={"label": "now", "compression": 1.3, "kl": None, "cosine": 0.9},
                                    damage="cosine")
    refs = fig.data[0]
    assert list(refs.x) == [2.0, 5.0]
    assert refs.y[0] == pytest.approx(0.001) and refs.y[1] == pytest.approx(0.25)
    assert fig.data[1].y[0] == pytest.approx(0.1)
    assert "cosine" in fig.layout.yaxis.title.text


def test_sensitivity_from_scan_lays_out_layers_by_roles():
    rows = [{"unit": "tok_emb.weight", "role": "embedding", "layer": None, "kl": 0.5},
            {"unit": "blocks.0.attn.c_attn.weight", "role": "attn_qkv", "layer": 0, "kl": 0.1},
            {"unit": "blocks.1.attn.c_attn.weight", "role": "attn_qkv", "layer": 1, "kl": 0.2},
            {"unit": "blocks.1.mlp.c_fc.weight", "role": "mlp_up", "layer": 1, "kl": 0.3}]
    fig = figures.sensitivity_from_scan(rows)
    heat = fig.data[0]
    assert list(heat.y) == ["tok_emb.weight", "layer 0", "layer 1"]
    assert list(heat.x) == ["embedding", "attn_qkv", "mlp_up"]
    assert heat.customdata[2][2] == pytest.approx(0.3)
    assert math.isnan(heat.customdata[1][2])


def test_sensitivity_by_role_is_one_row_of_roles():
    rows = [{"unit": "attn_qkv", "role": "attn_qkv", "layer": None, "kl": 0.1},
            {"unit": "mlp_up", "role": "mlp_up", "layer": None, "kl": 0.4}]
    heat = figures.sensitivity_from_scan(rows, by="role").data[0]
    assert list(heat.y) == ["whole role cut"] and list(heat.x) == ["attn_qkv", "mlp_up"]
    assert heat.customdata[0][1] == pytest.approx(0.4)


@pytest.mark.slow
@pytest.mark.skipif(figures.find_browser() is None, reason="no Chromium for kaleido (apt-get install chromium)")
@pytest.mark.parametrize("fmt,magic", [("png", b"\x89PNG"), ("svg", b"<svg")])
def test_server_side_export_with_kaleido(fmt, magic):
    fig = go.Figure(go.Bar(x=[1, 2], y=[3, 4]))
    fig.update_layout(template=figures.TEMPLATE, width=400, height=300)
    data = figures.figure_to_image(fig, fmt)
    assert magic in data[:200]


def test_report_html_is_self_contained():
    fig = go.Figure(go.Bar(x=[1], y=[2]))
    html = figures.report_html("Report <x>", [("Checkpoint", "demo")], [("A", fig), ("B", fig)],
                               [("Table", [{"a": 1, "b": [1, 2]}])])
    assert html.count("* plotly.js v") == 1  # plotly.js embedded once, for every figure
    assert "Report &lt;x&gt;" in html and "<td>1; 2</td>" in html
    assert '<script src="http' not in html and "<script src='http" not in html  # nothing loaded from the web
