"""Compound scaling applied to other ConvNets: MobileNetV1, MobileNetV2, ResNet-50 (Table 3).

Every row of the paper's Table 3 (baseline, depth d=4, width w=2, resolution r=2, compound) is
built and its multiply-adds counted and compared with the paper's; that needs no training and
takes seconds. With `train_models` (or --train) the rows of those models are also trained with
the `train` recipe and their top-1 joins the table.

Launch on a TPU VM or pod slice, ImageNet prepared under data_dir:

  python experiments/scale_baselines.py \
      --config=configs/experiments/scale_baselines.py \
      --workdir=gs://BUCKET/scale_baselines --train \
      --config.train.data_dir=gs://BUCKET/tensorflow_datasets

Only the multiply-add table (no training, any machine):

  python experiments/scale_baselines.py --workdir=/tmp/scale_baselines

Quick version (four tiny MobileNetV1 rows trained on the offline digits):

  python experiments/scale_baselines.py --quick --workdir=/tmp/scale_baselines
"""
import ml_collections

from efficientnet_jax import configs_lib


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  # Models whose Table 3 rows are built and counted.
  config.models = ('mobilenet-v1', 'mobilenet-v2', 'resnet-50')
  # Models whose rows are also trained (--train sets this to `models`).
  config.train_models = ()
  # The recipe trained rows use. Its width, depth and resolution are the baseline the rows scale
  # (1, 1, 224 px: the paper's networks); `model` is replaced by each row's model.
  config.train = configs_lib.default_config()

  if arg == 'quick':
    config.train_models = ('mobilenet-v1',)
    config.train = configs_lib.quick_study_recipe()
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}. Valid arguments: 'quick'.")
  return config
