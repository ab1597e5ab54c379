"""Every timer of the proxy.

(The channels' shared wait timer is to join this module; see
docs/ARCHITECTURE.md, Timers.)
"""

from __future__ import annotations

import asyncio
from typing import Awaitable


async def within(timeout: float, awaitable: Awaitable[object],
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Await `awaitable`, or raise TimeoutError after `timeout` seconds.

    asyncio.timeout does the same, but with a state machine and context
    manager calls, and this runs for every session's connect; here it is
    the same idea, a timer cancelling the task, kept to one callback
    (figures: bench/README.md, Against the TCP-relay ceiling)."""
    loop = loop or asyncio.get_running_loop()
    task = asyncio.current_task(loop)
    assert task is not None
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    timer = loop.call_later(timeout, expire)
    try:
        await awaitable
    except asyncio.CancelledError:
        if expired and task.uncancel() == 0:
            raise TimeoutError() from None
        raise
    finally:
        timer.cancel()
