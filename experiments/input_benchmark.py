"""Throughput of the training input pipeline per host CPU core, on ImageNet-like JPEGs.

    python experiments/input_benchmark.py                      # AutoAugment, the paper's recipe
    python experiments/input_benchmark.py --augment=none       # crops and flips only
    python experiments/input_benchmark.py --chip_images_per_second=3000   # cores one chip needs

It writes `--num_images` JPEGs of about 500x375 pixels (the ImageNet median) into a class-folder
dataset, then times the training pipeline exactly as training runs it: the Inception crop
(JPEG decoded inside the crop window), bicubic resize to 224, random flip, AutoAugment v0 (or
RandAugment, or none), batched uint8. Images/s is measured over `--batches` batches after
`--warmup` and divided by the cores this process may use. On pods EfficientNet training is
often input-bound, so this is the figure that says how many host cores a TPU chip needs.

`--pipeline=MODULE` times another pipeline module with the same `create_split(config, train=True,
batch_size=..., process_index=0, process_count=1)` (e.g. an older version on PYTHONPATH).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import tempfile
import time

import numpy as np


def write_jpegs(root: str, count: int, classes: int = 10, seed: int = 0) -> None:
  """`count` photo-like JPEGs (smooth colour fields plus texture), about 500x375, 10 classes."""
  import tensorflow as tf
  rng = np.random.default_rng(seed)
  for i in range(count):
    height, width = (375, 500) if i % 4 else (500, 375)
    coarse = rng.uniform(0, 255, (height // 25, width // 25, 3)).astype(np.float32)
    image = tf.image.resize(coarse[None], [height, width], method='bicubic')[0].numpy()
    image += rng.normal(0, 12, image.shape)  # texture, so the JPEG is photo-sized, not tiny
    pixels = np.clip(image, 0, 255).astype(np.uint8)
    directory = os.path.join(root, 'train', f'class_{i % classes}')
    os.makedirs(directory, exist_ok=True)
    tf.io.write_file(os.path.join(directory, f'{i:06d}.jpg'),
                     tf.io.encode_jpeg(pixels, quality=90))


def pipeline_config(root: str, args):
  import ml_collections
  config = ml_collections.ConfigDict()
  config.model = 'efficientnet-b0'
  config.dataset = f'folder:{root}'
  config.num_classes = 10
  config.train_split = 'train'
  config.eval_split = 'train'
  config.holdout_examples = 0
  config.eval_on_holdout = False
  config.resolution = args.resolution
  config.train_crop = 'inception'
  config.crop_padding = 32
  config.interpolation = 'bicubic'
  config.random_flip = True
  config.augment = args.augment
  config.randaugment_num_layers = 2
  config.randaugment_magnitude = 9
  config.shuffle_buffer_size = 16_384  # read by older pipelines only
  config.cache = False
  config.seed = 0
  return config


def measure(args) -> dict:
  module = importlib.import_module(args.pipeline)
  with tempfile.TemporaryDirectory() as root:
    write_jpegs(root, args.num_images)
    sizes = [os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files]
    dataset = module.create_split(pipeline_config(root, args), train=True,
                                  batch_size=args.batch_size, process_index=0, process_count=1)
    batches = dataset.as_numpy_iterator()
    for _ in range(args.warmup):
      next(batches)
    start = time.perf_counter()
    for _ in range(args.batches):
      batch = next(batches)
    seconds = time.perf_counter() - start
  assert batch['image'].shape == (args.batch_size, args.resolution, args.resolution, 3)
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  images_per_second = args.batches * args.batch_size / seconds
  result = {'pipeline': args.pipeline, 'augment': args.augment, 'resolution': args.resolution,
            'images_per_second': round(images_per_second, 1), 'cores': cores,
            'images_per_second_per_core': round(images_per_second / cores, 1),
            'mean_jpeg_kb': round(float(np.mean(sizes)) / 1024, 1)}
  if args.chip_images_per_second:
    result['cores_per_chip'] = round(args.chip_images_per_second /
                                     result['images_per_second_per_core'], 1)
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--pipeline', default='efficientnet_jax.data.pipeline')
  parser.add_argument('--augment', default='autoaugment',
                      choices=['autoaugment', 'randaugment', 'none'])
  parser.add_argument('--resolution', type=int, default=224)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--num_images', type=int, default=512)
  parser.add_argument('--warmup', type=int, default=4)
  parser.add_argument('--batches', type=int, default=24)
  parser.add_argument('--chip_images_per_second', type=float, default=0.0,
                      help='a chip\'s training images/s, to print the host cores it needs')
  parser.add_argument('--json', default='', help='also write the figures to this file')
  args = parser.parse_args()
  result = measure(args)
  line = (f"{result['pipeline']} ({result['augment']}, {result['resolution']} px, "
          f"{result['mean_jpeg_kb']} KB JPEGs): {result['images_per_second']} images/s on "
          f"{result['cores']} cores = {result['images_per_second_per_core']} per core")
  if 'cores_per_chip' in result:
    line += f"; {result['cores_per_chip']} cores per chip at {args.chip_images_per_second:g} img/s"
  print(line)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=2)


if __name__ == '__main__':
  main()
