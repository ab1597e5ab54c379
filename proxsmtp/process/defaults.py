"""Install-time paths.

`make install` rewrites the `SYSCONFDIR = ...` line in the installed copy to
match PREFIX (keep it a single line), so `proxsmtpd -v` and the default of
`-f` name the installed configuration file.
"""

SYSCONFDIR = "/usr/local/etc"
CONFIG_FILE = SYSCONFDIR + "/proxsmtpd.conf"
