"""Serving the APIs: the TCP front door, hypercorn on the Unix socket, and the daemon."""
