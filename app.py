"""Spectra Explorer: the Streamlit dashboard. `streamlit run app.py [-- --models DIR]`.

This file only sets up the page, the navigation and the sidebar; each page in pages/ is a short script that reads
widgets, calls `spectral/` and draws. Shared state (loaded checkpoints, this session's choices) is in ui/state.py.
"""
import streamlit as st

from spectral.threads import configure_threads
from ui import state
from ui.sidebar import sidebar

st.set_page_config(page_title="Spectra Explorer", page_icon=":material/ssid_chart:", layout="wide",
                   menu_items={"About": "Spectra Explorer: random-matrix analysis and live pruning of weight "
                                        "matrices."})

configure_threads(interactive=True)  # leave a core to the server and the browser (spectral/threads.py)

pages = [
    st.Page("pages/overview.py", title="Overview", icon=":material/home:", default=True),
    st.Page("pages/spectra.py", title="Spectra", icon=":material/bar_chart:"),
    st.Page("pages/ranks.py", title="Ranks", icon=":material/stacked_bar_chart:"),
    st.Page("pages/compare.py", title="Compare", icon=":material/compare_arrows:"),
    st.Page("pages/pruning.py", title="Pruning", icon=":material/content_cut:"),
    st.Page("pages/report.py", title="Report", icon=":material/description:"),
    st.Page("pages/research.py", title="Research", icon=":material/science:"),
]
page = st.navigation(pages)
sidebar(state.current())
page.run()
