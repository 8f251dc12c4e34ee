"""Settings of experiments/size_table.py (the paper's Table 2 and Figure 1).

    python experiments/size_table.py --workdir=/tmp/size_table
    python experiments/size_table.py --workdir=/tmp/size_table --quick
    python experiments/size_table.py --workdir=/tmp/size_table \
        --config.models='("efficientnet-b0", "resnet-50")'

Counting is shape-only (`jax.eval_shape` and a traced forward pass), so even B7 at 600 px costs
seconds. `--quick` replaces the fields under `quick` (a smoke run for tests).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Models to count, each at its native resolution (any name `models.get_variant` knows).
  config.models = tuple(f'efficientnet-b{i}' for i in range(8)) + ('resnet-50', 'resnet-152')
  # Add the paper's GPipe row (published figures only: there is no GPipe model here).
  config.gpipe_row = True
  # Fields that --quick replaces.
  config.quick = ml_collections.ConfigDict()
  config.quick.models = ('efficientnet-b0', 'efficientnet-b1', 'resnet-50')
  return config
