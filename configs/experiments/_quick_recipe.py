"""The training recipe every quick study uses: tiny networks on the offline digits, on a CPU.

Not a study itself: `compound_search.py`, `single_dimension_scaling.py` and `scale_baselines.py`
use `quick_recipe()` as their `config.train` under the ':quick' argument. It is the quickstart's
recipe (configs/quickstart.py) shrunk to about 30-45 s per network on 2 cores: B0 at width 0.5 and
depth 0.25 (one block per stage) at 24 px with a stride-1 stem, 80 steps of 32, evaluated once.
On a CPU every network costs a compilation plus its steps, so the networks stay small and few.
"""
import os
import sys

# The repository root, so that `configs` imports as a package from any working directory.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs import quickstart  # noqa: E402


def quick_recipe(steps: int = 80):
  config = quickstart.get_config()
  config.resolution = 24
  config.width = 0.5
  config.depth = 0.25
  config.dropout = 0.0
  config.label_smoothing = 0.0
  # conv_impl stays 'auto' (the CPU fast path on a CPU): XLA's grouped convolution compiles ~4 s
  # faster per network but its training steps are 4-5x slower (310 vs 67 ms at 24 px).
  config.batch_size = 32  # divides by the 8 fake devices of the tests
  config.lr_batch_size = 32
  config.learning_rate = 1e-3
  config.warmup_epochs = 0.0
  config.num_train_steps = steps
  config.eval_every_steps = steps  # evaluate and checkpoint once, at the end
  config.checkpoint_every_steps = steps
  config.log_every_steps = 20
  config.prefetch_batches = 1
  return config


def get_config(arg=None):
  del arg
  return quick_recipe()
