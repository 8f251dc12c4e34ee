"""EfficientNet-Lite3 with the paper's ImageNet recipe (`configs_lib.base_config`), batch 4096.

    python -m efficientnet_jax.main --config=configs/lite3.py --workdir=gs://BUCKET/lite3 \
        --config.data_dir=gs://BUCKET/tensorflow_datasets

Recommended slice: v4-32. Check that it fits before launching (any machine, the tpu extra):

    python -m efficientnet_jax.aot --config=configs/lite3.py --topology=v4:2x2x4

Measured 2026-12-07 (jax[tpu] 0.10.2, train step): 15.5 of 32 GiB per v4 chip; roofline step >=
95 ms (memory-bound), so <= 42,982 img/s (2,686 per chip).

Local smoke run of the same experiment: --config=configs/lite3.py:smoke
"""
from efficientnet_jax import configs_lib


def get_config(arg=None):
  return configs_lib.variant_config(
      'efficientnet-lite3', batch_size=4096, arg=arg,
      coefficients=dict(width=1.2, depth=1.4, resolution=280, dropout=0.3))
