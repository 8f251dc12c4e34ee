"""EfficientNet-B1 with the paper's ImageNet recipe (`configs_lib.base_config`), batch 4096.

    python -m efficientnet_jax.main --config=configs/b1.py --workdir=gs://BUCKET/b1 \
        --config.data_dir=gs://BUCKET/tensorflow_datasets

Local smoke run of the same experiment: --config=configs/b1.py:smoke
"""
from efficientnet_jax import configs_lib


def get_config(arg=None):
  return configs_lib.variant_config(
      'efficientnet-b1', batch_size=4096, arg=arg,
      coefficients=dict(width=1.0, depth=1.1, resolution=240, dropout=0.2))
