"""Compound scaling, step 1 (and optionally step 2): the grid search for alpha, beta, gamma.

Tan & Le 2019, section 3.3: fix phi = 1, train the baseline scaled by every (alpha, beta, gamma)
>= 1 with alpha * beta**2 * gamma**2 ~= 2 (twice the baseline's FLOPs), keep the most accurate;
then fix it and scale phi. The paper found alpha = 1.2, beta = 1.1, gamma = 1.15 for B0.

Launch on a TPU VM or pod slice, ImageNet prepared under data_dir (each candidate trains the
paper's recipe for `train.num_epochs`, ranked on the 25,000-image minival, never on validation):

  python experiments/compound_search.py \
      --config=configs/experiments/compound_search.py \
      --workdir=gs://BUCKET/compound_search \
      --config.train.data_dir=gs://BUCKET/tensorflow_datasets --config.phi=3

Quick version (tiny B0 on the offline digits; five networks, about 90 CPU-seconds each):

  python experiments/compound_search.py --quick --workdir=/tmp/compound_search

Rerunning with the same --workdir resumes: finished candidates are read back, an interrupted
one continues from its checkpoint.
"""
import ml_collections

from efficientnet_jax import configs_lib


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  # The recipe every candidate trains with, and the baseline: train.model, train.width,
  # train.depth and train.resolution are the network that phi = 0 denotes.
  config.train = configs_lib.default_config()
  # The search budget: a shortened schedule, enough to rank candidates, not to reach the
  # published accuracy. The paper does not state its step-1 budget.
  config.train.num_epochs = 30.0
  config.train.holdout_examples = 25_000
  config.train.eval_on_holdout = True
  # Grid axes for alpha (depth), beta (width) and gamma (resolution), all >= 1. With the target
  # and tolerance below this grid keeps 37 candidates, the paper's (1.2, 1.1, 1.15) among them.
  config.alphas = (1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0)
  config.betas = (1.0, 1.05, 1.1, 1.15, 1.2, 1.25, 1.3, 1.35, 1.4)
  config.gammas = (1.0, 1.05, 1.1, 1.15, 1.2, 1.25, 1.3, 1.35, 1.4)
  # Keep candidates whose alpha * beta**2 * gamma**2 is within tolerance (relative) of target.
  config.target_flops_ratio = 2.0
  config.tolerance = 0.05
  # Also drop candidates whose *real* multiply-add ratio (after rounding channels to multiples
  # of 8, repeats up and resolution to whole pixels) misses the target by more than tolerance.
  # Off by default: the paper filters on the formula, and both ratios are always reported.
  config.filter_on_real_flops = False
  # Train the unscaled baseline too, as the reference row and the phi = 0 point of step 2.
  config.train_baseline = True
  # Step 2: scale the winner to phi = 1 .. phi (0 skips step 2). phi = 1 is the winner itself.
  config.phi = 0

  if arg == 'quick':
    config.train = configs_lib.quick_study_recipe()
    # Three candidates on the constraint: depth only (2, 1, 1), resolution only (1, 1, 1.4)
    # and the paper's (1.2, 1.1, 1.15).
    config.alphas = (1.0, 1.2, 2.0)
    config.betas = (1.0, 1.1)
    config.gammas = (1.0, 1.15, 1.4)
    config.phi = 2
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}. Valid arguments: 'quick'.")
  return config
