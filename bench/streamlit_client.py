"""A Streamlit session driven over its own websocket protocol, without a browser: for load benchmarks.

Four headless Chromiums on the server's two cores measure the browsers as much as the server (bench/bench_load.py
saw them take 1-1.5 cores of the 2 while the server got 0.4-0.6). This client speaks what the browser speaks to
`/_stcore/stream` (Streamlit's protobufs: a `BackMsg` asking for a rerun with widget states, `ForwardMsg`s back)
and costs next to nothing, so the server's own latency under several sessions can be read alone. It knows only
what the load benchmark needs: pages by name, widgets by their user key, fragment reruns, and the text of markdown
elements (captions). Written by hand because Streamlit ships no client: its own testing tool (`AppTest`) runs the
script in-process, without the server, its websocket or its threads.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import websockets
from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

TIMEOUT = 120.0  # seconds to wait for one message before the session is declared dead (asyncio.TimeoutError);
# among the causes: Streamlit drops, without a word, a fragment rerun for a fragment the page no longer draws


@dataclass
class Rerun:
    """What one rerun returned: seconds from the request to the first markdown element containing `until` (None if
    none did), and to the server's "script finished"."""

    until: float | None
    finished: float
    text: str = ""  # that element's text


@dataclass
class StreamlitSession:
    """One browser-less session: `await StreamlitSession.connect(url)`, then `rerun(...)`."""

    socket: object
    pages: dict[str, str] = field(default_factory=dict)  # page name -> page_script_hash (from "navigation")
    widgets: dict[str, str] = field(default_factory=dict)  # user key -> widget id
    fragments: dict[str, str] = field(default_factory=dict)  # user key -> id of the fragment it was drawn in
    page: str = ""  # the current page's script hash

    @classmethod
    async def connect(cls, base_url: str) -> StreamlitSession:
        url = base_url.replace("http://", "ws://").replace("https://", "wss://") + "/_stcore/stream"
        socket = await websockets.connect(url, subprotocols=["streamlit"], max_size=None)
        return cls(socket)

    async def close(self) -> None:
        await self.socket.close()

    async def open_page(self, name: str) -> Rerun:
        """Run the app (the first time) and then the page called `name` (its navigation title)."""
        if not self.pages:
            await self.rerun()
        self.page = self.pages[name]
        return await self.rerun()

    async def rerun(self, states: Iterable[tuple[str, str, object]] = (), *, fragment: str = "",
                    until: str | None = None) -> Rerun:
        """Ask for a rerun of the current page with these widget states, (user key, WidgetState field, value) such as
        ("prune_rank", "double_array_value", [0.45]), as a rerun of `fragment` (a user key drawn in it) when given;
        read messages until the script finishes."""
        message = BackMsg()
        client = message.rerun_script
        client.page_script_hash = self.page
        if fragment:
            client.fragment_id = self.fragments[fragment]
        for key, kind, value in states:
            state = client.widget_states.widgets.add()
            state.id = self.widgets[key]
            if kind.endswith("_array_value"):
                getattr(state, kind).data.extend(value)
            else:
                setattr(state, kind, value)
        start = time.perf_counter()
        found, text = None, ""
        await self.socket.send(message.SerializeToString())
        while True:
            forward = ForwardMsg()
            forward.ParseFromString(await asyncio.wait_for(self.socket.recv(), TIMEOUT))
            kind = forward.WhichOneof("type")
            if kind == "navigation":
                self.pages = {p.page_name: p.page_script_hash for p in forward.navigation.app_pages}
            elif kind == "delta" and forward.delta.WhichOneof("type") == "new_element":
                element = forward.delta.new_element
                body = getattr(element, element.WhichOneof("type"))
                widget = getattr(body, "id", "")
                if widget.startswith("$$ID-"):
                    key = widget.split("-", 2)[2]  # $$ID-<hash>-<user key>
                    self.widgets[key] = widget
                    self.fragments[key] = forward.delta.fragment_id
                if found is None and until is not None and until in getattr(body, "body", ""):
                    found, text = time.perf_counter() - start, body.body
            elif kind == "script_finished":
                return Rerun(found, time.perf_counter() - start, text)
