"""EfficientNet-B1 with the paper's ImageNet recipe (`configs_lib.base_config`), batch 4096.

    python -m efficientnet_jax.main --config=configs/b1.py --workdir=gs://BUCKET/b1 \
        --config.data_dir=gs://BUCKET/tensorflow_datasets

Recommended slice: v4-32. Check that it fits before launching (any machine, the tpu extra):

    python -m efficientnet_jax.aot --config=configs/b1.py --topology=v4:2x2x4

Measured 2026-12-07 (jax[tpu] 0.10.2, train step): 10.7 of 32 GiB per v4 chip; roofline step >=
78 ms (memory-bound), so <= 52,825 img/s (3,302 per chip).

Local smoke run of the same experiment: --config=configs/b1.py:smoke
"""
from efficientnet_jax import configs_lib


def get_config(arg=None):
  return configs_lib.variant_config(
      'efficientnet-b1', batch_size=4096, arg=arg,
      coefficients=dict(width=1.0, depth=1.1, resolution=240, dropout=0.2))
