"""efficientnet-jax: EfficientNet (Tan & Le, ICML 2019) in JAX/Flax."""

import efficientnet_jax.datasets  # noqa: E402,F401  (registers the offline TFDS builder `digits`)
