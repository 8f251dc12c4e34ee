"""Throughput of our EfficientNet against keras.applications (TensorFlow) in one run.

    python experiments/benchmark.py --model=efficientnet-b0 --batch_size=32 --resolution=224

Each implementation is measured in its own fresh subprocess (so neither inherits the other's
thread pools or allocator state), one after the other, on the same input shape. The script prints
images/s for both and the ratio ours / Keras. `--mode=train` times a full training step
(forward, backward, SGD update, BN statistics) instead of inference. `--json` writes the figures.
Inference uses `make_inference_fn`'s defaults (on CPU: BatchNorm folded, per-resolution chunks);
`--fold_bn=off --chunk_size=8` measures the previous unfolded, uniformly chunked path.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

KERAS_APPS = {f'efficientnet-b{i}': f'EfficientNetB{i}' for i in range(8)}


def _time_calls(step, warmup: int, iters: int) -> list[float]:
  for _ in range(warmup):
    step()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return times


def measure_ours(model_name, batch_size, resolution, mode, conv_impl, dtype, chunk_size, warmup,
                 iters, fold_bn='auto'):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from efficientnet_jax.models import create_model, make_inference_fn

  model = create_model(model_name, conv_impl=conv_impl, dtype=jnp.dtype(dtype))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((batch_size, resolution, resolution, 3), np.float32))
  labels = jnp.asarray(rng.integers(0, 1000, batch_size))
  variables = jax.jit(model.init)(jax.random.key(0), images[:1])
  if mode == 'inference':
    forward = make_inference_fn(model, chunk_size=chunk_size, fold_bn=fold_bn)
    step = lambda: forward(variables, images).block_until_ready()
  else:
    tx = optax.sgd(0.01, momentum=0.9)
    state = {'params': variables['params'], 'batch_stats': variables['batch_stats'],
             'opt': tx.init(variables['params'])}

    @jax.jit
    def train_step(state, images, labels, key):
      def loss_fn(params):
        logits, updates = model.apply(
            {'params': params, 'batch_stats': state['batch_stats']}, images, train=True,
            mutable=['batch_stats'], rngs={'dropout': key})
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, updates
      grads, updates = jax.grad(loss_fn, has_aux=True)(state['params'])
      changes, opt = tx.update(grads, state['opt'], state['params'])
      return {'params': optax.apply_updates(state['params'], changes),
              'batch_stats': updates['batch_stats'], 'opt': opt}

    holder = {'state': state, 'key': jax.random.key(1)}

    def step():
      holder['key'], key = jax.random.split(holder['key'])
      holder['state'] = train_step(holder['state'], images, labels, key)
      jax.block_until_ready(holder['state'])
  return _time_calls(step, warmup, iters)


def measure_keras(model_name, batch_size, resolution, mode, warmup, iters):
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  import keras
  import numpy as np
  import tensorflow as tf

  app = getattr(keras.applications, KERAS_APPS[model_name])
  model = app(weights=None, input_shape=(resolution, resolution, 3))
  rng = np.random.default_rng(0)
  images = tf.constant(rng.uniform(0, 255, (batch_size, resolution, resolution, 3)), tf.float32)
  labels = tf.constant(rng.integers(0, 1000, batch_size))
  if mode == 'inference':
    forward = tf.function(lambda x: model(x, training=False))
    step = lambda: forward(images).numpy()
  else:
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy())
    step = lambda: model.train_on_batch(images, labels)
  return _time_calls(step, warmup, iters)


def _run_worker(args) -> dict:
  """Runs one measurement in a fresh interpreter and returns its timings."""
  cmd = [sys.executable, os.path.abspath(__file__), f'--worker={args.worker_target}',
         f'--model={args.model}', f'--batch_size={args.batch_size}',
         f'--resolution={args.resolution}', f'--mode={args.mode}',
         f'--conv_impl={args.conv_impl}', f'--dtype={args.dtype}',
         f'--chunk_size={args.chunk_size}', f'--fold_bn={args.fold_bn}',
         f'--warmup={args.warmup}',
         f'--iters={args.iters}']
  out = subprocess.run(cmd, check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(times: list[float], batch_size: int) -> dict:
  """Images/s from the median step time (robust to one slow step)."""
  ordered = sorted(times)
  median = ordered[len(ordered) // 2]
  return {'median_s': median, 'images_per_s': batch_size / median, 'times_s': times}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='efficientnet-b0', choices=sorted(KERAS_APPS))
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--resolution', type=int, default=224)
  parser.add_argument('--mode', choices=('inference', 'train'), default='inference')
  parser.add_argument('--conv_impl', default='auto', choices=('auto', 'xla', 'cpu'))
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--chunk_size', default='auto',
                      help="inference: examples per sequential chunk ('auto': on CPU 2 for "
                      "feature maps >= 28 px and 8 after with fold_bn, else 8; 0: none)")
  parser.add_argument('--fold_bn', default='auto', choices=('auto', 'on', 'off'),
                      help='inference: fold BatchNorm into the convs (auto: EfficientNet on CPU)')
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--iters', type=int, default=10)
  parser.add_argument('--skip_keras', action='store_true', help='only measure ours')
  parser.add_argument('--json', default='', help='also write the results to this JSON file')
  parser.add_argument('--worker', default='', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args.worker:
    if args.worker == 'ours':
      chunk = args.chunk_size if args.chunk_size == 'auto' else int(args.chunk_size)
      times = measure_ours(args.model, args.batch_size, args.resolution, args.mode,
                           args.conv_impl, args.dtype, chunk, args.warmup, args.iters,
                           {'auto': 'auto', 'on': True, 'off': False}[args.fold_bn])
    else:
      times = measure_keras(args.model, args.batch_size, args.resolution, args.mode,
                            args.warmup, args.iters)
    print(json.dumps(times))
    return None

  results = {'model': args.model, 'batch_size': args.batch_size, 'resolution': args.resolution,
             'mode': args.mode, 'conv_impl': args.conv_impl, 'dtype': args.dtype,
             'chunk_size': args.chunk_size, 'fold_bn': args.fold_bn,
             'cpu_count': os.cpu_count(), 'date': time.strftime('%Y-%m-%d')}
  args.worker_target = 'ours'
  results['ours'] = summarise(_run_worker(args), args.batch_size)
  print(f"efficientnet-jax {args.model} {args.mode} batch {args.batch_size} "
        f"{args.resolution}px: {results['ours']['images_per_s']:.1f} img/s")
  if not args.skip_keras:
    args.worker_target = 'keras'
    results['keras'] = summarise(_run_worker(args), args.batch_size)
    results['ratio'] = results['ours']['images_per_s'] / results['keras']['images_per_s']
    print(f"keras.applications (TF) {args.mode}: {results['keras']['images_per_s']:.1f} img/s")
    print(f"ratio ours/keras: {results['ratio']:.2f}x")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)
  return results


if __name__ == '__main__':
  main()
