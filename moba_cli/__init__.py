"""moba: a command-line experiment toolkit for MoBA (Mixture of Block Attention, arXiv 2502.13189)."""

from moba_cli.errors import MobaError
from moba_cli.integrations.hf_hook import install_transformers_hook as _install_transformers_hook
from moba_cli.ops.moba import full_attention, moba_attention

__version__ = "0.1.0"

__all__ = ["MobaError", "__version__", "full_attention", "load_model", "moba_attention"]


def load_model(path: str, attn: str = "moba", **kwargs):
    """Load a checkpoint written by ``moba convert`` (see :mod:`moba_cli.integrations.hf`)."""
    from moba_cli.integrations.hf import load_model as _load

    return _load(path, attn=attn, **kwargs)


# `moba` becomes a transformers attention implementation once transformers loads (never imported here).
_install_transformers_hook()
