"""Connections: addresses, channels, TLS, the PROXY protocol, timers, connecting out."""
