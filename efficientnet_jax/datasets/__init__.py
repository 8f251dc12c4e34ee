"""Extra TFDS builders of efficientnet_jax; importing this package registers them.

* `digits`: scikit-learn's bundled handwritten digits (8x8, 10 classes, 1,437/360 train/test),
  built offline in seconds; see `efficientnet_jax.datasets.digits`.
"""
from efficientnet_jax.datasets import digits
from efficientnet_jax.datasets.digits import Digits

__all__ = ['Digits', 'digits']
