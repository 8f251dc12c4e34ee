"""Prepares a TFDS dataset in the ArrayRecord format the training pipeline reads by index.

    python -m efficientnet_jax.data.prepare --dataset=imagenet2012 --data_dir=gs://BUCKET/tfds \
        --manual_dir=/path/with/ILSVRC2012_img_train.tar_and_val.tar

Training then takes `--config.data_dir=gs://BUCKET/tfds`. ImageNet needs the two ILSVRC2012 tar
files in manual_dir (TFDS cannot download them) and a few hours; other TFDS datasets download
themselves. A copy already prepared as TFRecord is left alone: prepare into another data_dir.
"""
from __future__ import annotations

import sys

from absl import app, flags

from efficientnet_jax import errors
from efficientnet_jax.data import sources

flags.DEFINE_string('dataset', None, 'TFDS dataset name, e.g. imagenet2012 or cifar10.')
flags.DEFINE_string('data_dir', None, 'TFDS data_dir to prepare into (local or gs://).')
flags.DEFINE_string('manual_dir', None, 'Folder with manually downloaded files (ImageNet tars).')
flags.mark_flag_as_required('dataset')


def main(argv) -> None:
  del argv
  FLAGS = flags.FLAGS
  try:
    builder = sources.prepare_tfds(FLAGS.dataset, FLAGS.data_dir, FLAGS.manual_dir)
  except errors.UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  splits = {name: split.num_examples for name, split in builder.info.splits.items()}
  print(f'{FLAGS.dataset} is prepared as {builder.info.file_format.value} in {builder.data_dir}: '
        f'{splits}')


if __name__ == '__main__':
  app.run(main)
