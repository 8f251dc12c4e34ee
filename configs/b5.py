"""EfficientNet-B5 with the paper's ImageNet recipe (`configs_lib.base_config`), batch 4096.

    python -m efficientnet_jax.main --config=configs/b5.py --workdir=gs://BUCKET/b5 \
        --config.data_dir=gs://BUCKET/tensorflow_datasets

Recommended slice: v4-256. Check that it fits before launching (any machine, the tpu extra):

    python -m efficientnet_jax.aot --config=configs/b5.py --topology=v4:4x4x8

Measured 2026-12-07 (jax[tpu] 0.10.2, train step): 16.1 of 32 GiB per v4 chip; roofline step >=
135 ms (memory-bound), so <= 30,319 img/s (237 per chip).

Local smoke run of the same experiment: --config=configs/b5.py:smoke
"""
from efficientnet_jax import configs_lib


def get_config(arg=None):
  return configs_lib.variant_config(
      'efficientnet-b5', batch_size=4096, arg=arg,
      coefficients=dict(width=1.6, depth=2.2, resolution=456, dropout=0.4))
