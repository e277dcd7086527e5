"""The browser-less load client (bench/streamlit_client.py) drives a real `streamlit run` as a browser would: it
opens Pruning, picks a strategy, moves the slider as a fragment rerun, and the caption that comes back names the value
it sent (the metrics above it were computed for that cut) and the server's time for the move."""
from __future__ import annotations

import asyncio

import pytest

from bench.bench_load import engine_seconds
from bench.streamlit_client import StreamlitSession
from tests.browser import streamlit_server

pytestmark = pytest.mark.slow


def test_a_protocol_session_moves_the_pruning_slider_and_gets_that_moves_numbers():
    async def drive(url: str):
        session = await StreamlitSession.connect(url)
        try:
            await session.open_page("Pruning")
            assert {"prune_strategy"} <= set(session.widgets)
            strategy = ("prune_strategy", "string_value", "Rank fraction")
            first = await session.rerun([strategy], fragment="prune_strategy", until="rank 50%**:")
            moved = await session.rerun([strategy, ("prune_rank", "double_array_value", [0.35])],
                                        fragment="prune_rank", until="rank 35%**:")
            return first, moved
        finally:
            await session.close()

    with streamlit_server() as url:
        first, moved = asyncio.run(drive(url))
    assert first.until is not None and moved.until is not None
    assert 0 < moved.until <= moved.finished
    assert "18 matrices cut" in moved.text and engine_seconds(moved.text) >= 0
