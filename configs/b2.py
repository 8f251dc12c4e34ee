"""EfficientNet-B2 with the paper's ImageNet recipe (`configs_lib.base_config`), batch 4096.

    python -m efficientnet_jax.main --config=configs/b2.py --workdir=gs://BUCKET/b2 \
        --config.data_dir=gs://BUCKET/tensorflow_datasets

Recommended slice: v4-32. Check that it fits before launching (any machine, the tpu extra):

    python -m efficientnet_jax.aot --config=configs/b2.py --topology=v4:2x2x4

Measured 2026-12-07 (jax[tpu] 0.10.2, train step): 13.2 of 32 GiB per v4 chip; roofline step >=
90 ms (memory-bound), so <= 45,635 img/s (2,852 per chip).

Local smoke run of the same experiment: --config=configs/b2.py:smoke
"""
from efficientnet_jax import configs_lib


def get_config(arg=None):
  return configs_lib.variant_config(
      'efficientnet-b2', batch_size=4096, arg=arg,
      coefficients=dict(width=1.1, depth=1.2, resolution=260, dropout=0.3))
