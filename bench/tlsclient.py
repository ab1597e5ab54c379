"""STARTTLS clients for the benchmark: messages over TLS, and held TLS sessions.

smtp-source speaks no TLS, so the TLS section drives its own client: asyncio
(uvloop when installed) in the harness process, each session connect, EHLO,
STARTTLS, handshake, EHLO, MAIL, RCPT, DATA, QUIT.  The same client runs on
both paths, so its own cost falls on both alike.  The certificate is a
throwaway self-signed one made with openssl in the run's work directory.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import time

try:
    import uvloop
except ImportError:
    uvloop = None

HOST = "127.0.0.1"


class TLSClientError(Exception):
    """A session did not go as SMTP says (unexpected reply, closed, timeout)."""


def make_certificate(directory: str) -> tuple[str, str]:
    """(certificate, key) files: self-signed RSA 2048 for bench.test, two days."""
    cert, key = os.path.join(directory, "bench-cert.pem"), os.path.join(directory, "bench-key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", cert, "-subj", "/CN=bench.test", "-days", "2",
                    "-addext", "subjectAltName=DNS:bench.test,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def client_context() -> ssl.SSLContext:
    """Encryption without verification, as opportunistic SMTP TLS does."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def _reply(reader: asyncio.StreamReader, want: bytes) -> None:
    while True:
        line = await reader.readline()
        if not line:
            raise TLSClientError("connection closed waiting for %s" % want.decode())
        if line[3:4] != b"-":
            break
    if not line.startswith(want):
        raise TLSClientError("expected %s, got %r" % (want.decode(), line[:80]))


async def _command(reader, writer, line: bytes, want: bytes) -> None:
    writer.write(line)
    await _reply(reader, want)


async def _starttls_session(port: int, context: ssl.SSLContext):
    """A session up to the EHLO after STARTTLS: (reader, writer)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    await _reply(reader, b"220")
    await _command(reader, writer, b"EHLO bench.example\r\n", b"250")
    await _command(reader, writer, b"STARTTLS\r\n", b"220")
    await writer.start_tls(context)
    await _command(reader, writer, b"EHLO bench.example\r\n", b"250")
    return reader, writer


async def _send_one(port: int, context: ssl.SSLContext, body: bytes) -> None:
    reader, writer = await _starttls_session(port, context)
    try:
        await _command(reader, writer, b"MAIL FROM:<bench@example.com>\r\n", b"250")
        await _command(reader, writer, b"RCPT TO:<sink@example.com>\r\n", b"250")
        await _command(reader, writer, b"DATA\r\n", b"354")
        await _command(reader, writer, body + b".\r\n", b"250")
        await _command(reader, writer, b"QUIT\r\n", b"221")
    finally:
        writer.close()


def _message(size: int) -> bytes:
    line = b"x" * 76 + b"\r\n"
    head = b"From: bench@example.com\r\nTo: sink@example.com\r\nSubject: tls bench\r\n\r\n"
    return head + line * max(1, size // len(line))


def _run(coroutine):
    if uvloop is not None:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coroutine)
    return asyncio.run(coroutine)


def send(port: int, sessions: int, messages: int, size: int, timeout: float = 900.0) -> float:
    """`messages` messages over STARTTLS, `sessions` at a time, one session
    each; the wall-clock seconds.  Raises TLSClientError on any failure."""
    async def main() -> float:
        context, body = client_context(), _message(size)
        left = iter(range(messages))

        async def worker() -> None:
            for _ in left:
                await asyncio.wait_for(_send_one(port, context, body), 60)
        started = time.perf_counter()
        try:
            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(sessions))), timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise TLSClientError("%s: %s" % (type(exc).__name__, exc)) from None
        return time.perf_counter() - started
    return _run(main())


def hold(port: int, count: int, measure, batch: int = 100, timeout: float = 300.0) -> dict:
    """Open `count` sessions through STARTTLS and EHLO, `batch` at a time; call
    `measure()` while all are held; close them.  Returns {"held", "failed",
    "failures" (a sample), "seconds" (to establish), "measured" (its result)}."""
    async def main() -> dict:
        context = client_context()
        held, failures = [], []
        gate = asyncio.Semaphore(batch)

        async def one() -> None:
            async with gate:
                try:
                    held.append(await asyncio.wait_for(_starttls_session(port, context), 60))
                except (OSError, asyncio.TimeoutError, TLSClientError) as exc:
                    failures.append("%s: %s" % (type(exc).__name__, exc))
        started = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), timeout)
        seconds = time.perf_counter() - started
        await asyncio.sleep(1.0)
        measured = measure()
        for _, writer in held:
            writer.close()
        await asyncio.sleep(0.5)
        return {"held": len(held), "failed": len(failures),
                "failures": sorted(set(failures))[:5], "seconds": seconds, "measured": measured}
    return _run(main())
