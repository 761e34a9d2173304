"""kallichore: a headless Jupyter kernel supervisor built on trio."""

__version__ = "0.1.0"
