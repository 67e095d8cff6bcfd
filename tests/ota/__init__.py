"""Tests of the over-the-air updater (ota/)."""
