#!/bin/sh
# proxsmtpd example filter: check mail with SpamAssassin.
#
#   FilterType: pipe
#   FilterCommand: /usr/local/share/proxsmtpd/spamassassin.sh reject
#
# Uses spamc (the client of a running spamd, fast) or else the spamassassin
# program.  The checked message, with SpamAssassin's X-Spam-* headers, is
# written to standard output.  With "reject" (the default) spam is refused
# with "550 5.7.1 Message looks like spam"; with "tag" spam is only marked
# and delivered.
#
# When neither program is installed the message passes unchanged and a
# warning goes to syslog, so a missing SpamAssassin never stops mail.  spamc
# itself passes mail unchanged when spamd cannot be reached.
set -u

mode=${1:-reject}
warn() {
    echo "spamassassin.sh: $*" >&2
    logger -p mail.warning -t proxsmtpd-spamassassin -- "$*" 2>/dev/null || true
}

if command -v spamc >/dev/null 2>&1; then
    spamc -E
elif command -v spamassassin >/dev/null 2>&1; then
    spamassassin -e
else
    warn "neither spamc nor spamassassin is installed: mail not checked"
    exec cat
fi
status=$?

case $status in
    0) exit 0 ;;
    1)
        [ "$mode" = tag ] && exit 0
        echo "550 5.7.1 Message looks like spam" >&2
        exit 1 ;;
    *)
        echo "451 4.3.0 Spam check failed (exit $status)" >&2
        exit 1 ;;
esac
