"""EfficientNet-B3 with the paper's ImageNet recipe (`configs_lib.base_config`), batch 4096.

    python -m efficientnet_jax.main --config=configs/b3.py --workdir=gs://BUCKET/b3 \
        --config.data_dir=gs://BUCKET/tensorflow_datasets

Recommended slice: v4-64. Check that it fits before launching (any machine, the tpu extra):

    python -m efficientnet_jax.aot --config=configs/b3.py --topology=v4:2x4x4

Measured 2026-12-07 (jax[tpu] 0.10.2, train step): 15.2 of 32 GiB per v4 chip; roofline step >=
107 ms (memory-bound), so <= 38,320 img/s (1,198 per chip).

Local smoke run of the same experiment: --config=configs/b3.py:smoke
"""
from efficientnet_jax import configs_lib


def get_config(arg=None):
  return configs_lib.variant_config(
      'efficientnet-b3', batch_size=4096, arg=arg,
      coefficients=dict(width=1.2, depth=1.4, resolution=300, dropout=0.3))
