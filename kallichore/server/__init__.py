"""Serving the APIs: hypercorn in the supervisor's nursery, and its transports."""
