"""Offline quickstart: EfficientNet-B0 on scikit-learn's handwritten digits, on a laptop CPU.

    python -m efficientnet_jax.main --config=configs/quickstart.py --workdir=/tmp/quickstart

The digits (1,797 real 8x8 scans, 10 classes) ship inside scikit-learn, so nothing downloads.
The network is B0 itself (same blocks, widths and depths) at 32 px with a stride-1 stem; the
recipe for tiny data (shifts instead of AutoAugment, AdamW, BN momentum 0.9, 20 epochs) and why
is `configs_lib.digits_config`'s.
"""
from efficientnet_jax import configs_lib


def get_config(arg=None):
  return configs_lib.digits_config(arg)
