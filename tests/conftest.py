"""pytest fixtures around tests/harness.py: upstream servers and proxsmtpd runs.

Each test names its group with a marker (pytest.ini): unit, session, e2e or
system, as a module's `pytestmark` or on the test itself where a module mixes
them; a test with none, or more than one, fails collection.

Every proxsmtpd started through `proxy` gets a private TempDirectory; at
teardown the proxy is stopped and that directory must be empty (temporary files
are "removed after each message": SECURITY in proxsmtpd(8)).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).resolve().parent))

import milterpeers  # noqa: E402
from harness import Proxy, RecordingServer, SmtpSink  # noqa: E402

# Hypothesis fails an example slower than its deadline (200 ms by default),
# a timing assertion: with `make test`'s workers sharing the machine's cores
# (pytest-xdist, Makefile) a property would fail for the load, not for what
# it asserts.  Loaded before any test module makes its own settings, which
# inherit it.
settings.register_profile("proxsmtpd", deadline=None)
settings.load_profile("proxsmtpd")

# The milter peers' fixtures (tests/milterpeers.py), for every test module.
test_milter = milterpeers.test_milter
bad_milter = milterpeers.bad_milter
rspamd_milter = milterpeers.rspamd_milter
opendkim_milter = milterpeers.opendkim_milter
clamav_milter = milterpeers.clamav_milter


@pytest.fixture
def upstream():
    """A RecordingServer with default replies on 127.0.0.1."""
    server = RecordingServer()
    yield server
    server.stop()


@pytest.fixture
def make_upstream():
    """Factory for RecordingServers with custom replies; all stopped at teardown."""
    servers: list[RecordingServer] = []

    def make(**kwargs) -> RecordingServer:
        server = RecordingServer(**kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def sink():
    """Postfix's smtp-sink on 127.0.0.1, one dump file per message."""
    server = SmtpSink()
    yield server
    server.stop()


@pytest.fixture
def postfix():
    """Factory: `postfix(tls=None, sasl=False, **main_cf)` -> a running
    throwaway Postfix smtpd (tests/postfix.py); all stopped at teardown.
    Skips the test where Postfix cannot run (not root, not installed)."""
    import postfix as throwaway

    if not throwaway.available():
        pytest.skip("a throwaway Postfix needs root and Debian's postfix")
    servers: list = []

    def make(**kwargs):
        server = throwaway.PostfixServer(start=False, **kwargs)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def proxy(tmp_path, request):
    """Factory: `proxy({settings}, debug=4, args=(), start=True)` -> a running Proxy.

    At teardown every proxy is stopped by pid and its spool must be empty.
    """
    proxies: list[Proxy] = []

    def make(settings: dict | None = None, start: bool = True, **kwargs) -> Proxy:
        instance = Proxy(tmp_path / ("proxy%d" % len(proxies)), settings, **kwargs)
        proxies.append(instance)
        return instance.start() if start else instance

    yield make
    leftovers = []
    for instance in proxies:
        instance.stop()
        if instance.spool.exists() and instance.spool_files():
            leftovers.append((instance.spool, instance.spool_files()))
    if request.node.rep_call.passed if hasattr(request.node, "rep_call") else True:
        assert not leftovers, "temp files left behind: %r" % leftovers


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the item so fixtures can see failures."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)


GROUPS = ("unit", "session", "e2e", "system")


def pytest_collection_modifyitems(config, items):
    """Every test in exactly one group, so that `-m unit` and its siblings
    between them run the whole suite once."""
    wrong = []
    for item in items:
        groups = {mark.name for mark in item.iter_markers() if mark.name in GROUPS}
        if len(groups) != 1:
            wrong.append("%s: %s" % (item.nodeid, ", ".join(sorted(groups)) or "no group"))
    if wrong:
        raise pytest.UsageError("each test needs exactly one of the markers %s:\n  %s"
                                % (", ".join(GROUPS), "\n  ".join(wrong)))
