"""EfficientNet-B6 with the paper's ImageNet recipe (`configs_lib.base_config`), batch 4096.

    python -m efficientnet_jax.main --config=configs/b6.py --workdir=gs://BUCKET/b6 \
        --config.data_dir=gs://BUCKET/tensorflow_datasets

Recommended slice: v4-256. Check that it fits before launching (any machine, the tpu extra):

    python -m efficientnet_jax.aot --config=configs/b6.py --topology=v4:4x4x8

Measured 2026-12-07 (jax[tpu] 0.10.2, train step): 24.4 of 32 GiB per v4 chip; roofline step >=
196 ms (memory-bound), so <= 20,883 img/s (163 per chip).

Local smoke run of the same experiment: --config=configs/b6.py:smoke
"""
from efficientnet_jax import configs_lib


def get_config(arg=None):
  return configs_lib.variant_config(
      'efficientnet-b6', batch_size=4096, arg=arg,
      coefficients=dict(width=1.8, depth=2.6, resolution=528, dropout=0.5))
