"""Report: the figures of the current state laid out for a paper, each downloadable as PNG and SVG; tables as
CSV/JSON; one self-contained HTML report (the same file `python -m spectral report` writes).

PNG/SVG come two ways: the modebar's camera button (client-side, PNG at scale 2) and the buttons under each figure
(server-side with kaleido and the local Chromium, rendered only when clicked).
"""
import json

import plotly.io as pio
import streamlit as st

from spectral import figures
from spectral.analysis import role_table
from spectral.export import rows_to_csv
from spectral.report import build_report, default_matrix
from ui import state
from ui.tables import chart

st.title("Report")
opened = state.require_current()
settings = state.settings()
analysis = state.analysis(opened, settings)
st.markdown(f"**{figures.checkpoint_label(analysis.checkpoint)}** · {figures.settings_line(analysis.settings)}")
if not analysis.matrices:
    st.info("This checkpoint has no weight matrices to analyse.")
    st.stop()


@st.cache_data(show_spinner=False, max_entries=64)
def _image(fig_json: str, fmt: str) -> bytes:
    """Server-side export, cached by the figure's content; a failure comes back as its one-line message."""
    try:
        return figures.figure_to_image(pio.from_json(fig_json), fmt)
    except figures.FigureExportError as exc:
        return str(exc).encode()


def downloads(fig, stem: str, key: str) -> None:
    """PNG and SVG rendered server-side on click."""
    fig_json, row = fig.to_json(), st.container(horizontal=True)
    no_browser = figures.find_browser() is None
    why = "needs Chromium on the server (apt-get install chromium); the camera icon works in any case"
    for fmt, mime, icon in (("png", "image/png", ":material/image:"), ("svg", "image/svg+xml", ":material/draw:")):
        row.download_button(fmt.upper(), data=lambda fmt=fmt: _image(fig_json, fmt), file_name=f"{stem}.{fmt}",
                            mime=mime, key=f"{key}_{fmt}", on_click="ignore", icon=icon, disabled=no_browser,
                            help=why if no_browser else "server-side, kaleido")


names = [r.name for r in analysis.matrices]
roles = sorted({r.role for r in analysis.matrices}, key=figures.ROLE_ORDER.index)
c = st.columns([2, 2, 1])
matrix = c[0].selectbox("Matrix for the spectrum figure", names, index=names.index(default_matrix(analysis)),
                        key="report_matrix")
role = c[1].selectbox("Role for the small multiples", roles, key="report_role")
log_x = c[2].toggle("log x (spectra)", key="report_log_x")

# what-if figures when the Pruning page has been used in this session and the model runs
choice = st.session_state.get("prune_choice")
session = state.whatif_session(opened)[0] if choice is not None else None
scan = session.last_scan() if session is not None else None
report = build_report(opened.workspace, settings, label=opened.label, matrix=matrix, role=role, log_x=log_x,
                      session=session, choice=choice, scan_by=scan[1] if scan and scan[0] == choice else None)
if session is None:
    st.caption("Pruning figures (compression against KL, sensitivity) appear here once you have used the Pruning "
               "page in this session.")

top = st.container(horizontal=True)
top.download_button("HTML report (all figures)", data=report.html, on_click="ignore", key="report_html",
                    file_name=f"spectra-report-{figures.safe_filename(opened.label)}.html", mime="text/html",
                    icon=":material/description:",
                    help="one self-contained file: interactive figures (plotly.js embedded) and tables; opens offline")
for label, data, name, mime, key in (
        ("Analysis JSON", analysis.to_json(), "analysis.json", "application/json", "report_json"),
        ("Analysis CSV", analysis.to_csv(), "analysis.csv", "text/csv", "report_csv"),
        ("Roles CSV", rows_to_csv(role_table(analysis)), "roles.csv", "text/csv", "report_roles_csv")):
    top.download_button(label, data=data, file_name=name, mime=mime, on_click="ignore", key=key,
                        icon=":material/table:")
st.caption("Camera icon on each figure: PNG at twice the screen size, made in your browser. The PNG/SVG buttons "
           "render the same figure on the server.")

for i, item in enumerate(report.figures):
    st.subheader(item.title)
    chart(item.figure, key=f"report_fig_{i}", filename=item.stem)
    downloads(item.figure, figures.safe_filename(item.stem), key=f"report_dl_{i}")

st.subheader("Tables")
st.dataframe(role_table(analysis), hide_index=True)
if report.whatif is not None:
    st.download_button("Pruning result JSON", data=json.dumps(report.whatif.to_dict(), indent=2),
                       file_name="prune.json", mime="application/json", on_click="ignore", key="report_prune_json",
                       icon=":material/data_object:")
