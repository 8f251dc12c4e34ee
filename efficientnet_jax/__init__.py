"""efficientnet-jax: EfficientNet (Tan & Le, ICML 2019) in JAX/Flax.

Importing the package imports nothing heavy: `efficientnet_jax.models` needs only JAX and Flax.
TensorFlow and TFDS come with the data pipeline (`input_pipeline`), which also registers the
offline `digits` builder.
"""
