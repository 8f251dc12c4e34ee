"""Settings of experiments/latency.py (the paper's Table 4: batch-1 CPU latency on one core).

    python experiments/latency.py --workdir=/tmp/latency
    python experiments/latency.py --workdir=/tmp/latency --quick
    python experiments/latency.py --workdir=/tmp/latency --config.runs=50

The models run round-robin in a fresh subprocess pinned to one CPU core; `--quick` replaces the
fields under `quick` (small models at a small resolution, a few runs: a smoke run for tests).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # (fast, slow) pairs: the speedup is slow's median latency over fast's. The paper's Table 4
  # compares B1 with ResNet-152 (each at its native resolution: 240 and 224 px), and B7 with
  # GPipe, which has no implementation here (see the script's docstring).
  config.pairs = (('efficientnet-b1', 'resnet-152'),)
  # Input size in pixels for every model; 0 means each model's native resolution.
  config.resolution = 0
  # Rounds of timed calls (one per model and implementation per round; the median and mean are
  # reported) and the untimed calls each gets before the first round.
  config.runs = 20
  config.warmup = 3
  # Pin each measurement to one CPU core, as the paper measured (False: all cores).
  config.single_core = True
  # Convolution implementations to time each model with ('cpu': the fast CPU path, 'xla': XLA's
  # own convolutions; see models/layers.py); each model is reported at its fastest.
  config.conv_impls = ('cpu', 'xla')
  # Seconds the timing subprocess may take before the study gives up.
  config.timeout_s = 1800
  # Fields that --quick replaces.
  config.quick = ml_collections.ConfigDict()
  config.quick.pairs = (('efficientnet-b0', 'resnet-50'),)
  config.quick.resolution = 32
  config.quick.conv_impls = ('auto',)
  config.quick.runs = 5
  config.quick.warmup = 1
  return config
