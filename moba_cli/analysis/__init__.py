"""Analyses behind ``moba compare``: MoBA against full attention (see :mod:`.sparse_vs_full`)."""
