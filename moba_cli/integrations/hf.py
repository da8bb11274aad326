"""Old import path of the transformers glue, kept so that existing scripts and notebooks still run.

New code imports from :mod:`moba_cli.integrations` (the stable names) or its modules by concern.
"""

from moba_cli.integrations.attention import moba_attention_forward, register
from moba_cli.integrations.loading import attention_mode, install_hooks, load_model, moba_stats, reset_moba_stats
from moba_cli.integrations.masks import Spans, row_spans
from moba_cli.integrations.settings import CONFIG_KEY, FULL_IMPL, IMPL_NAME, MobaSettings, parse_full_layers

__all__ = [
    "CONFIG_KEY", "FULL_IMPL", "IMPL_NAME", "MobaSettings", "Spans", "attention_mode", "install_hooks",
    "load_model", "moba_attention_forward", "moba_stats", "parse_full_layers", "register", "reset_moba_stats",
    "row_spans",
]
