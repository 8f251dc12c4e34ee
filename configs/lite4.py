"""EfficientNet-Lite4 with the paper's ImageNet recipe (configs/default.py), batch 4096.

    python -m efficientnet_jax.main --config=configs/lite4.py --workdir=gs://BUCKET/lite4 \
        --config.data_dir=gs://BUCKET/tensorflow_datasets

Local smoke run of the same experiment: --config=configs/lite4.py:smoke
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import default  # noqa: E402


def get_config(arg=None):
  return default.variant_config('efficientnet-lite4', width=1.4, depth=1.8, resolution=300, dropout=0.3,
                                batch_size=4096, arg=arg)
