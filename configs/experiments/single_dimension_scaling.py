"""Scaling one dimension at a time against compound scaling (Tan & Le 2019, Figures 3, 4 and 8).

Figures 3 and 8 (`mode='dimensions'`): the baseline scaled by width only, depth only, resolution
only and by compound scaling, one accuracy-vs-multiply-adds curve each. Figure 4
(`mode='width_at_depth_resolution'`): width scaled at four (depth, resolution) settings.

Launch on a TPU VM or pod slice, ImageNet prepared under data_dir (every network trains the
paper's full recipe, 350 epochs; shorten with --config.train.num_epochs=...):

  python experiments/single_dimension_scaling.py \
      --config=configs/experiments/single_dimension_scaling.py \
      --workdir=gs://BUCKET/single_dimension \
      --config.train.data_dir=gs://BUCKET/tensorflow_datasets
  python experiments/single_dimension_scaling.py \
      --config=configs/experiments/single_dimension_scaling.py \
      --workdir=gs://BUCKET/single_dimension --config.mode=width_at_depth_resolution \
      --config.train.data_dir=gs://BUCKET/tensorflow_datasets

Quick version (tiny B0 on the offline digits; five networks, about 90 CPU-seconds each):

  python experiments/single_dimension_scaling.py --quick --workdir=/tmp/single_dimension

Both modes may share a --workdir: a network two curves have in common is trained once.
"""
import ml_collections

from efficientnet_jax import configs_lib


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  # The recipe every network trains with, and the baseline (train.model, width, depth,
  # resolution): every multiplier below is relative to it.
  config.train = configs_lib.default_config()
  # 'dimensions' (Figures 3 and 8) or 'width_at_depth_resolution' (Figure 4).
  config.mode = 'dimensions'
  # Which curves 'dimensions' draws: any of 'width', 'depth', 'resolution', 'compound'.
  config.dimensions = ('width', 'depth', 'resolution', 'compound')
  # Figure 3's grids: width w, depth d and resolution r multipliers (r = 1 is train.resolution,
  # 224 px for B0).
  config.widths = (1.0, 1.4, 1.8, 2.6, 3.8, 5.0)
  config.depths = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0)
  config.resolutions = (1.0, 1.3, 1.5, 1.7, 1.9, 2.2, 2.5)
  # Figure 8's compound curve: phi values with the paper's alpha, beta, gamma (B0 .. B4 span the
  # figure's 0 - 5B multiply-adds).
  config.phis = (0.0, 1.0, 2.0, 3.0, 4.0)
  config.alpha = 1.2
  config.beta = 1.1
  config.gamma = 1.15
  # Figure 4: (depth, resolution) multiplier pairs; at each, width takes every value in widths.
  config.depth_resolution_settings = ((1.0, 1.0), (1.0, 1.3), (2.0, 1.0), (2.0, 1.3))
  # Plot multiply-adds on a log axis (the figures' range spans decades).
  config.log_madds = False

  if arg == 'quick':
    config.train = configs_lib.quick_study_recipe()
    config.widths = (1.0, 1.4)
    config.depths = (1.0, 2.0)
    config.resolutions = (1.0, 1.4)
    config.phis = (0.0, 1.0)
    config.depth_resolution_settings = ((1.0, 1.0), (2.0, 1.4))
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}. Valid arguments: 'quick'.")
  return config
