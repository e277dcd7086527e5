"""Spectra: one matrix's histogram with the fitted MP law, TW edges and outliers; or a role as small multiples."""
import streamlit as st

from spectral import figures
from ui import state, tables

st.title("Spectra")
opened = state.require_current()

analysis = state.analysis(opened)
spectra = opened.workspace.spectra()
reports = {r.name: r for r in analysis.matrices}
if not reports:
    st.info("This checkpoint has no weight matrices to analyse.")
    st.stop()
context = f"{figures.context_line(analysis)}"

c = st.columns([1.6, 2.4, 0.9, 0.8, 0.8], vertical_alignment="bottom")
view = c[0].segmented_control("View", ["One matrix", "Whole role"], default="One matrix", key="spectra_view",
                              required=True)
space = c[2].segmented_control("Spectrum", ["s", "λ"], default="s", key="spectra_space", required=True,
                               help="s: singular values (weight units); λ = s²/N: eigenvalues of the Gram matrix")
log_x = c[3].toggle("log x", key="spectra_log_x")
log_y = c[4].toggle("log y", key="spectra_log_y")
space_name = "singular" if space == "s" else "eigen"

if view == "One matrix":
    names = list(reports)
    name = c[1].selectbox("Matrix", names, key="spectra_matrix",
                          format_func=lambda n: f"{n}  ({reports[n].role}, "
                                                f"{reports[n].shape[0]}×{reports[n].shape[1]})")
    rep, sp = reports[name], spectra[name]
    plot_col, num_col = st.columns([2.6, 1], gap="medium")
    with plot_col:
        fig = figures.spectrum_histogram(sp, rep, settings=analysis.settings, context=context, space=space_name,
                                         log_x=log_x, log_y=log_y)
        tables.chart(fig, key="spectrum_hist", filename=f"spectrum-{name}")
    with num_col:
        st.markdown(f"**{name}**")
        st.caption(f"{rep.shape[0]}×{rep.shape[1]} · {rep.role}" + (f" · tied with {', '.join(rep.tied_with)}"
                                                                     if rep.tied_with else ""))
        null = figures.NULL_LABELS.get(rep.null, rep.null)
        if rep.null_ok:
            st.badge(f"{null} null fits", icon=":material/check:", color="green")
        else:
            st.badge(f"{null} null does not fit", icon=":material/warning:", color="red")
        m1, m2 = st.columns(2)
        m1.metric("σ̂", f"{rep.sigma:.3g}", help="noise level, weight units")
        m2.metric("z max", f"{rep.z_max:.1f}", help="largest z-score against the null (TW units)")
        m1.metric("signal SVs" if rep.null_ok else "signal SVs (null fails)", rep.n_signal if rep.null_ok else
                  f"{rep.n_signal}?", help="singular values above the upper edge" + ("" if rep.null_ok else
                  ": the null does not describe this matrix, so this is not a detection count (warnings below)"))
        m2.metric("below edge", rep.n_below, help="left outliers (only where a lower edge exists)")
        m1.metric("energy rank", rep.energy_rank, help=f"SVs holding {analysis.settings.energy:g} of Σs²")
        m2.metric("utilization", f"{100 * rep.utilization:.1f}%")
        st.markdown(tables.report_markdown(rep))
        for w in rep.warnings:
            st.warning(w, icon=":material/warning:")
    tables.chart(figures.scree_plot(sp, rep, settings=analysis.settings, context=context), key="spectrum_scree",
                 filename=f"singular-values-{name}")
else:
    roles = sorted({r.role for r in reports.values()}, key=lambda r: list(figures.ROLE_ORDER).index(r)
                   if r in figures.ROLE_ORDER else 99)
    role = c[1].selectbox("Role", roles, key="spectra_role")
    chosen = [r for r in reports.values() if r.role == role]
    fig = figures.spectrum_grid([spectra[r.name] for r in chosen], chosen,
                                title=f"Spectra of every {role} matrix ({len(chosen)})", settings=analysis.settings,
                                context=context, space=space_name, log_x=log_x, log_y=log_y)
    tables.chart(fig, key="spectrum_grid", filename=f"spectra-{role}")
