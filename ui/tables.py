"""Tables and charts drawn the same way on every page (display only: every number comes from spectral/)."""
from __future__ import annotations

import streamlit as st

from spectral import figures
from spectral.export import matrix_rows


def matrix_table(analysis, *, height: int | str | None = None, key: str | None = None):
    """Every matrix with DESIGN.md's fields; tall enough to show up to 20 rows without scrolling."""
    cfg = st.column_config
    rows = matrix_rows(analysis)
    return st.dataframe(
        rows, hide_index=True, key=key, height=height or min(38 + 35 * len(rows), 38 + 35 * 20),
        column_config={
            "name": cfg.TextColumn("matrix", pinned=True),
            "tied_with": cfg.TextColumn("tied with"),
            "sigma": cfg.NumberColumn("σ̂", format="%.4g", help="noise level in weight units"),
            "edge_upper": cfg.NumberColumn("upper edge", format="%.4g", help="TW-corrected, singular-value units"),
            "edge_lower": cfg.NumberColumn("lower edge", format="%.4g"),
            "n_signal": cfg.NumberColumn("signal SVs", help="singular values above the upper edge; a detection count "
                                                            "only where the null fits (next column)"),
            "null_ok": cfg.CheckboxColumn("null fits", help="the diagnostics say the null describes this matrix "
                                                            "(RMT.md §11); where it does not, the signal count is not "
                                                            "a detection: see warnings"),
            "n_below": cfg.NumberColumn("below", help="left outliers"),
            "z_max": cfg.NumberColumn("z max", format="%.1f"),
            "energy_rank": cfg.NumberColumn("energy rank"),
            "utilization": cfg.ProgressColumn("utilization", format="percent", min_value=0.0, max_value=1.0,
                                              help="energy rank / min(shape)"),
            "stable_rank": cfg.NumberColumn("stable rank", format="%.2f"),
            "effective_rank": cfg.NumberColumn("eff. rank", format="%.1f"),
            "participation_ratio": cfg.NumberColumn("PR", format="%.1f"),
            "spectral_norm": cfg.NumberColumn("‖W‖₂", format="%.4g"),
            "frobenius_norm": cfg.NumberColumn("‖W‖_F", format="%.4g"),
            "alpha": cfg.NumberColumn("α", format="%.2f", help="power-law exponent of the ESD tail"),
            "ave_w_phi": cfg.NumberColumn("Ave_w(φ)", format="%.3f"),
            "ks_distance": cfg.NumberColumn("KS", format="%.3f", help="bulk vs fitted MP"),
        })


def chart(fig, *, key: str | None = None, filename: str = "figure"):
    """A figure as it will be exported: our template (not Streamlit's theme), modebar PNG download at scale 2."""
    config = dict(figures.PLOTLY_CONFIG)
    config["toImageButtonOptions"] = dict(config["toImageButtonOptions"], filename=figures.safe_filename(filename))
    st.plotly_chart(fig, theme=None, config=config, key=key)


def _num(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def report_markdown(rep) -> str:
    """One matrix's analysis row as a two-column markdown table: edges, ranks, fit and null diagnostics."""
    rows = [("upper edge", _num(rep.edge_upper, ".4g")), ("lower edge", _num(rep.edge_lower, ".4g")),
            ("Gavish-Donoho rank", rep.n_optimal), ("stable rank", _num(rep.stable_rank, ".2f")),
            ("effective rank", _num(rep.effective_rank, ".1f")), ("KS to MP (bulk)", _num(rep.ks_distance, ".3f")),
            ("KS to MP (whole spectrum)", _num(rep.ks_whole, ".3f")),
            ("outside the bulk (above / below)", f"{_num(rep.frac_above, '.1%')} / {_num(rep.frac_below, '.1%')}"),
            ("row / column mean-square spread", f"{_num(rep.row_spread, '.2f')} / {_num(rep.col_spread, '.2f')}"
                                                "  (1 = i.i.d.)"),
            ("entry excess kurtosis", _num(rep.excess_kurtosis, ".2f")),
            ("α (power law)", _num(rep.alpha, ".2f")), ("‖W‖₂", _num(rep.spectral_norm, ".4g"))]
    if rep.quant is not None:
        rows.append((f"quantisation {rep.quant}: its noise σ", _num(rep.quant_sigma, ".3g")))
    return "| quantity | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
