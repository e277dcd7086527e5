"""The sidebar on every page: which checkpoint is loaded, and the analysis settings every page uses."""
from __future__ import annotations

import streamlit as st

from spectral.library import Opened
from ui import state


def human_count(n: int) -> str:
    """1234567 -> '1.23 M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return str(n)


def sidebar(opened: Opened | None) -> None:
    with st.sidebar:
        box = st.container(border=True, key="checkpoint_box")
        if opened is None:
            box.markdown("**No checkpoint loaded**")
            box.caption("Upload one on the Overview page.")
        else:
            ck = opened.checkpoint
            origin = {"demo": "bundled demo", "upload": "uploaded", "server": "server folder",
                      "gallery": "gallery"}[opened.origin]
            box.markdown(f"**Checkpoint:** `{opened.label}`")
            fmt = "" if ck.format == "demo" else f" · {ck.format}"
            box.caption(f"{origin}{fmt} · {human_count(ck.n_params)} parameters · "
                        f"{len(opened.workspace.matrices)} matrices  \nsha256 `{ck.sha256[:16]}`")
        st.markdown("**Analysis settings**")
        state.settings_widgets()
