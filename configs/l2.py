"""EfficientNet-L2 with the paper's ImageNet recipe (`configs_lib.base_config`), batch 4096.

    python -m efficientnet_jax.main --config=configs/l2.py --workdir=gs://BUCKET/l2 \
        --config.data_dir=gs://BUCKET/tensorflow_datasets

Local smoke run of the same experiment: --config=configs/l2.py:smoke
"""
from efficientnet_jax import configs_lib


def get_config(arg=None):
  return configs_lib.variant_config(
      'efficientnet-l2', batch_size=4096, fsdp_axis_size=16, arg=arg,
      coefficients=dict(width=4.3, depth=5.3, resolution=800, dropout=0.5))
