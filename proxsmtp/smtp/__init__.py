"""The SMTP language: reply texts and status words, command syntax, the peer client."""
