"""CPU throughput of our EfficientNet against every runtime a user would pick instead, in one run.

    pip install -e '.[bench]'
    python experiments/benchmark.py                                  # B0: every peer, both modes
    python experiments/benchmark.py --peers=ours,keras --modes=train # a subset
    python experiments/benchmark.py --tiny --resolution=32 --iters=2 --warmup=1 --rounds=1  # smoke

Implementations (`--peers`, default: every one but the `ours-*` exports):

    ours              efficientnet-jax, float32: `make_inference_fn` (on CPU: folded BatchNorm,
                      shifted-sum convolutions, a batch split into one stream per core as the
                      predict CLI runs it; `--cores=1` for one stream); training: a jitted
                      SGD-with-momentum step
    ours-bf16         the same with bfloat16 activations (inference): on oneDNN (AMX /
                      AVX512_BF16) where the optional extension loads (the `onednn` extra),
                      else on XLA; the header line says which
    keras             keras.applications (TensorFlow), inference and `train_on_batch`
    torch             efficientnet_pytorch, eager (no_grad for inference), both modes
    onnxruntime       efficientnet_pytorch exported once by `torch.onnx.export` (opset 17), in
                      ONNX Runtime (ORT_ENABLE_ALL)
    openvino          the same ONNX file in OpenVINO, float32 pinned (INFERENCE_PRECISION_HINT f32)
    openvino-default  the same in OpenVINO at its default precision: bfloat16 on CPUs with
                      AVX512_BF16 or AMX, which users get without asking
    ours-onnxruntime, ours-openvino, ours-litert, ours-savedmodel, ours-stablehlo
                      our own exports (`python -m efficientnet_jax.export`) in their runtimes;
                      `--peers=all` adds them (see also experiments/export_benchmark.py)

Modes: inference at each of `--batch_sizes` (default 1 and 32) and the training step (forward,
backward, SGD with momentum, BN statistics) at `--train_batch_size` (default 32), float32, random
weights (speed does not depend on them), `--resolution` px. Each (implementation, mode, batch) runs
in its own fresh subprocess, so none inherits another's thread pools; the whole set runs
`--rounds` times round-robin and each figure is the best round's median step. The script prints
images/s, ours / best float32 peer for each column, ours-bf16 / openvino-default, and `--json`
writes it all.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

KERAS_APPS = {f'efficientnet-b{i}': f'EfficientNetB{i}' for i in range(8)}
TORCH_MODELS = {f'efficientnet-b{i}' for i in range(8)}  # efficientnet_pytorch's names
# peer -> (modes it runs, the artifact it reads: None, 'torch.onnx' or one of our formats)
PEERS = {
    'ours': (('inference', 'train'), None),
    'ours-bf16': (('inference',), None),
    'keras': (('inference', 'train'), None),
    'torch': (('inference', 'train'), None),
    'onnxruntime': (('inference',), 'torch.onnx'),
    'openvino': (('inference',), 'torch.onnx'),
    'openvino-default': (('inference',), 'torch.onnx'),
    'ours-onnxruntime': (('inference',), 'onnx'),
    'ours-openvino': (('inference',), 'onnx'),
    'ours-litert': (('inference',), 'tflite'),
    'ours-savedmodel': (('inference',), 'savedmodel'),
    'ours-stablehlo': (('inference',), 'stablehlo'),
}
DEFAULT_PEERS = tuple(p for p in PEERS if not p.startswith('ours-') or p == 'ours-bf16')
# The other implementations that compute in float32 (the comparison for `ours`; openvino-default
# may not). Our own exports are in the table but not in the ratio.
FLOAT32_PEERS = ('keras', 'torch', 'onnxruntime', 'openvino')
_EXPORT_RUNTIME = {'ours-onnxruntime': 'onnxruntime', 'ours-openvino': 'openvino',
                   'ours-litert': 'litert', 'ours-savedmodel': 'tensorflow',
                   'ours-stablehlo': 'stablehlo'}


def _time_calls(step, warmup: int, iters: int) -> list[float]:
  for _ in range(warmup):
    step()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return times


def _overrides(tiny: bool) -> dict:
  return {'width_coefficient': 0.25, 'depth_coefficient': 0.25} if tiny else {}


# ----------------------------------------------------------------------------- the measurements
def measure_ours(model_name, batch_size, resolution, mode, conv_impl, dtype, chunk_size, warmup,
                 iters, fold_bn='auto', tiny=False, cores='auto'):
  from efficientnet_jax import xla_cpu
  if mode == 'inference' and cores != 1:
    xla_cpu.use_one_device_per_core()  # before JAX starts: one stream per core (as `predict`)
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from efficientnet_jax.models import create_model, make_inference_fn

  model = create_model(model_name, conv_impl=conv_impl, dtype=jnp.dtype(dtype), **_overrides(tiny))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((batch_size, resolution, resolution, 3), np.float32))
  labels = jnp.asarray(rng.integers(0, 1000, batch_size))
  variables = jax.jit(model.init)(jax.random.key(0), images[:1])
  if mode == 'inference':
    forward = make_inference_fn(model, chunk_size=chunk_size, fold_bn=fold_bn, cores=cores)
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


def _torch_model(model_name):
  from efficientnet_pytorch import EfficientNet
  model = EfficientNet.from_name(model_name)
  model.set_swish(memory_efficient=False)  # the plain form: exportable, and faster under no_grad
  return model


def measure_torch(model_name, batch_size, resolution, mode, warmup, iters):
  import numpy as np
  import torch

  model = _torch_model(model_name)
  rng = np.random.default_rng(0)
  images = torch.from_numpy(rng.standard_normal((batch_size, 3, resolution, resolution),
                                                np.float32))
  labels = torch.from_numpy(rng.integers(0, 1000, batch_size))
  if mode == 'inference':
    model.eval()

    def step():
      with torch.no_grad():
        model(images)
  else:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
      optimizer.zero_grad(set_to_none=True)
      loss_fn(model(images), labels).backward()
      optimizer.step()
  return _time_calls(step, warmup, iters)


def export_torch_onnx(model_name, resolution, path):
  """efficientnet_pytorch's model as ONNX (opset 17, symbolic batch), what a user would run."""
  import torch
  model = _torch_model(model_name).eval()
  dummy = torch.zeros(1, 3, resolution, resolution)
  with torch.no_grad():
    torch.onnx.export(model, (dummy,), path, opset_version=17, input_names=['input'],
                      output_names=['logits'], dynamic_axes={'input': {0: 'batch'}},
                      dynamo=False)
  return path


def measure_onnx_file(path, runtime, batch_size, resolution, warmup, iters):
  import numpy as np
  images = np.random.default_rng(0).standard_normal(
      (batch_size, 3, resolution, resolution)).astype(np.float32)
  if runtime == 'onnxruntime':
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    step = lambda: session.run(None, {name: images})
  else:
    import openvino as ov
    core = ov.Core()
    config = {'PERFORMANCE_HINT': 'LATENCY'}
    if runtime == 'openvino':
      config['INFERENCE_PRECISION_HINT'] = 'f32'
    compiled = core.compile_model(core.read_model(path), 'CPU', config)
    request = compiled.create_infer_request()
    step = lambda: request.infer({0: images})
  return _time_calls(step, warmup, iters)


def measure_export(peer, path, batch_size, resolution, warmup, iters):
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from export_benchmark import _images, load_runner  # pylint: disable=import-outside-toplevel
  run = load_runner(_EXPORT_RUNTIME[peer], path)
  images = _images(batch_size, resolution)
  return _time_calls(lambda: run(images), warmup, iters)


def _worker(args) -> list[float]:
  peer, mode, batch = args.worker, args.mode, args.batch_size
  common = dict(warmup=args.warmup, iters=args.iters)
  if peer in ('ours', 'ours-bf16'):
    chunk = args.chunk_size if args.chunk_size == 'auto' else int(args.chunk_size)
    return measure_ours(args.model, batch, args.resolution, mode, args.conv_impl,
                        'bfloat16' if peer == 'ours-bf16' else args.dtype, chunk,
                        fold_bn={'auto': 'auto', 'on': True, 'off': False}[args.fold_bn],
                        tiny=args.tiny, cores=args.cores if args.cores == 'auto'
                        else int(args.cores), **common)
  if peer == 'keras':
    return measure_keras(args.model, batch, args.resolution, mode, **common)
  if peer == 'torch':
    return measure_torch(args.model, batch, args.resolution, mode, **common)
  if PEERS[peer][1] == 'torch.onnx':
    return measure_onnx_file(args.path, peer, batch, args.resolution, **common)
  return measure_export(peer, args.path, batch, args.resolution, **common)


# ----------------------------------------------------------------------------- the driver
def prepare(args, peers) -> dict:
  """Writes the artifacts the peers read: efficientnet_pytorch's ONNX, our exports."""
  os.makedirs(args.workdir, exist_ok=True)
  paths = {}
  if any(PEERS[p][1] == 'torch.onnx' for p in peers):
    path = os.path.join(args.workdir, f'{args.model}-torch-{args.resolution}.onnx')
    paths['torch.onnx'] = export_torch_onnx(args.model, args.resolution, path)
  formats = sorted({PEERS[p][1] for p in peers} - {None, 'torch.onnx'})
  if formats:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import export_benchmark  # pylint: disable=import-outside-toplevel
    runtimes = [r for r, source in export_benchmark.SOURCE.items() if source in formats]
    written = export_benchmark.prepare(args.model, args.resolution, args.tiny, args.workdir,
                                       runtimes)
    paths.update({fmt: written[fmt] for fmt in formats})
  return paths


def _with_tcmalloc(env: dict) -> dict:
  """`env` with tcmalloc preloaded where installed, as `python -m efficientnet_jax.main` runs."""
  from efficientnet_jax import allocator  # pylint: disable=import-outside-toplevel
  command = allocator.tcmalloc_command(env, [])
  return command[1] if command else env


def _run_worker(args, peer, mode, batch_size, path) -> list[float] | None:
  cmd = [sys.executable, os.path.abspath(__file__), f'--worker={peer}', f'--mode={mode}',
         f'--batch_size={batch_size}', f'--model={args.model}', f'--resolution={args.resolution}',
         f'--conv_impl={args.conv_impl}', f'--dtype={args.dtype}',
         f'--chunk_size={args.chunk_size}', f'--fold_bn={args.fold_bn}', f'--cores={args.cores}',
         f'--warmup={args.warmup}', f'--iters={args.iters}', f'--path={path or ""}']
  if args.tiny:
    cmd.append('--tiny')
  preload = (args.tcmalloc == 'all' and 'openvino' not in peer
             or args.tcmalloc == 'ours' and peer in ('ours', 'ours-bf16'))
  env = _with_tcmalloc(dict(os.environ)) if preload else dict(os.environ)
  done = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if done.returncode:
    print(f'  {peer} {mode} batch {batch_size} failed:\n{done.stderr[-1500:]}', flush=True)
    return None
  return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(times: list[float], batch_size: int) -> dict:
  """Images/s from the median step time (robust to one slow step)."""
  ordered = sorted(times)
  median = ordered[len(ordered) // 2]
  return {'median_s': median, 'images_per_s': batch_size / median, 'times_s': times}


def _cpuinfo(field: str) -> str:
  """The first `field` line of /proc/cpuinfo ('' where it cannot be read)."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith(field):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return ''


def _cpu_name() -> str:
  return _cpuinfo('model name') or platform.processor() or 'unknown CPU'


def ratios(columns, table) -> dict:
  """ours / best float32 peer per column, and ours-bf16 / openvino-default."""
  out = {}
  for column in columns:
    row = {peer: table.get(peer, {}).get(column) for peer in PEERS}
    peers = {p: v for p, v in row.items() if p in FLOAT32_PEERS and v}
    if row.get('ours') and peers:
      best = max(peers, key=peers.get)
      out[f'ours/{best} {column}'] = row['ours'] / peers[best]
    if row.get('ours-bf16') and row.get('openvino-default'):
      out[f'ours-bf16/openvino-default {column}'] = row['ours-bf16'] / row['openvino-default']
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='efficientnet-b0')
  parser.add_argument('--peers', default=','.join(DEFAULT_PEERS),
                      help=f"comma-separated, or 'all'; known: {', '.join(PEERS)}")
  parser.add_argument('--modes', default='inference,train')
  parser.add_argument('--batch_sizes', default='1,32', help='inference batch sizes')
  parser.add_argument('--train_batch_size', type=int, default=32)
  parser.add_argument('--resolution', type=int, default=224)
  parser.add_argument('--conv_impl', default='auto', choices=('auto', 'xla', 'cpu'),
                      help='ours: the convolution path')
  parser.add_argument('--dtype', default='float32', help="ours: activations ('ours-bf16': bf16)")
  parser.add_argument('--chunk_size', default='auto',
                      help="ours, inference: examples per sequential chunk ('auto': on CPU 2 for "
                      "feature maps >= 28 px and 8 after with fold_bn, else 8; 0: none)")
  parser.add_argument('--fold_bn', default='auto', choices=('auto', 'on', 'off'),
                      help='ours, inference: fold BatchNorm into the convs (auto: on CPU)')
  parser.add_argument('--cores', default='auto',
                      help="ours, inference: CPU streams a batch is split across ('auto': one per "
                           "core, as the predict CLI does; 1: one stream whose ops use every core)")
  parser.add_argument('--tiny', action='store_true',
                      help='ours and our exports at width and depth 0.25 (smoke runs only)')
  parser.add_argument('--tcmalloc', default='ours', choices=('ours', 'all', 'none'),
                      help="which workers run with tcmalloc preloaded (where installed): 'ours' "
                      '(default) as our jobs run themselves, every other peer as it comes; '
                      "'all' every peer but OpenVINO (it aborts under tcmalloc); 'none'")
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--iters', type=int, default=10)
  parser.add_argument('--rounds', type=int, default=2, help='round-robin repeats; best kept')
  parser.add_argument('--workdir', default='/tmp/efficientnet_jax_benchmark',
                      help='where the ONNX files and exports are written')
  parser.add_argument('--json', default='', help='also write the results to this JSON file')
  parser.add_argument('--worker', default='', help=argparse.SUPPRESS)
  parser.add_argument('--mode', default='inference', help=argparse.SUPPRESS)
  parser.add_argument('--batch_size', type=int, default=32, help=argparse.SUPPRESS)
  parser.add_argument('--path', default='', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args.worker:
    print(json.dumps(_worker(args)))
    return None

  peers = list(PEERS) if args.peers == 'all' else [p for p in args.peers.split(',') if p]
  unknown = sorted(set(peers) - set(PEERS))
  if unknown:
    parser.error(f'unknown peer(s) {unknown}; known: {", ".join(PEERS)}')
  if args.model not in KERAS_APPS:
    dropped = [p for p in peers if p in ('keras', 'torch') or PEERS[p][1] == 'torch.onnx']
    if dropped:
      print(f'{args.model}: keras.applications and efficientnet_pytorch have no such model; '
            f'skipping {dropped}', flush=True)
      peers = [p for p in peers if p not in dropped]
  modes = [m for m in args.modes.split(',') if m]
  columns = [('inference', int(b)) for b in args.batch_sizes.split(',') if b and
             'inference' in modes]
  if 'train' in modes:
    columns.append(('train', args.train_batch_size))
  column_names = [f'{mode} b{batch}' for mode, batch in columns]
  from efficientnet_jax import xla_cpu  # pylint: disable=import-outside-toplevel
  print(f'{args.model} at {args.resolution} px on {_cpu_name()}, {os.cpu_count()} cores; '
        f'bf16 units: {xla_cpu.host_has_bf16_units()}; tcmalloc preloaded '
        f'for: {args.tcmalloc}', flush=True)
  for peer, dtype in (('ours', 'float32'), ('ours-bf16', 'bfloat16')):
    if peer in peers:
      from efficientnet_jax.models import onednn  # pylint: disable=import-outside-toplevel
      print(f'{peer} runs on: {onednn.inference_path(dtype)}', flush=True)
  paths = prepare(args, peers)

  table: dict[str, dict[str, float]] = {}
  runs: dict[str, list] = {}
  for round_index in range(args.rounds):
    for peer in peers:
      for (mode, batch), name in zip(columns, column_names):
        if mode not in PEERS[peer][0]:
          continue
        times = _run_worker(args, peer, mode, batch, paths.get(PEERS[peer][1]))
        if times is None:
          continue
        summary = summarise(times, batch)
        runs.setdefault(f'{peer} {name}', []).append(summary)
        best = max(table.setdefault(peer, {}).get(name, 0.0), summary['images_per_s'])
        table[peer][name] = best
        print(f'  round {round_index + 1}: {peer} {name}: {summary["images_per_s"]:.1f} img/s',
              flush=True)

  print(f'\n{args.model}, {args.resolution} px, images/s (best of {args.rounds} round-robin '
        f'medians of {args.iters} steps), {time.strftime("%Y-%m-%d")}, {_cpu_name()}:\n')
  print('| implementation | ' + ' | '.join(column_names) + ' |')
  print('|---' * (len(column_names) + 1) + '|')
  for peer in peers:
    cells = [table.get(peer, {}).get(name) for name in column_names]
    print(f'| {peer} | ' + ' | '.join('–' if c is None else f'{c:.1f}' for c in cells) + ' |')
  found = ratios(column_names, table)
  print()
  for key, value in found.items():
    print(f'{key}: {value:.2f}x')
  results = {'model': args.model, 'resolution': args.resolution, 'tiny': args.tiny,
             'cpu': _cpu_name(), 'cpu_count': os.cpu_count(), 'date': time.strftime('%Y-%m-%d'),
             'rounds': args.rounds, 'iters': args.iters, 'tcmalloc': args.tcmalloc,
             'images_per_s': table,
             'ratios': found, 'runs': runs}
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)
  return results


if __name__ == '__main__':
  main()
