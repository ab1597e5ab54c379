"""Every timer of the proxy's connections, and why each is made as it is.

Two kinds.

**A session's waits** (`Waitable`, `wait_any`).  A session waits several
times per message (for a reply, the next command, a drained peer), so a
wait is one future and no timer of its own: `call_later` and `cancel` cost
about 1.4 us per wait under uvloop (bench/README.md, Second round).  Each
channel keeps one timer for all its waits, moved only when a wait's
deadline comes sooner than the timer; a timer that fires before the
current wait's deadline (a later wait pushed it back) is set again for
that deadline, and one that fires up to `_TIMER_SLACK` early (the loop's
clock granularity) counts as due.  A wait may name a callback that handles
the channels' news itself (`wait_any(news=)`): the session relays plain
lines from there, and `extend_wait` moves the deadline as if the task had
waited again; it wakes the task with `wake()` or `fail()` only for what the
task must do.  These are per line: `extend_wait` and `wake` are one call
each, on the Channel itself (Waitable is its base class, not a helper
object behind it).

**One-shot deadlines** (`within`): a connect, a PROXY header, a health
check's close, an OutProxyProtocol header, a drain, a filter's progress.
One mechanism for all: a timer that cancels the waiting task, turned into
TimeoutError (an OSError; `asyncio.TimeoutError` is the same class) when
it was the timer's cancel.  It is what asyncio.timeout does, kept to one
callback instead of a context manager whose state is an enum.  Measured
for the connect that every session makes (Python 3.11, uvloop):

  - `bench/bytecodes.py --messages 40`, per message: 9852 bytecodes, 297
    calls of proxsmtp functions and 10 of other Python functions with
    `within` as here; with `asyncio.timeout` underneath, 9838, 297 and 16
    (timeout, Timeout.__init__, __aenter__, reschedule and __aexit__ come
    in; current_task is called by both).  Counted with sys.settrace over
    one `await within(10, coroutine())`, whatever Python runs (the
    coroutine included): 53 bytecodes in 3 calls here, 178 in 8 with
    asyncio.timeout.
  - timeit (best of 7 runs of 20000, inside a running uvloop loop) over
    the bare `await coroutine()`: +2.3 to 2.9 us with `within`, +5.6 to
    6.2 us with `asyncio.timeout`, for a coroutine that returns at once
    (as the connect to a local peer nearly does); +1.7 against +5.1 to
    5.6 us for one that suspends once.

So `within` stays hand-made.  asyncio.wait_for (on a future: a second
future and a done callback) and a timer of one's own that fails a future
would be the same deadline made twice more: neither is used.

Not here: the TLS handshake's deadline is the TLS protocol's own
(`ssl_handshake_timeout`), as it must abort the connection under the
protocol itself; LINGER (net/channel.py) is a timer nothing awaits: it
resets a closed connection whose peer does not read.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, TypeVar

T = TypeVar("T")

# A wait's timer may fire this much before its deadline (the loop's clock
# granularity) and still count as due.
_TIMER_SLACK = 0.002


class Waitable:
    """A channel's waits: the pending wait's future, its deadline and the one
    timer moved lazily for all of them (see the module's header).  The
    slots are Channel's (one object per connection, no dict), declared here."""

    __slots__ = ()

    on_ready: Callable[[], None] | None     # the pending wait's wake-up (see wait_any)
    waiter: asyncio.Future | None           # the pending wait's future
    _loop: asyncio.AbstractEventLoop | None     # None: the running one, at the first wait
    _deadline: float                        # the pending wait's, in loop time
    _timer: asyncio.TimerHandle | None
    _timer_at: float                        # when the timer fires
    _corked: list[bytes] | None             # writes held back (Channel.cork): a wait sends them

    def uncork(self) -> None:
        """Send the writes held back (Channel.uncork)."""
        raise NotImplementedError

    def _wake(self) -> None:
        """The channel has news (data, EOF, room to write): tell the wait."""
        if self.on_ready is not None:
            self.on_ready()

    def _set_ready(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def wake(self) -> None:
        """End the pending wait (from a news callback): the task goes on."""
        self._set_ready()

    def fail(self, exc: BaseException) -> None:
        """End the pending wait with `exc`, raised in the waiting task."""
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def extend_wait(self, timeout: float) -> None:
        """The pending wait goes on, for `timeout` seconds from now (a news
        callback handled the news itself: as if the task had waited again)."""
        deadline = self._deadline = self._loop.time() + timeout    # type: ignore[union-attr]
        if self._timer is None or self._timer_at > deadline:
            self._set_timer(deadline)

    def _set_timer(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._timed_out)   # type: ignore[union-attr]
        self._timer_at = when

    def _timed_out(self) -> None:
        """The timer is due: the current wait (if any) times out, unless its
        deadline is later than the wait the timer was set for."""
        self._timer = None
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if self._deadline - self._loop.time() > _TIMER_SLACK:     # type: ignore[union-attr]
            self._set_timer(self._deadline)
        else:
            waiter.set_exception(asyncio.TimeoutError())

    def _stop_timer(self) -> None:
        """Done with this channel: its timer must not keep it alive."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def wait(self, timeout: float) -> Awaitable[None]:
        """Sleep until this channel has news (data, EOF), or time out.
        (wait_any's own coroutine: no frame of its own to resume through.)"""
        return wait_any((self,), timeout)


async def wait_any(channels: tuple[Waitable, ...], timeout: float,
                   news: Callable[[], None] | None = None) -> None:
    """Sleep until any of the channels has news, or raise TimeoutError.

    The first channel owns the wait: its future, and its timer (see the
    module's header).  `news`, if given, is called instead of waking the
    task when a channel has news; it ends the wait with the owner's
    `wake()` or `fail()`, or lets it go on with `extend_wait()`."""
    owner = channels[0]
    loop = owner._loop
    if loop is None:
        loop = owner._loop = asyncio.get_running_loop()
    waiter = owner.waiter = loop.create_future()
    deadline = owner._deadline = loop.time() + timeout
    if owner._timer is None or owner._timer_at > deadline:
        owner._set_timer(deadline)
    ready = owner._set_ready if news is None else news
    for channel in channels:
        if channel._corked is not None:
            channel.uncork()
        channel.on_ready = ready
    try:
        await waiter
    finally:
        # An exception this wait raised holds this frame in its traceback:
        # the future, which holds the exception, must not stay in it.
        owner.waiter = waiter = None
        for channel in channels:
            channel.on_ready = None


async def within(timeout: float, awaitable: Awaitable[T],
                 loop: asyncio.AbstractEventLoop | None = None) -> T:
    """Await `awaitable` and give its result, or raise TimeoutError after
    `timeout` seconds (the awaitable is cancelled then).  To be awaited
    by a task (it is the task that the timer cancels)."""
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
        return await awaitable
    except asyncio.CancelledError:
        if expired and task.uncancel() == 0:
            raise TimeoutError() from None
        raise
    finally:
        timer.cancel()
