"""blt-jax: entropy-based byte patching and the Byte Latent Transformer in JAX/Flax."""
from blt_jax.api import LanguageModel, from_pretrained, load

__all__ = ["LanguageModel", "from_pretrained", "load"]
