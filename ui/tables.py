"""Tables and small shared widgets for the pages (display only: every number comes from spectral/)."""
from __future__ import annotations

import csv
import io

import streamlit as st

from spectral import figures
from ui import state

MATRIX_COLUMNS = ["name", "shape", "role", "tied_with", "sigma", "edge_upper", "edge_lower", "n_signal", "n_below",
                  "z_max", "energy_rank", "utilization", "stable_rank", "effective_rank", "participation_ratio",
                  "spectral_norm", "frobenius_norm", "alpha", "ave_w_phi", "ks_distance", "warnings"]


def matrix_rows(analysis) -> list[dict]:
    """DESIGN.md's per-matrix fields, with lists shown as text."""
    rows = []
    for r in analysis.matrices:
        d = r.to_dict()
        d["shape"] = f"{d['shape'][0]}×{d['shape'][1]}"
        d["tied_with"] = ", ".join(d["tied_with"])
        d["warnings"] = "; ".join(d["warnings"])
        rows.append({k: d.get(k) for k in MATRIX_COLUMNS})
    return rows


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
            "n_signal": cfg.NumberColumn("signal SVs", help="singular values above the upper edge"),
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


def runnable_or_reason(loaded: state.Loaded):
    """(Runnable, None) when the architecture is known, else (None, one-line reason); built once per checkpoint."""

    def build():
        from models.registry import NotRunnable, runnable_model

        try:
            return runnable_model(loaded.workspace.checkpoint), None
        except NotRunnable as exc:
            return None, str(exc)
        except Exception as exc:  # an adapter bug must not take the page down
            return None, f"{type(exc).__name__}: {exc}"

    with st.spinner("Building the model…"):
        return loaded.shared("runnable", build)


def chart(fig, *, key: str | None = None, filename: str = "figure"):
    """A figure as it will be exported: our template (not Streamlit's theme), modebar PNG download at scale 2."""
    config = dict(figures.PLOTLY_CONFIG)
    config["toImageButtonOptions"] = dict(config["toImageButtonOptions"], filename=figures.safe_filename(filename))
    st.plotly_chart(fig, theme=None, config=config, key=key)


def rows_to_csv(rows: list[dict]) -> str:
    """A list of flat dicts as CSV text (lists joined with ';')."""
    if not rows:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ";".join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in row.items()})
    return out.getvalue()
