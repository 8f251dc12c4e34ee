"""EfficientNet-B0 with the paper's ImageNet recipe (`configs_lib.base_config`), batch 4096.

    python -m efficientnet_jax.main --config=configs/b0.py --workdir=gs://BUCKET/b0 \
        --config.data_dir=gs://BUCKET/tensorflow_datasets

Recommended slice: v4-32. Check that it fits before launching (any machine, the tpu extra):

    python -m efficientnet_jax.aot --config=configs/b0.py --topology=v4:2x2x4

Dry run (2026-12-06): 7.2 of 32 GiB HBM per chip, fits; step >= 46 ms
(memory-bound), <= 88,934 images/s for the slice (docs/pod.md).

Local smoke run of the same experiment: --config=configs/b0.py:smoke
"""
from efficientnet_jax import configs_lib


def get_config(arg=None):
  return configs_lib.variant_config(
      'efficientnet-b0', batch_size=4096, arg=arg,
      coefficients=dict(width=1.0, depth=1.0, resolution=224, dropout=0.2))
