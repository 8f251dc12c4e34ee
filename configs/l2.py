"""EfficientNet-L2 with the paper's ImageNet recipe (`configs_lib.base_config`), batch 4096.

    python -m efficientnet_jax.main --config=configs/l2.py --workdir=gs://BUCKET/l2 \
        --config.data_dir=gs://BUCKET/tensorflow_datasets

Recommended slice: v4-1024. Check that it fits before launching (any machine, the tpu extra):

    python -m efficientnet_jax.aot --config=configs/l2.py --topology=v4:8x8x8 --config.remat=True

Its dry-run figures are not measured yet (compiling for a 32+-chip slice takes
tens of minutes on a 2-core machine); the command above prints them.

Local smoke run of the same experiment: --config=configs/l2.py:smoke
"""
from efficientnet_jax import configs_lib


def get_config(arg=None):
  return configs_lib.variant_config(
      'efficientnet-l2', batch_size=4096, fsdp_axis_size=16, arg=arg,
      coefficients=dict(width=4.3, depth=5.3, resolution=800, dropout=0.5))
