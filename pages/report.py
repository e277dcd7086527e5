"""Report: the figures of the current state laid out for a paper, each downloadable as PNG and SVG; tables as
CSV/JSON; one self-contained HTML report.

PNG/SVG come two ways: the modebar's camera button (client-side, PNG at scale 2) and the buttons under each figure
(server-side with kaleido and the local Chromium, rendered only when clicked).
"""
import json

import streamlit as st

from spectral import figures
from spectral.analysis import role_table
from ui import state, whatif
from ui.tables import chart, matrix_rows, rows_to_csv

st.title("Report")
loaded = state.require_current()

settings = state.settings()
analysis = state.analysis(loaded, settings)
spectra = loaded.workspace.spectra()
reports = {r.name: r for r in analysis.matrices}
context = figures.context_line(analysis)

st.markdown(f"**{figures.checkpoint_label(analysis.checkpoint)}** · {figures.settings_line(analysis.settings)}")
if not reports:
    st.info("This checkpoint has no weight matrices to analyse.")
    st.stop()


@st.cache_data(show_spinner=False, max_entries=64)
def _image(fig_json: str, fmt: str) -> bytes:
    """Server-side export, cached by the figure's content."""
    import plotly.io as pio

    return figures.figure_to_image(pio.from_json(fig_json), fmt)


def downloads(fig, stem: str, key: str) -> None:
    """PNG and SVG rendered server-side on click; a failure is reported in place by the download itself."""
    fig_json = fig.to_json()

    def render(fmt):
        def make() -> bytes:
            try:
                return _image(fig_json, fmt)
            except figures.FigureExportError as exc:
                return str(exc).encode()
        return make

    row = st.container(horizontal=True)
    no_browser = figures.find_browser() is None
    why = "needs Chromium on the server (apt-get install chromium); the camera icon works in any case"
    row.download_button("PNG", data=render("png"), file_name=f"{stem}.png", mime="image/png", key=f"{key}_png",
                        on_click="ignore", icon=":material/image:", disabled=no_browser,
                        help=why if no_browser else "server-side, kaleido, scale 2")
    row.download_button("SVG", data=render("svg"), file_name=f"{stem}.svg", mime="image/svg+xml",
                        key=f"{key}_svg", on_click="ignore", icon=":material/draw:", disabled=no_browser,
                        help=why if no_browser else "server-side, kaleido")


# -------------------------------------------------------------------------------------------------- choices
c = st.columns([2, 2, 1])
default_matrix = max(reports.values(), key=lambda r: r.n_signal).name
names = list(reports)
matrix = c[0].selectbox("Matrix for the spectrum figure", names, index=names.index(default_matrix),
                        key="report_matrix")
roles = sorted({r.role for r in reports.values()},
               key=lambda r: figures.ROLE_ORDER.index(r) if r in figures.ROLE_ORDER else 99)
role = c[1].selectbox("Role for the small multiples", roles, key="report_role")
log_x = c[2].toggle("log x (spectra)", key="report_log_x")

chosen = [r for r in analysis.matrices if r.role == role]
report_figures = [
    ("Signal rank vs energy rank by role", "ranks-by-role", figures.rank_contrast_by_role(analysis,
                                                                                        role_table(analysis))),
    ("Signal rank vs energy rank by matrix", "ranks-by-matrix", figures.rank_contrast_by_matrix(analysis)),
    ("Parameters kept", "params-kept", figures.params_kept_bars(analysis)),
    (f"Spectrum of {matrix}", f"spectrum-{matrix}",
     figures.spectrum_histogram(spectra[matrix], reports[matrix], settings=analysis.settings, context=context,
                                log_x=log_x)),
    (f"Singular values of {matrix}", f"scree-{matrix}",
     figures.scree_plot(spectra[matrix], reports[matrix], settings=analysis.settings, context=context)),
    (f"Spectra of every {role} matrix", f"spectra-{role}",
     figures.spectrum_grid([spectra[r.name] for r in chosen], chosen, title=f"Spectra of every {role} matrix",
                           settings=analysis.settings, context=context, log_x=log_x)),
]

# pruning figures, when the Pruning page has been used in this session (its evaluator exists) and the model can run
prune_choice = st.session_state.get("prune_choice")
ev = loaded.peek(whatif.evaluator_key(whatif.eval_key())) if prune_choice is not None else None
prune_result = None
if ev is not None:
    choice = whatif.Choice(**prune_choice)
    session = whatif.session_whatif(loaded, ev, settings)
    prune_result = whatif.run(loaded, session, session.plan(choice.strategy, choice.value, scope=choice.scope,
                                                            precision=choice.precision))
    encoder = ev.runnable.kind == "encoder"  # an encoder has no KL: it reports the cosine of its embeddings
    points = whatif.standard_points(loaded.sha256, settings, choice.scope, loaded, ev, whatif.eval_key())
    title = "Compression against " + ("embedding damage" if encoder else "KL")
    report_figures.append((title, "compression-vs-kl", figures.compression_vs_kl(
        points, current=whatif.result_point(choice.label, prune_result), title=title,
        damage="cosine" if encoder else "kl", context=f"{context} · scope {choice.scope}")))
    request = st.session_state.get("sens_request")
    if request:
        req_choice = whatif.Choice(**request["choice"])
        rows = whatif.sensitivity(loaded.sha256, settings, req_choice, request["by"], loaded, ev,
                              whatif.eval_key())
        report_figures.append(("Sensitivity", "sensitivity", figures.sensitivity_from_scan(
            rows, by=request["by"], title=f"Sensitivity: KL when one {request['by']} alone is cut "
                                          f"({req_choice.label})", context=context)))
else:
    st.caption("Pruning figures (compression against KL, sensitivity) appear here once you have used the Pruning "
               "page in this session.")

# -------------------------------------------------------------------------------------------------- whole report
tables_for_report = [("Matrix roles", role_table(analysis)), ("Weight matrices", matrix_rows(analysis))]
header = [("Checkpoint", analysis.checkpoint.get("path")), ("sha256", analysis.checkpoint.get("sha256")),
          ("Format", analysis.checkpoint.get("format")), ("Parameters", f"{analysis.checkpoint.get('n_params'):,}"),
          ("Settings", figures.settings_line(analysis.settings))]
top = st.container(horizontal=True)
top.download_button(
    "HTML report (all figures)", icon=":material/description:", on_click="ignore", key="report_html",
    data=lambda: figures.report_html(f"Spectra Explorer report: {loaded.label}", header,
                                     [(t, f) for t, _, f in report_figures], tables_for_report),
    file_name=f"spectra-report-{figures.safe_filename(loaded.label)}.html", mime="text/html",
    help="one self-contained file: interactive figures (plotly.js embedded) and tables; opens offline")
top.download_button("Analysis JSON", data=analysis.to_json(), file_name="analysis.json", mime="application/json",
                       on_click="ignore", key="report_json", icon=":material/data_object:")
top.download_button("Analysis CSV", data=analysis.to_csv(), file_name="analysis.csv", mime="text/csv",
                       on_click="ignore", key="report_csv", icon=":material/table:")
top.download_button("Roles CSV", data=rows_to_csv(role_table(analysis)), file_name="roles.csv", mime="text/csv",
                       on_click="ignore",
                       key="report_roles_csv", icon=":material/table:")
st.caption("Camera icon on each figure: PNG at twice the screen size, made in your browser. The PNG/SVG buttons "
           "render the same figure on the server.")

for i, (title, stem, fig) in enumerate(report_figures):
    st.subheader(title)
    chart(fig, key=f"report_fig_{i}", filename=stem)
    downloads(fig, figures.safe_filename(stem), key=f"report_dl_{i}")

st.subheader("Tables")
st.dataframe(role_table(analysis), hide_index=True)
if prune_result is not None:
    st.download_button("Pruning result JSON", data=json.dumps(prune_result.to_dict(), indent=2),
                       file_name="prune.json", mime="application/json", on_click="ignore", key="report_prune_json",
                       icon=":material/data_object:")
