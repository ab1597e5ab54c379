#!/bin/sh
# proxsmtpd example filter: reject messages matching a pattern, with your own
# SMTP reply.
#
#   FilterType: file
#   FilterCommand: /usr/local/share/proxsmtpd/reject_pattern.sh /usr/local/etc/proxsmtpd.patterns "550 5.7.1 Message refused by local policy"
#
# The first argument is a file of extended regular expressions (grep -E),
# one a line, matched case-insensitively against the whole message
# (headers and body) in the file named by $EMAIL.  On a match the filter
# prints the reply (second argument, default "550 5.7.1 Message content
# rejected") on standard error and exits 1: proxsmtpd sends that last line
# of standard error to the client as it is, because it starts with a
# three-digit code.  A reply starting with 250 would drop the message
# silently instead.
#
# A missing pattern file is a local fault: the client gets a temporary
# failure (451) and tries again later, so no mail is lost.
set -u

patterns=${1:-/usr/local/etc/proxsmtpd.patterns}
reply=${2:-550 5.7.1 Message content rejected}

if [ -z "${EMAIL:-}" ]; then
    echo "451 4.3.0 Filter misconfigured: use FilterType file" >&2
    exit 1
fi
if [ ! -r "$patterns" ]; then
    echo "451 4.3.0 Filter misconfigured: cannot read $patterns" >&2
    exit 1
fi

grep -E -i -q -f "$patterns" -- "$EMAIL"
case $? in
    0) echo "$reply" >&2; exit 1 ;;
    1) exit 0 ;;
    *) echo "451 4.3.0 Filter error while matching patterns" >&2; exit 1 ;;
esac
