"""EfficientNet-B4 with the paper's ImageNet recipe (`configs_lib.base_config`), batch 4096.

    python -m efficientnet_jax.main --config=configs/b4.py --workdir=gs://BUCKET/b4 \
        --config.data_dir=gs://BUCKET/tensorflow_datasets

Recommended slice: v4-256. Check that it fits before launching (any machine, the tpu extra):

    python -m efficientnet_jax.aot --config=configs/b4.py --topology=v4:4x4x8

Measured 2026-12-06 (jax[tpu] 0.10.2, train step): 9.3 of 32 GiB per v4 chip; roofline step
>= 76 ms (memory-bound), so <= 53,962 img/s (422 per chip). The compile took 14 min on a 2-core
machine.

Local smoke run of the same experiment: --config=configs/b4.py:smoke
"""
from efficientnet_jax import configs_lib


def get_config(arg=None):
  return configs_lib.variant_config(
      'efficientnet-b4', batch_size=4096, arg=arg,
      coefficients=dict(width=1.4, depth=1.8, resolution=380, dropout=0.4))
