"""Verdicts: a pure function of (codes in view, local state, clocks) → decision with a reason."""
