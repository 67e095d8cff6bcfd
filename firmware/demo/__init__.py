"""The embedded demo: a generated camera-like reel and a live terminal view."""
