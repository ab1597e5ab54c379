#!/bin/sh
# `make run`: an upstream SMTP server that prints what it receives, and
# proxsmtpd in the foreground in front of it, until Ctrl-C.
#
# Run as root, proxsmtpd drops to `User: nobody` after binding, as a real
# install would with its own account.  Ctrl-C reaches every process of the
# terminal's group: proxsmtpd stops cleanly on it and this script exits 0, so
# make has no failed command to report.  The printing server runs in its own
# session, out of Ctrl-C's way, and is stopped here.
PY=${1:-.venv/bin/python}
HERE=$(cd "$(dirname "$0")" && pwd)
CONF="$HERE/proxsmtpd.conf"
if [ "$(id -u)" = 0 ]; then
    CONF=$(mktemp "${TMPDIR:-/tmp}/proxsmtpd-demo.XXXXXX") || exit 1
    { cat "$HERE/proxsmtpd.conf"; echo "User: nobody"; } > "$CONF"
fi
setsid "$PY" -m aiosmtpd -n -l 127.0.0.1:2526 -c aiosmtpd.handlers.Debugging &
SINK=$!
finish() {
    kill "$SINK" 2>/dev/null
    wait "$SINK" 2>/dev/null
    [ "$CONF" = "$HERE/proxsmtpd.conf" ] || rm -f "$CONF"
}
trap finish EXIT
trap : INT
cat <<MSG

  proxsmtpd listens on 127.0.0.1:2525 and relays to a printing server on 127.0.0.1:2526.
  Try, in another terminal:

    swaks --server 127.0.0.1:2525 --from a@example.org --to b@example.org
    swaks --server 127.0.0.1:2525 --from a@example.org --to b@example.org --body 'cheap viagra'
    $PY -c "import smtplib; smtplib.SMTP('127.0.0.1', 2525).sendmail('a@example.org', ['b@example.org'], 'Subject: hi\r\n\r\nhello\r\n')"

  Ctrl-C stops both.

MSG
"$PY" -m proxsmtp.cli -d 3 -f "$CONF"
