"""EfficientNet-B8 with the paper's ImageNet recipe (`configs_lib.base_config`), batch 4096.

    python -m efficientnet_jax.main --config=configs/b8.py --workdir=gs://BUCKET/b8 \
        --config.data_dir=gs://BUCKET/tensorflow_datasets

Recommended slice: v4-512. Check that it fits before launching (any machine, the tpu extra):

    python -m efficientnet_jax.aot --config=configs/b8.py --topology=v4:4x8x8 --config.remat=True

Measured 2026-12-07 (jax[tpu] 0.10.2, train step with --config.remat=True): 9.2 of 32 GiB per v4
chip; roofline step >= 263 ms (memory-bound), so <= 15,583 img/s (61 per chip).

Local smoke run of the same experiment: --config=configs/b8.py:smoke
"""
from efficientnet_jax import configs_lib


def get_config(arg=None):
  return configs_lib.variant_config(
      'efficientnet-b8', batch_size=4096, fsdp_axis_size=16, arg=arg,
      coefficients=dict(width=2.2, depth=3.6, resolution=672, dropout=0.5))
