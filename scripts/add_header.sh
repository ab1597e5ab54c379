#!/bin/sh
# proxsmtpd example filter: add a header to every message.
#
#   FilterType: pipe
#   FilterCommand: /usr/local/share/proxsmtpd/add_header.sh
#
# The message arrives on standard input exactly as the client sent it (lines
# end in CRLF) and the filtered message is written to standard output.  The
# new header goes first, which is always a valid place for a header.
#
# $CLIENT and the other variables proxsmtpd sets come from the network: only
# ever use them as data (as printf arguments here), never inside a command
# line that the shell parses again.
set -u

name=${PROXSMTPD_HEADER:-X-Proxsmtpd-Filtered}
printf '%s: from %s by %s\r\n' "$name" "${CLIENT:-unknown}" "$(uname -n)" || exit 1
exec cat
