#!/bin/sh
# `make run`: an upstream SMTP server that prints what it receives, and
# proxsmtpd in the foreground in front of it, until Ctrl-C.
set -e
PY=${1:-.venv/bin/python}
HERE=$(cd "$(dirname "$0")" && pwd)
"$PY" -m aiosmtpd -n -l 127.0.0.1:2526 -c aiosmtpd.handlers.Debugging &
SINK=$!
trap 'kill $SINK 2>/dev/null; wait $SINK 2>/dev/null' EXIT INT TERM
cat <<MSG

  proxsmtpd listens on 127.0.0.1:2525 and relays to a printing server on 127.0.0.1:2526.
  Try, in another terminal:

    swaks --server 127.0.0.1:2525 --from a@example.org --to b@example.org
    swaks --server 127.0.0.1:2525 --from a@example.org --to b@example.org --body 'cheap viagra'
    $PY -c "import smtplib; smtplib.SMTP('127.0.0.1', 2525).sendmail('a@example.org', ['b@example.org'], 'Subject: hi\r\n\r\nhello\r\n')"

  Ctrl-C stops both.

MSG
"$PY" -m proxsmtp.cli -d 3 -f "$HERE/proxsmtpd.conf"
