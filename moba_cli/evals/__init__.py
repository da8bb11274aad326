"""Evaluations of MoBA against full attention on the same weights: needle, RULER, loss by position."""
