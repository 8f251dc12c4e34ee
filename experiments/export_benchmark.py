"""Throughput of the exported models in their runtimes beside our JAX path, in one run.

    python experiments/export_benchmark.py                       # B0 and Lite0, batch 1 and 32
    python experiments/export_benchmark.py --models=efficientnet-lite0 --batch_sizes=1 \
        --resolution=32 --tiny --iters=2 --warmup=1              # a one-minute smoke run

Each model (random weights: speed does not depend on them) is written as a pretrained directory
and exported once to every format (`efficientnet_jax.export`). Each (runtime, model, batch) is
then timed in its own fresh subprocess, so no runtime inherits another's thread pools, on the
same uint8 images, and the script prints a table of images/s (the median step). Runtimes:

    jax          our path: `models.make_inference_fn` on the pretrained directory (on CPU the
                 folded-BatchNorm, shifted-sum convolutions), uint8 normalised in numpy first
    stablehlo    the StableHLO artifact through `jax.export.deserialize` (XLA's convolutions)
    tensorflow   the SavedModel through `tf.saved_model.load`
    litert       the .tflite file in LiteRT (`ai_edge_litert`; batch 1 in the file, so a batch
                 runs image by image)
    onnxruntime  the .onnx file in ONNX Runtime (CPU, ORT_ENABLE_ALL)
    openvino     the .onnx file in OpenVINO (CPU, float32, LATENCY hint)

Every runtime may use all cores. The timing functions (`images_per_second`, and one `time_*`
per runtime taking (path, uint8 images)) can be imported by other benchmarks.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmark import _time_calls  # experiments/benchmark.py: warm-up calls, then timed calls

RUNTIMES = ('jax', 'stablehlo', 'tensorflow', 'litert', 'onnxruntime', 'openvino')
# The artifact each runtime reads: a pretrained directory ('pretrained') or an export format.
SOURCE = {'jax': 'pretrained', 'stablehlo': 'stablehlo', 'tensorflow': 'savedmodel',
          'litert': 'tflite', 'onnxruntime': 'onnx', 'openvino': 'onnx'}
SUFFIX = {'pretrained': '', 'stablehlo': '.stablehlo', 'savedmodel': '_savedmodel',
          'tflite': '.tflite', 'onnx': '.onnx'}


def _median(times):
  return sorted(times)[len(times) // 2]


def load_runner(runtime: str, path: str):
  """fn(uint8 [B, R, R, 3]) -> logits for `runtime` on `path` (see SOURCE for what path is)."""
  if runtime == 'jax':
    import jax  # pylint: disable=import-outside-toplevel

    from efficientnet_jax import pretrained, predict  # pylint: disable=import-outside-toplevel
    from efficientnet_jax.models import make_inference_fn  # pylint: disable=import-outside-toplevel
    model, variables, metadata = pretrained.load(path)
    forward = make_inference_fn(model)
    return lambda images: jax.block_until_ready(
        forward(variables, predict.normalize(images, metadata)))
  from efficientnet_jax import artifacts  # pylint: disable=import-outside-toplevel
  return artifacts.open_artifact(path, {'stablehlo': 'jax'}.get(runtime, runtime))


def images_per_second(runtime: str, path: str, images, warmup: int = 3, iters: int = 10) -> float:
  """Images/s of `runtime` on `path` for the batch `images` (median of `iters` calls)."""
  run = load_runner(runtime, path)
  return len(images) / _median(_time_calls(lambda: run(images), warmup, iters))


def time_jax(path, images, **kwargs):
  """`path`: a pretrained directory."""
  return images_per_second('jax', path, images, **kwargs)


def time_stablehlo(path, images, **kwargs):
  return images_per_second('stablehlo', path, images, **kwargs)


def time_tensorflow(path, images, **kwargs):
  return images_per_second('tensorflow', path, images, **kwargs)


def time_litert(path, images, **kwargs):
  return images_per_second('litert', path, images, **kwargs)


def time_onnxruntime(path, images, **kwargs):
  return images_per_second('onnxruntime', path, images, **kwargs)


def time_openvino(path, images, **kwargs):
  return images_per_second('openvino', path, images, **kwargs)


def _images(batch_size: int, resolution: int):
  import numpy as np  # pylint: disable=import-outside-toplevel
  return np.random.default_rng(0).integers(0, 256, (batch_size, resolution, resolution, 3),
                                           np.uint8)


def prepare(model_name: str, resolution: int, tiny: bool, directory: str, runtimes) -> dict:
  """Writes `model_name` with random weights as a pretrained directory and its exports."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from efficientnet_jax import export, pretrained  # pylint: disable=import-outside-toplevel
  from efficientnet_jax.models import create_model  # pylint: disable=import-outside-toplevel
  overrides = {'width_coefficient': 0.25, 'depth_coefficient': 0.25} if tiny else {}
  model = create_model(model_name, conv_impl='xla', **overrides)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, resolution, resolution, 3)))
  stem = os.path.join(directory, model_name)
  paths = {'pretrained': pretrained.save(stem, model_name, jax.tree.map(np.asarray, variables),
                                         model_overrides=overrides, resolution=resolution,
                                         overwrite=True)}
  for fmt in sorted({SOURCE[r] for r in runtimes} - {'pretrained'}):
    started = time.perf_counter()
    paths[fmt] = export.export_pretrained(paths['pretrained'], fmt, stem + SUFFIX[fmt],
                                          overwrite=True)
    print(f'  exported {model_name} to {fmt} in {time.perf_counter() - started:.0f} s',
          flush=True)
  return paths


def _worker(args) -> None:
  images = _images(args.batch_size, args.resolution)
  rate = images_per_second(args.worker, args.path, images, args.warmup, args.iters)
  print(json.dumps({'images_per_s': rate}))


def _measure(runtime: str, path: str, batch_size: int, args) -> float | None:
  cmd = [sys.executable, os.path.abspath(__file__), f'--worker={runtime}', f'--path={path}',
         f'--batch_size={batch_size}', f'--resolution={args.resolution}',
         f'--warmup={args.warmup}', f'--iters={args.iters}']
  done = subprocess.run(cmd, capture_output=True, text=True)
  if done.returncode:
    print(f'  {runtime} failed:\n{done.stderr[-2000:]}', flush=True)
    return None
  return json.loads(done.stdout.strip().splitlines()[-1])['images_per_s']


def _load_average() -> str:
  try:
    return ' '.join(f'{x:.2f}' for x in os.getloadavg())
  except OSError:
    return 'unknown'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', default='efficientnet-b0,efficientnet-lite0')
  parser.add_argument('--batch_sizes', default='1,32')
  parser.add_argument('--resolution', type=int, default=224)
  parser.add_argument('--runtimes', default=','.join(RUNTIMES))
  parser.add_argument('--tiny', action='store_true', help='width and depth 0.25 (smoke runs)')
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--iters', type=int, default=10)
  parser.add_argument('--workdir', default='/tmp/export_benchmark',
                      help='where the pretrained directories and exports are written')
  parser.add_argument('--json', default='', help='also write the results to this JSON file')
  parser.add_argument('--worker', default='', help=argparse.SUPPRESS)
  parser.add_argument('--path', default='', help=argparse.SUPPRESS)
  parser.add_argument('--batch_size', type=int, default=1, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    return _worker(args)

  runtimes = [r for r in args.runtimes.split(',') if r]
  unknown = sorted(set(runtimes) - set(RUNTIMES))
  if unknown:
    parser.error(f'unknown runtime(s) {unknown}; known: {", ".join(RUNTIMES)}')
  models = [m for m in args.models.split(',') if m]
  batch_sizes = [int(b) for b in args.batch_sizes.split(',') if b]
  results = {'resolution': args.resolution, 'tiny': args.tiny, 'cpu_count': os.cpu_count(),
             'date': time.strftime('%Y-%m-%d %H:%M'), 'load_average_before': _load_average(),
             'images_per_s': {}}
  print(f'load average before: {results["load_average_before"]}', flush=True)
  for model_name in models:
    paths = prepare(model_name, args.resolution, args.tiny, args.workdir, runtimes)
    for runtime in runtimes:
      for batch_size in batch_sizes:
        rate = _measure(runtime, paths[SOURCE[runtime]], batch_size, args)
        results['images_per_s'][f'{model_name}/{runtime}/{batch_size}'] = rate
        shown = f'{rate:.1f}' if rate is not None else 'failed'
        print(f'  {model_name} {runtime} batch {batch_size}: {shown} img/s', flush=True)
  results['load_average_after'] = _load_average()

  print(f'\n{args.resolution} px, images/s (median of {args.iters}), load average before '
        f'{results["load_average_before"]}, after {results["load_average_after"]}:\n')
  columns = [(m, b) for m in models for b in batch_sizes]
  print('| runtime | ' + ' | '.join(f'{m.replace("efficientnet-", "")} batch {b}'
                                     for m, b in columns) + ' |')
  print('|---' * (len(columns) + 1) + '|')
  for runtime in runtimes:
    cells = [results['images_per_s'][f'{m}/{runtime}/{b}'] for m, b in columns]
    print(f'| {runtime} | ' + ' | '.join('-' if c is None else f'{c:.1f}' for c in cells) + ' |')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)
  return results


if __name__ == '__main__':
  main()
