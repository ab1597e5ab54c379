"""One worker's idle milter connections, kept across client sessions for the
milters named in MilterReuse (proxsmtpd(8) MILTERS).

A client session's conversation with a milter ends with SMFIC_QUIT_NC
("quit, new connection follows", Sendmail 8.14's libmilter/mfdef.h) instead
of SMFIC_QUIT, and the connection, still negotiated, waits here; the next
client session starts on it with SMFIC_CONNECT, without a new TCP
connection or OPTNEG.  Only a milter the operator names: libmilter (OpenDKIM,
clamav-milter, every milter on Sendmail's libmilter) takes QUIT_NC only at
the end of a message it let continue (engine.c: NX_ENDM), and in every other
state drops it and the next SMFIC_CONNECT without a word, so the new client
would be judged as the old one.  rspamd's milter resets its session on it
(src/libserver/milter.c, RSPAMD_MILTER_RESET_QUIT_NC).

- Kept only when the session's whole conversation with it ended cleanly
  (no step cut short, no error, nothing unread).
- KEPT idle per milter per worker stay for IDLE_TIME; while the worker's
  sessions come back for more (a burst: the most recently given back is
  taken first), those beyond KEPT stay SURPLUS_TIME, up to MOST in all.
  One the milter closed or wrote to while idle is closed (QUIT), as are all
  of them when the worker stops.
- A kept connection that fails once reused gets MilterDefaultAction, as a
  new one would (the log line says it was kept), and the worker keeps no
  more connections to that milter: one that closes at QUIT_NC (named in
  MilterReuse by mistake) costs one session, not every other one.
"""

from __future__ import annotations

import asyncio

from ..process.log import log
from .milter import Milter

KEPT = 4            # idle connections per milter per worker kept IDLE_TIME
MOST = 64           # idle connections per milter per worker at most
# Seconds an idle connection is kept: far below the milters' own idle
# timeouts (libmilter's 7210 s by default, rspamd's milter I/O timeout),
# so that the milter never closes one just as it is taken again.
IDLE_TIME = 10.0
# Seconds one beyond KEPT is kept: a loaded worker's next session comes
# within milliseconds, so a second that left it unused means the burst is over.
SURPLUS_TIME = 1.0


class MilterPool:
    """This worker's idle milter connections, by milter spec."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.idle: dict[str, list[Milter]] = {}        # given back last, last
        self._sweep: asyncio.TimerHandle | None = None
        self.refused: set[str] = set()      # milters a kept connection failed with

    def take(self, spec: str) -> Milter | None:
        """An idle connection to the milter `spec` that is still sound, or None."""
        idle = self.idle.get(spec)
        now = self.loop.time()
        while idle:
            milter = idle.pop()
            link = milter.link
            if link is None or link.error or link.packets:
                _retire(milter, "closed or written to while idle")
                continue
            if milter.expires <= now:
                _retire(milter, "idle too long")
                continue
            return milter
        return None

    def give_back(self, milter: Milter) -> None:
        """A connection whose client session ended cleanly: QUIT_NC, and kept."""
        if milter.name in self.refused:
            milter.close()
            return
        try:
            milter.quit_nc()
        except Exception as exc:        # (MilterError: the link failed just now)
            _retire(milter, str(exc))
            return
        idle = self.idle.setdefault(milter.name, [])
        if len(idle) >= MOST:
            _retire(idle.pop(0), "%d idle already" % MOST)
        # (`expires` holds when it is to be closed)
        expires = milter.expires = self.loop.time() + (
            IDLE_TIME if len(idle) < KEPT else SURPLUS_TIME)
        idle.append(milter)
        if self._sweep is None or self._sweep.when() > expires:
            if self._sweep is not None:
                self._sweep.cancel()
            self._sweep = self.loop.call_at(expires, self._expire)

    def refuse(self, spec: str) -> None:
        """A kept connection to `spec` failed: keep no more for this worker."""
        if spec not in self.refused:
            self.refused.add(spec)
            log.warning("milter %s: a kept connection failed: its connections are no longer "
                        "kept (MilterReuse)", spec)
        for milter in self.idle.pop(spec, []):
            milter.close()

    def _expire(self) -> None:
        """Close what stayed idle its time; come back for the rest."""
        self._sweep = None
        now = self.loop.time()
        soonest = None
        for idle in self.idle.values():
            for milter in [milter for milter in idle if milter.expires <= now]:
                idle.remove(milter)
                _retire(milter, "idle too long")
            for milter in idle:
                if soonest is None or milter.expires < soonest:
                    soonest = milter.expires
        if soonest is not None:
            self._sweep = self.loop.call_at(soonest, self._expire)

    def close_all(self) -> None:
        """The worker stops: every idle connection says QUIT and is closed."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for idle in self.idle.values():
            while idle:
                idle.pop().close()


def _retire(milter: Milter, why: str) -> None:
    log.debug("milter %s: kept connection closed: %s", milter.name, why)
    milter.close()


_pool: MilterPool | None = None


def worker_pool() -> MilterPool:
    """This worker's pool (one per event loop: an in-process test's next loop
    gets a new one)."""
    global _pool
    loop = asyncio.get_running_loop()
    if _pool is None or _pool.loop is not loop:
        _pool = MilterPool(loop)
    return _pool


def close_idle() -> None:
    """The worker stops: its idle milter connections are closed (QUIT)."""
    if _pool is not None:
        _pool.close_all()
