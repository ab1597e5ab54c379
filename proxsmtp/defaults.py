"""Install-time paths.  `make install` rewrites SYSCONFDIR in the installed copy."""

SYSCONFDIR = "/usr/local/etc"
CONFIG_FILE = SYSCONFDIR + "/proxsmtpd.conf"
