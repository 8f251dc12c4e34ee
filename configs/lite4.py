"""EfficientNet-Lite4 with the paper's ImageNet recipe (`configs_lib.base_config`), batch 4096.

    python -m efficientnet_jax.main --config=configs/lite4.py --workdir=gs://BUCKET/lite4 \
        --config.data_dir=gs://BUCKET/tensorflow_datasets

Recommended slice: v4-64. Check that it fits before launching (any machine, the tpu extra):

    python -m efficientnet_jax.aot --config=configs/lite4.py --topology=v4:2x4x4

Its dry-run figures are not measured yet (compiling for a 32+-chip slice takes
tens of minutes on a 2-core machine); the command above prints them.

Local smoke run of the same experiment: --config=configs/lite4.py:smoke
"""
from efficientnet_jax import configs_lib


def get_config(arg=None):
  return configs_lib.variant_config(
      'efficientnet-lite4', batch_size=4096, arg=arg,
      coefficients=dict(width=1.4, depth=1.8, resolution=300, dropout=0.3))
