"""Walsh language models: the typed config, presets as code and the LM itself."""

from walsh.models.config import ALGEBRAS, WalshConfig
from walsh.models.lm import KVCache, WalshLM
from walsh.models.presets import get_preset, presets

__all__ = ["ALGEBRAS", "KVCache", "WalshConfig", "WalshLM", "get_preset", "presets"]
