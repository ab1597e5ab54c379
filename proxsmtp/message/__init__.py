"""One message: its envelope, its intake, the DATA paths, the spool, the Header line."""
