"""EfficientNet-Lite4 with the paper's ImageNet recipe (`configs_lib.base_config`), batch 4096.

    python -m efficientnet_jax.main --config=configs/lite4.py --workdir=gs://BUCKET/lite4 \
        --config.data_dir=gs://BUCKET/tensorflow_datasets

Recommended slice: v4-64. Check that it fits before launching (any machine, the tpu extra):

    python -m efficientnet_jax.aot --config=configs/lite4.py --topology=v4:2x4x4

Measured 2026-12-07 (jax[tpu] 0.10.2, train step): 13.8 of 32 GiB per v4 chip; roofline step >=
101 ms (memory-bound), so <= 40,390 img/s (1,262 per chip).

Local smoke run of the same experiment: --config=configs/lite4.py:smoke
"""
from efficientnet_jax import configs_lib


def get_config(arg=None):
  return configs_lib.variant_config(
      'efficientnet-lite4', batch_size=4096, arg=arg,
      coefficients=dict(width=1.4, depth=1.8, resolution=300, dropout=0.3))
