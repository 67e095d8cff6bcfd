"""qrgate firmware: the reader daemon (frames → decode → verdict → feedback → journal)."""

__version__ = "0.1.0"
