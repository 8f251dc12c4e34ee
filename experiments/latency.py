"""The paper's Table 4: batch-1 inference latency on one CPU core, EfficientNet against ResNet.

    python experiments/latency.py --workdir=/tmp/latency [--quick]

Every model runs at its native resolution (B1 240 px, ResNet-152 224 px) on one image through
`models.make_inference_fn`, once per convolution implementation in `config.conv_impls`, and is
reported at its fastest: the CPU path ('cpu': depthwise convs as shifted sums, 1x1 convs as
matrix products) is what makes EfficientNet fast here, while ResNet's dense 3x3 convs can run
faster through XLA's own convolution ('xla'), so the baseline gets its best implementation too.

All of them are timed in one fresh subprocess pinned to one core, round-robin: after a compiling
call and `warmup` more each, every round gives each (model, implementation) one untimed call
(to bring its weights back into cache) and then one timed call. On a shared machine the load
changes by the minute, so timing the models minutes apart makes their ratio a measure of the
load; interleaved, a load change slows every model alike. The speedup of a (fast, slow) pair is
slow's median latency over fast's (`speedup`). Writes under --workdir: `latency.csv` (per model:
median, mean, min), `latency.md` (that table and the speedups beside the paper's) and
`latency.png` (latency against multiply-adds, ours and the paper's, log-log). The tables list
the models in the config's order; the times themselves depend on the machine and its load.

One core: what confines XLA:CPU (jax 0.10) to one thread is the process's CPU affinity, set
before the interpreter starts (`os.sched_setaffinity` in the child, as `taskset -c` would):
XLA sizes its thread pools by the schedulable CPUs. In a measured convolution loop, affinity left
one busy thread where there were four, while `--xla_cpu_multi_thread_eigen=false` alone changed
nothing, and `intra_op_parallelism_threads` is a TensorFlow option, not an XLA flag; so neither
flag is used. The worker reports the CPUs it could use.

Not measured: the paper's second pair, B7 against GPipe (19.0 s vs 3.1 s, 6.1x). GPipe's network
is AmoebaNet-B (6, 512) with 557M parameters, which this repository does not implement; B7 alone
fits in memory at batch 1 (`--config.pairs='(("efficientnet-b7", "resnet-152"),)'` times it).
Settings: configs/experiments/latency.py.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The implementations `models.layers` offers; 'auto' is 'cpu' on a CPU.
CONV_IMPLS = ('auto', 'cpu', 'xla')

# Table 4 of the paper: mean of 20 runs at batch 1 on one core of a Xeon E5-2690.
PAPER_LATENCY_S = {'resnet-152': 0.554, 'efficientnet-b1': 0.098, 'gpipe': 19.0,
                   'efficientnet-b7': 3.1}
PAPER_SPEEDUP = {('efficientnet-b1', 'resnet-152'): 5.7, ('efficientnet-b7', 'gpipe'): 6.1}


# --- the arithmetic (pure, tested) --------------------------------------------------------------


def latency_stats(times_s) -> dict:
  """Median, mean and min of the timed calls, in seconds."""
  times_s = [float(t) for t in times_s]
  if not times_s:
    raise ValueError('latency_stats needs at least one timed call; got none (config.runs = 0?).')
  return {'runs': len(times_s), 'median_s': statistics.median(times_s),
          'mean_s': statistics.fmean(times_s), 'min_s': min(times_s)}


def speedup(fast_median_s: float, slow_median_s: float) -> float:
  """How many times faster the fast model is: slow's median latency over fast's."""
  if fast_median_s <= 0 or slow_median_s <= 0:
    raise ValueError(f'Latencies must be positive; got fast={fast_median_s}, '
                     f'slow={slow_median_s}.')
  return slow_median_s / fast_median_s


# --- the worker: one model in a fresh, pinned process ----------------------------------------


def _synthetic_variables(model, resolution: int):
  """Variables with the model's shapes and He-scaled random kernels, identity BatchNorm.

  Latency does not depend on the values, so this skips compiling `model.init` (as costly as
  compiling the forward pass); the scale keeps activations finite through 152 layers.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32))
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      fan_in = int(np.prod(leaf.shape[:-1]))
      return rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape).astype(np.float32)
    if name in ('scale', 'var'):
      return np.ones(leaf.shape, np.float32)
    return np.zeros(leaf.shape, np.float32)  # biases, BN offsets and means

  return jax.tree_util.tree_map_with_path(fill, shapes)


def measure(entries, runs: int, warmup: int) -> dict:
  """Times batch-1 inference of each entry (name, resolution, conv_impl), round-robin."""
  import jax
  import numpy as np

  from efficientnet_jax.models import create_model, make_inference_fn

  calls, results = [], []
  for name, resolution, conv_impl in entries:
    model = create_model(name, conv_impl=conv_impl)
    variables = jax.device_put(_synthetic_variables(model, resolution))
    image = jax.device_put(np.random.default_rng(1).normal(
        size=(1, resolution, resolution, 3)).astype(np.float32))
    forward = make_inference_fn(model)
    call = lambda f=forward, v=variables, x=image: f(v, x).block_until_ready()
    start = time.perf_counter()
    logits = call()
    first_call_s = time.perf_counter() - start
    for _ in range(warmup):
      call()
    calls.append(call)
    results.append({'model': name, 'resolution': resolution, 'conv_impl': conv_impl,
                    'first_call_s': first_call_s, 'times_s': [],
                    'finite': bool(np.isfinite(np.asarray(logits)).all())})
  for _ in range(runs):
    for call, result in zip(calls, results):
      call()  # untimed: the previous model's run has evicted this one's weights from cache
      start = time.perf_counter()
      call()
      result['times_s'].append(time.perf_counter() - start)
  return {'cpus': len(os.sched_getaffinity(0)), 'results': results}


def run_worker(entries, config) -> dict:
  """Runs `measure` in a fresh interpreter, pinned to one core when configured."""
  request = json.dumps({'entries': [list(e) for e in entries], 'runs': config.runs,
                        'warmup': config.warmup})
  core = min(os.sched_getaffinity(0))
  pin = (lambda: os.sched_setaffinity(0, {core})) if config.single_core else None
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  # One device: the test harness's fake-device flag must not leak into the measurement.
  env['XLA_FLAGS'] = ' '.join(f for f in env.get('XLA_FLAGS', '').split()
                              if not f.startswith('--xla_force_host_platform_device_count'))
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), f'--worker={request}'],
                        env=env, preexec_fn=pin, capture_output=True, text=True,
                        timeout=config.timeout_s)
  if proc.returncode != 0:
    raise RuntimeError(f'The timing subprocess failed (exit {proc.returncode}):\n'
                       f'{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the study --------------------------------------------------------------------------------


def models_of(pairs) -> list[str]:
  """The models of the (fast, slow) pairs, each once, in order."""
  return list(dict.fromkeys(name for pair in pairs for name in pair))


def run_study(config, workdir: str, log=print) -> tuple[list[dict], list[dict]]:
  """Times every model of `config.pairs` and writes the tables and the plot under `workdir`."""
  from efficientnet_jax.complexity import model_complexity
  from efficientnet_jax.models import get_variant

  for pair in config.pairs:
    if len(pair) != 2:
      raise ValueError(f'config.pairs holds (fast, slow) model pairs; got {tuple(pair)!r}.')
  if not config.conv_impls or set(config.conv_impls) - set(CONV_IMPLS):
    raise ValueError(f'config.conv_impls must name one or more of {CONV_IMPLS}; got '
                     f'{tuple(config.conv_impls)!r}.')
  names = models_of(config.pairs)
  for name in names:
    get_variant(name)  # an unknown name fails here, before any timing
  resolutions = {n: config.resolution or get_variant(n).resolution for n in names}
  entries = [(n, resolutions[n], impl) for n in names for impl in config.conv_impls]
  log(f'Timing {len(entries)} (model, convs) entries round-robin: {config.runs} rounds after '
      f'{config.warmup + 1} untimed calls each, {"one core" if config.single_core else "all cores"}'
      '...')
  measured = run_worker(entries, config)
  rows = {}
  for result in measured['results']:
    name, resolution = result['model'], result['resolution']
    stats = latency_stats(result['times_s'])
    log(f'  {name} at {resolution} px, conv_impl={result["conv_impl"]}: median '
        f'{stats["median_s"] * 1e3:.1f} ms, mean {stats["mean_s"] * 1e3:.1f} ms, min '
        f'{stats["min_s"] * 1e3:.1f} ms' + ('' if result['finite'] else
                                           ' (WARNING: non-finite logits)'))
    # Each model is reported at its fastest implementation.
    if name not in rows or stats['median_s'] < rows[name]['median_s']:
      native = resolution == get_variant(name).resolution
      rows[name] = {
          'model': name, 'resolution': resolution, 'conv_impl': result['conv_impl'], **stats,
          'first_call_s': result['first_call_s'], 'cpus': measured['cpus'],
          'madds': model_complexity(name, resolution)['madds'],
          'paper_mean_s': PAPER_LATENCY_S.get(name) if native else None}
  log(f'  (on {measured["cpus"]} CPU core(s))')
  speedups = []
  for fast, slow in config.pairs:
    ratio = speedup(rows[fast]['median_s'], rows[slow]['median_s'])
    native = all(rows[n]['resolution'] == get_variant(n).resolution for n in (fast, slow))
    speedups.append({'fast': fast, 'slow': slow, 'fast_median_s': rows[fast]['median_s'],
                     'slow_median_s': rows[slow]['median_s'], 'speedup': ratio,
                     'paper_speedup': PAPER_SPEEDUP.get((fast, slow)) if native else None})
    log(f'{fast} is {ratio:.2f}x faster than {slow} (median latency)')
  write_outputs(list(rows.values()), speedups, workdir)
  return list(rows.values()), speedups


COLUMNS = ('model', 'resolution', 'conv_impl', 'runs', 'median_s', 'mean_s', 'min_s',
           'paper_mean_s', 'madds', 'cpus', 'first_call_s')


def write_outputs(rows: list[dict], speedups: list[dict], workdir: str) -> str:
  from efficientnet_jax.study import report

  os.makedirs(workdir, exist_ok=True)
  report.write_csv(os.path.join(workdir, 'latency.csv'), rows, COLUMNS)
  seconds = '{:.4f}'
  text = report.write_markdown(
      None, rows, COLUMNS[:-1], title='Batch-1 latency (paper Table 4)',
      formats={'median_s': seconds, 'mean_s': seconds, 'min_s': seconds,
               'paper_mean_s': seconds, 'madds': lambda v: f'{v / 1e9:.3f}B'},
      headers={'resolution': 'res', 'conv_impl': 'convs', 'median_s': 'median (s)',
               'mean_s': 'mean (s)',
               'min_s': 'min (s)', 'paper_mean_s': 'paper mean (s)',
               'madds': 'multiply-adds'})
  text += '\n' + report.write_markdown(
      None, speedups, ('fast', 'slow', 'speedup', 'paper_speedup'),
      formats={'speedup': '{:.2f}x', 'paper_speedup': '{:.1f}x'},
      headers={'speedup': 'speedup (medians)', 'paper_speedup': 'paper'})
  text += ('\nNot measured: B7 vs GPipe (AmoebaNet-B, 557M parameters, is not implemented '
           'here).\n')
  with open(os.path.join(workdir, 'latency.md'), 'w') as f:
    f.write(text)
  # Ours against our multiply-adds; the paper's against its own (where it gives both).
  from efficientnet_jax.models import get_variant
  paper_rows = [r for r in rows if r['paper_mean_s'] and get_variant(r['model']).paper_madds]
  series = {'ours (median, this CPU)': [(r['madds'], r['median_s']) for r in rows],
            'paper (mean, Xeon E5-2690)': [(get_variant(r['model']).paper_madds,
                                            r['paper_mean_s']) for r in paper_rows]}
  labels = {'ours (median, this CPU)': [r['model'] for r in rows],
            'paper (mean, Xeon E5-2690)': [r['model'] for r in paper_rows]}
  report.plot_series(os.path.join(workdir, 'latency.png'), series,
                     xlabel='multiply-adds per image (log scale)',
                     ylabel='batch-1 latency on one core (s, log scale)', logx=True, logy=True,
                     annotate=labels, lines=False, title='Inference latency (paper Table 4)')
  return text


def define_flags() -> None:
  """The command line (defined only when run as a script, so tests can import this module)."""
  config_flags.DEFINE_config_file(
      'config', os.path.join(ROOT, 'configs', 'experiments', 'latency.py'),
      'Study settings (ml_collections config file).', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for the tables and the plot.')
  flags.DEFINE_bool('quick', False, "Apply the config's `quick` fields (a smoke run).")
  flags.DEFINE_string('worker', None, 'Internal: time one model (JSON request).')


def main(argv):
  del argv
  if FLAGS.worker:
    request = json.loads(FLAGS.worker)
    print(json.dumps(measure(**request)))  # the parent reads this last line
    return
  if not FLAGS.workdir:
    raise app.UsageError('--workdir is required (the tables and the plot are written there).')
  config = FLAGS.config
  if FLAGS.quick:
    config.update(config.quick)
  try:
    run_study(config, FLAGS.workdir)
  except ValueError as e:  # an unknown model name or a malformed pair: no traceback
    raise app.UsageError(str(e)) from None
  with open(os.path.join(FLAGS.workdir, 'latency.md')) as f:
    print(f.read())


if __name__ == '__main__':
  define_flags()
  app.run(main)
