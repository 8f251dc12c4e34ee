"""EfficientNet-L2 with the paper's ImageNet recipe (`configs_lib.base_config`), batch 4096.

    python -m efficientnet_jax.main --config=configs/l2.py --workdir=gs://BUCKET/l2 \
        --config.data_dir=gs://BUCKET/tensorflow_datasets

Recommended slice: v4-1024. Check that it fits before launching (any machine, the tpu extra):

    python -m efficientnet_jax.aot --config=configs/l2.py --topology=v4:8x8x8 --config.remat=True

Measured 2026-12-07 (jax[tpu] 0.10.2, train step with --config.remat=True): 28.8 of 32 GiB per
v4 chip; roofline step >= 1664 ms (memory-bound), so <= 2,462 img/s (5 per chip).

Local smoke run of the same experiment: --config=configs/l2.py:smoke
"""
from efficientnet_jax import configs_lib


def get_config(arg=None):
  return configs_lib.variant_config(
      'efficientnet-l2', batch_size=4096, fsdp_axis_size=16, arg=arg,
      coefficients=dict(width=4.3, depth=5.3, resolution=800, dropout=0.5))
