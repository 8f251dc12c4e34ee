"""EfficientNet-B3 with the paper's ImageNet recipe (configs/default.py), batch 4096.

    python -m efficientnet_jax.main --config=configs/b3.py --workdir=gs://BUCKET/b3 \
        --config.data_dir=gs://BUCKET/tensorflow_datasets

Local smoke run of the same experiment: --config=configs/b3.py:smoke
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import default  # noqa: E402


def get_config(arg=None):
  return default.variant_config('efficientnet-b3', width=1.2, depth=1.4, resolution=300, dropout=0.3,
                                batch_size=4096, arg=arg)
