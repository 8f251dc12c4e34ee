"""The paper's ImageNet recipe for EfficientNet-B0: the base every other config varies.

Launch (Cloud TPU VM or pod slice, ImageNet prepared under data_dir):

  python -m efficientnet_jax.main --config=configs/default.py --workdir=gs://BUCKET/b0 \
      --config.data_dir=gs://BUCKET/tensorflow_datasets

Every field, with a comment per group, is in `efficientnet_jax.configs_lib.base_config`. The
model's width, depth, resolution and dropout are its variant's own unless set, so
`--config.model=efficientnet-b3` trains the real B3 at 300 px. `:smoke` gives a tiny local run
of the same experiment (small resolution, a few steps), in the big_vision style.
"""
from efficientnet_jax import configs_lib


def get_config(arg=None):
  return configs_lib.default_config(arg)
