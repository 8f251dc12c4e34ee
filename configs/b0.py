"""EfficientNet-B0 with the paper's ImageNet recipe (configs/default.py), batch 4096.

    python -m efficientnet_jax.main --config=configs/b0.py --workdir=gs://BUCKET/b0 \
        --config.data_dir=gs://BUCKET/tensorflow_datasets

Local smoke run of the same experiment: --config=configs/b0.py:smoke
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import default  # noqa: E402


def get_config(arg=None):
  return default.variant_config('efficientnet-b0', width=1.0, depth=1.0, resolution=224, dropout=0.2,
                                batch_size=4096, arg=arg)
