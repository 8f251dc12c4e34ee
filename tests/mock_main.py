"""`python -m efficientnet_jax.main` under `tfds.testing.mock_data`, for tests that need a process.

    python tests/mock_main.py --mock_num_examples=32 --config=configs/default.py:smoke \
        --workdir=/tmp/w --local_device_count=4 [--coordinator_address=... --num_processes=2 ...]

Every flag of efficientnet_jax.main is accepted. The mock is entered inside the process (it patches
TFDS in memory), before main() sets up JAX and reads the data, so each process of a multi-process
run mocks its own reads. The mocked examples are deterministic, so all processes see the same data.
"""
from absl import flags
import tensorflow_datasets as tfds

from efficientnet_jax import main as main_lib  # defines the trainer's flags

flags.DEFINE_integer('mock_num_examples', 16, 'Examples in every mocked TFDS split.')


def run(argv):
  with tfds.testing.mock_data(num_examples=flags.FLAGS.mock_num_examples):
    main_lib.main(argv)


if __name__ == '__main__':
  main_lib.run(run)
