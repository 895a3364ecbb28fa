"""The pooled HTTP client the API reaches its inference replicas with."""

from __future__ import annotations

import asyncio

import httpx

_client: httpx.AsyncClient | None = None
_client_loop: asyncio.AbstractEventLoop | None = None


def upstream_client() -> httpx.AsyncClient:
    """The pooled client of the running event loop (a server runs one loop; its connections belong to it)."""
    global _client, _client_loop
    loop = asyncio.get_running_loop()
    if _client is None or _client_loop is not loop:
        _client, _client_loop = httpx.AsyncClient(timeout=httpx.Timeout(600, connect=5)), loop
    return _client


async def close_upstream_client() -> None:
    """Close the pooled client (at shutdown, or at the end of a test's event loop)."""
    global _client, _client_loop
    if _client is not None:
        client, _client, _client_loop = _client, None, None
        await client.aclose()
