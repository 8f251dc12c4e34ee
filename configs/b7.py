"""EfficientNet-B7 with the paper's ImageNet recipe (configs/default.py), batch 4096.

    python -m efficientnet_jax.main --config=configs/b7.py --workdir=gs://BUCKET/b7 \
        --config.data_dir=gs://BUCKET/tensorflow_datasets

Local smoke run of the same experiment: --config=configs/b7.py:smoke
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import default  # noqa: E402


def get_config(arg=None):
  return default.variant_config('efficientnet-b7', width=2.0, depth=3.1, resolution=600, dropout=0.5,
                                batch_size=4096, fsdp=True, arg=arg)
