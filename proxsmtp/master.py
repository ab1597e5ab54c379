"""The master process: listening socket, privileges, daemon, workers."""

from __future__ import annotations

import os

from . import listener
from .config import Config
from .log import log
from .worker import LocalSlots, Worker


def run(config: Config, options) -> int:
    try:
        sock = listener.create(config)
    except listener.ListenError as exc:
        log.error("%s", exc)
        return 1
    if options.pid_file:
        with open(options.pid_file, "w") as handle:
            handle.write("%d\n" % os.getpid())
    try:
        Worker(config, sock, LocalSlots(config.MaxConnections)).run()
    finally:
        if options.pid_file:
            try:
                os.unlink(options.pid_file)
            except OSError:
                pass
    return 0
