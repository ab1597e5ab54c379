"""proxsmtpd: a transparent, filtering SMTP proxy (a Python port of proxsmtp)."""

__version__ = "1.10.0"
