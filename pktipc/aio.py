"""pktipc for asyncio.

    async with pktipc.aio.connect("tap", "ids") as client:
        async for batch in client:
            with batch:
                ...
"""

from ._client.aio import AsyncClient, connect

__all__ = ["AsyncClient", "connect"]
