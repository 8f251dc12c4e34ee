"""EfficientNet-B7 with the paper's ImageNet recipe (`configs_lib.base_config`), batch 4096.

    python -m efficientnet_jax.main --config=configs/b7.py --workdir=gs://BUCKET/b7 \
        --config.data_dir=gs://BUCKET/tensorflow_datasets

Recommended slice: v4-256; it fits as shipped. Check before launching (any machine, the tpu
extra):

    python -m efficientnet_jax.aot --config=configs/b7.py --topology=v4:4x4x8

Measured 2026-12-06 (jax[tpu] 0.10.2, train step): 27.7 of 32 GiB per v4 chip; roofline step
>= 322 ms (memory-bound), so <= 12,706 img/s (99 per chip). With --config.remat=True: 13.5 GiB
per chip and >= 353 ms (11,594 img/s). The compiles took 17 and 22 min on a 2-core machine.
(Before FSDP gathered the parameters rather than the activations, the same commands reported
76.2 and 66.8 GiB per chip: see docs/pod.md.)

Local smoke run of the same experiment: --config=configs/b7.py:smoke
"""
from efficientnet_jax import configs_lib


def get_config(arg=None):
  return configs_lib.variant_config(
      'efficientnet-b7', batch_size=4096, fsdp_axis_size=8, arg=arg,
      coefficients=dict(width=2.0, depth=3.1, resolution=600, dropout=0.5))
