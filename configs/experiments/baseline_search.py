"""The baseline search (Tan & Le 2019, section 4): MnasNet's space, reward ACC x (MAdds/T)^w.

Every candidate trains `train`'s recipe for a short proxy budget (MnasNet: 5 epochs, ranked on
50,000 images held out of ImageNet train) and is scored ACC x (MAdds / T)^w with T = 400M at
224 px and w = -0.07. MnasNet sampled about 8,000 networks.

Launch one worker per host or slice, all with the same --workdir and --storage (any number may
join, leave or die; a dead worker's candidate is retried by another):

  python experiments/baseline_search.py --workdir=gs://BUCKET/baseline_search \
      --storage=postgresql://USER:PASSWORD@HOST/search --algorithm=ppo \
      --config.train.data_dir=gs://BUCKET/tensorflow_datasets

Quick version (tiny networks on the offline digits, one CPU process, minutes):

  python experiments/baseline_search.py --quick --workdir=/tmp/baseline_search
"""
import ml_collections

from efficientnet_jax import configs_lib
from efficientnet_jax.search.space import DECISIONS


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  # Every candidate's recipe; model, width, depth and resolution are the search's proxy network
  # (the search replaces the block table).
  config.train = configs_lib.default_config()
  config.train.num_epochs = 5.0
  config.train.holdout_examples = 50_000
  config.train.eval_on_holdout = True

  # The space: config.space.decisions of config.space.blocks (numbered from 1; None: all seven)
  # are searched; every other decision stays at the reference network's value
  # ('efficientnet-b0', 'mobilenet-v2' or 'mnasnet-a1').
  config.space = ml_collections.ConfigDict()
  config.space.reference = 'efficientnet-b0'
  config.space.blocks = ml_collections.config_dict.placeholder(tuple)
  config.space.decisions = DECISIONS

  # reward = ACC x (MAdds / T)^w; T = target_madds at target_resolution px, scaled by the area of
  # the proxy's feature maps. form 'hard': w = 0 at or below T and -1 above (MnasNet's second).
  config.objective = ml_collections.ConfigDict()
  config.objective.w = -0.07
  config.objective.form = 'soft'
  config.objective.target_madds = 400e6
  config.objective.target_resolution = 224

  # Finished candidates per algorithm; the search may be continued with a larger budget.
  config.num_candidates = 8000
  config.seed = 0
  # Optuna study names are f'{study_name}-{algorithm}'.
  config.study_name = 'baseline_search'

  # The PPO controller (search/controller.py): a batch of finished candidates per update.
  config.ppo = ml_collections.ConfigDict()
  config.ppo.batch_size = 50
  config.ppo.hidden = 64
  config.ppo.learning_rate = 0.02
  config.ppo.epochs = 2
  config.ppo.clip = 0.2
  config.ppo.entropy_coef = 1e-3
  config.ppo.baseline_decay = 0.95
  # Regularized evolution (Real et al. 2019): population and tournament sizes.
  config.evolution = ml_collections.ConfigDict()
  config.evolution.population_size = 100
  config.evolution.sample_size = 25

  # Workers: a trial whose heartbeat is older than grace_seconds is failed and queued again (at
  # most max_retries times); a worker waiting for others' candidates polls every poll_seconds.
  config.workers = ml_collections.ConfigDict()
  config.workers.heartbeat_seconds = 60
  config.workers.grace_seconds = 600
  config.workers.max_retries = 3
  config.workers.poll_seconds = 60.0

  if arg == 'quick':
    # Tiny B0-shaped proxies on the digits (width 0.5, depth 0.25: one layer per block, 24 px,
    # stride-1 stem). The slice: ConvOp, kernel and SE of blocks 2-6, 16^5 networks.
    config.train = configs_lib.quick_study_recipe(steps=60)
    config.space.blocks = (2, 3, 4, 5, 6)
    config.space.decisions = ('conv_op', 'kernel_size', 'se_ratio')
    config.num_candidates = 12
    config.ppo.batch_size = 4
    config.ppo.learning_rate = 0.05
    config.evolution.population_size = 4
    config.evolution.sample_size = 2
    config.workers.heartbeat_seconds = 5
    config.workers.grace_seconds = 30
    config.workers.poll_seconds = 5.0
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}. Valid arguments: 'quick'.")
  return config
