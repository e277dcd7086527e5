"""Ranks: the MP signal rank against the energy rank, per matrix and per role, and what each would keep."""
import streamlit as st

from spectral import figures
from spectral.analysis import role_table
from ui import state, tables
from ui.sidebar import human_count

st.title("Ranks")
opened = state.require_current()

analysis = state.analysis(opened)
if not analysis.matrices:
    st.info("This checkpoint has no weight matrices to analyse.")
    st.stop()
st.markdown("Random-matrix theory says only the singular values above the bulk edge carry **signal**; the "
            f"**energy rank** counts how many it takes to hold {analysis.settings.energy:g} of the matrix's energy "
            "(Σs²). A large gap means most of the rank the network uses looks like noise to MP.")

summary = analysis.summary
total = summary["matrix_params"]
c = st.columns(3)
c[0].metric("Matrix parameters", human_count(total), help=f"{total:,}")
c[1].metric("Kept at the MP signal rank", human_count(summary["params_kept_mp"]),
            f"{100 * summary['params_kept_mp'] / max(total, 1):.1f}% of dense", delta_color="off", delta_arrow="off",
            help="k·(rows+cols) per matrix at k = signal SVs, capped at rows·cols")
c[2].metric("Kept at the energy rank", human_count(summary["params_kept_energy"]),
            f"{100 * summary['params_kept_energy'] / max(total, 1):.1f}% of dense", delta_color="off",
            delta_arrow="off",
            help=f"k·(rows+cols) per matrix at k = energy rank (p = {analysis.settings.energy:g})")

by = st.segmented_control("Group by", ["Matrix role", "Matrix"], default="Matrix role", key="ranks_by",
                          required=True)
roles = role_table(analysis)
if by == "Matrix role":
    tables.chart(figures.rank_contrast_by_role(analysis, roles), key="ranks_role_chart", filename="ranks-by-role")
    rows = [{"role": r["role"], "matrices": r["matrices"], "full rank": r["full_rank"], "signal SVs": r["n_signal"],
             "signal %": r["signal_pct"], "energy rank": r["energy_rank"], "utilization %": r["utilization_pct"]}
            for r in roles]
else:
    tables.chart(figures.rank_contrast_by_matrix(analysis), key="ranks_matrix_chart", filename="ranks-by-matrix")
    rows = [{"matrix": r["label"], "role": r["role"], "full rank": r["rank"], "signal SVs": r["n_signal"],
             "signal %": r["signal_pct"], "energy rank": r["energy_rank"], "utilization %": r["utilization_pct"]}
            for r in figures.rank_rows_by_matrix(analysis)]
st.dataframe(rows, hide_index=True, column_config={
    "signal %": st.column_config.NumberColumn(format="%.1f%%"),
    "utilization %": st.column_config.ProgressColumn(format="%.1f%%", min_value=0.0, max_value=100.0)})
tables.chart(figures.params_kept_bars(analysis), key="ranks_params_chart", filename="params-kept")
