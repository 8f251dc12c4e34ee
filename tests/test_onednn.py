"""The optional oneDNN path (`models/onednn.py`): one fused MBConv block equals the folded block
on XLA, the whole network as one call equals the float32 model (to float32's rounding, or within
bfloat16's), bfloat16 CPU inference gives float32's top-1 on the real Lite0 photos, bad calls are
refused with what was wrong, and without the extension everything falls back with one log line.

The tests of the extension itself skip, saying why, where it cannot be built (no oneDNN: the
'[onednn]' extra; no C++ compiler); bfloat16 ones also where the CPU has neither AMX nor
AVX512_BF16. The fallback and Lite0 tests run everywhere.
"""
from __future__ import annotations

import logging
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientnet_jax import pretrained, predict, xla_cpu
from efficientnet_jax.models import (create_model, folding, inference, layers, make_inference_fn,
                                     onednn)
from pretrained_fixtures import lite0_dir  # noqa: F401  (a pytest fixture)
from support import subprocess_env
from test_export import photos

# bfloat16 keeps 8 bits of mantissa: one rounding is up to 2**-9 of a value, and a product sums
# many. Per op, relative to the output's largest magnitude:
BF16_OP_TOLERANCE = 1e-2
F32_OP_TOLERANCE = 1e-5
# The whole network in bfloat16 against float32, max |difference| / max |logit|. The real Lite0
# weights measured 2.9e-2 (oneDNN and XLA alike) on the 8 photos.
BF16_LOGIT_TOLERANCE = 5e-2


def _need_extension():
  if onednn.load() is None:
    pytest.skip(f"the oneDNN extension is not available: {onednn._state.get('reason')}")


def _need(dtype):
  _need_extension()
  if dtype == jnp.bfloat16 and not xla_cpu.host_has_bf16_units():
    pytest.skip('bfloat16 on oneDNN needs a CPU with AMX or AVX512_BF16')


def _relative(got, want) -> float:
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return float(np.abs(got - want).max() / np.abs(want).max())


def _tolerance(dtype) -> float:
  return BF16_OP_TOLERANCE if dtype == jnp.bfloat16 else F32_OP_TOLERANCE


DTYPES = [pytest.param(jnp.float32, id='f32'), pytest.param(jnp.bfloat16, id='bf16')]


def _tiny_b0(dtype):
  return create_model('efficientnet-b0', dtype=dtype, width_coefficient=0.25,
                      depth_coefficient=0.25)


def _tame(variables):
  """The model's initial values with BN statistics moved off 0/1 (a real network's spread)."""
  rng = np.random.default_rng(3)
  def move(path, leaf):
    name = jax.tree_util.keystr(path)
    if 'batch_stats' in name and 'var' in name:
      return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), leaf.dtype)
    if leaf.ndim == 1:
      return leaf + jnp.asarray(rng.normal(0, 0.1, leaf.shape), leaf.dtype)
    return leaf
  return jax.tree_util.tree_map_with_path(move, variables)


def _block_params(rng, cin, e, out, k, squeeze, expand, dtype):
  """Random folded parameters of one MBConv block (`onednn.fold`'s layout and dtypes)."""
  conv = lambda *shape: {'kernel': jnp.asarray(rng.standard_normal(shape) / np.sqrt(
      np.prod(shape[:-1])), jnp.float32), 'bias': jnp.asarray(
          rng.standard_normal(shape[-1]) * 0.1, jnp.float32)}
  p = {'dwconv': conv(k, k, 1, e), 'project_conv': conv(1, 1, e, out)}
  if expand:
    p['expand_conv'] = conv(1, 1, cin, e)
  if squeeze:
    p['se_reduce'], p['se_expand'] = conv(1, 1, e, max(1, cin // 4)), conv(1, 1, max(1, cin // 4), e)
  for name in ('expand_conv', 'project_conv'):
    if name in p:  # 1x1 kernels in the activations' dtype, the rest float32
      p[name]['kernel'] = p[name]['kernel'].astype(dtype)
  return p


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('strip_bytes', [0, 1], ids=['strips', 'row-by-row'])
@pytest.mark.parametrize('kernel_size,stride,size,batch,cin,e,out,squeeze,expand,activation', [
    (3, 1, 9, 1, 16, 48, 16, True, True, 'swish'),     # residual; one image: rows split
    (3, 2, 10, 3, 16, 48, 24, True, True, 'swish'),    # three images: one per thread
    (5, 1, 10, 3, 24, 24, 24, True, False, 'swish'),   # unexpanded, 24 channels (a tail of 8)
    (5, 2, 9, 1, 8, 40, 16, False, True, 'relu6'),     # no SE, 40 channels, odd size
    (5, 1, 7, 2, 40, 240, 40, True, True, 'swish'),    # a small map under a 5x5 kernel
])
def test_mbconv_equals_xla(dtype, strip_bytes, kernel_size, stride, size, batch, cin, e, out,
                           squeeze, expand, activation):
  """One fused MBConv call (expand, depthwise, SE, project, residual) equals the folded block on
  XLA (`folding._mbconv`) on the same rounded inputs: kernels 3 and 5, strides 1 and 2, odd and
  even sizes, batch 1 and more, with and without expand, SE and residual; in strips of the
  default budget and one output row at a time."""
  _need(dtype)
  rng = np.random.default_rng(kernel_size * 1000 + stride * 100 + size * 10 + batch)
  p = _block_params(rng, cin, e, out, kernel_size, squeeze, expand, dtype)
  x = jnp.asarray(rng.standard_normal((batch, size, size, cin)), dtype)
  residual = stride == 1 and cin == out
  got = jax.jit(lambda x, p: onednn.mbconv(x, p, stride, activation, residual,
                                           strip_bytes))(x, p)
  f32 = jax.tree.map(lambda v: v.astype(jnp.float32), p)
  with jax.default_matmul_precision('highest'):
    want = jax.jit(lambda x, p: folding._mbconv(
        x, p, stride, layers.activation_fn(activation), 'identity'))(x.astype(jnp.float32), f32)
  assert got.shape == want.shape and got.dtype == dtype
  assert _relative(got, want) <= _tolerance(dtype) * (10 if dtype == jnp.float32 else 1)


def test_mbconv_follows_new_kernel_values():
  """Kernels reordered for oneDNN are kept between calls; new values (in new buffers, or in a
  buffer an earlier kernel used) must never meet an old reordering."""
  _need(jnp.float32)
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 16)), jnp.float32)
  fn = jax.jit(lambda x, p: onednn.mbconv(x, p, 1, 'swish', True))
  ref = jax.jit(lambda x, p: folding._mbconv(x, p, 1, jax.nn.swish, 'identity'))
  for _ in range(4):
    p = _block_params(rng, 16, 64, 16, 3, True, True, jnp.float32)
    with jax.default_matmul_precision('highest'):
      want = ref(x, p)
    assert _relative(fn(x, p), want) <= 1e-4
    del p


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('size', [72, 67, 160])  # 160: a first map too big to share
def test_network_on_onednn_equals_float32(dtype, size):
  """A small B0 (stride 2 at even and odd sizes, SE everywhere) through `make_inference_fn` as
  one oneDNN call: float32's logits, to float32's rounding in float32 and within bfloat16's in
  bfloat16; batch 1 (rows split between threads) and 3 (whole images per thread)."""
  _need(dtype)
  if onednn.unsuited_cpu(dtype):
    pytest.skip(f'make_inference_fn keeps {jnp.dtype(dtype).name} on XLA here: '
                f'{onednn.unsuited_cpu(dtype)}')
  model, run = _tiny_b0(jnp.float32), _tiny_b0(dtype)
  assert inference.uses_onednn(run)
  assert not inference.uses_onednn(run.clone(conv_impl='xla')) or dtype == jnp.bfloat16
  images = jnp.asarray(np.random.default_rng(0).standard_normal((3, size, size, 3)), jnp.float32)
  variables = _tame(jax.jit(model.init)(jax.random.key(0), images[:1]))
  with jax.default_matmul_precision('highest'):
    want = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  fn = make_inference_fn(run)
  for batch in (1, 3):
    got = fn(variables, images[:batch])
    assert got.shape == (batch, 1000) and got.dtype == jnp.float32
    tolerance = BF16_LOGIT_TOLERANCE if dtype == jnp.bfloat16 else 1e-4
    assert _relative(got, want[:batch]) <= tolerance


def test_network_refuses_parameters_that_do_not_fit():
  """A kernel packed for other shapes, or a block list that does not follow from one block to the
  next: an error naming what is wrong, not a read past a buffer."""
  _need(jnp.float32)
  model = _tiny_b0(jnp.float32)
  images = jnp.zeros((1, 32, 32, 3), jnp.float32)
  folded = jax.jit(lambda v: onednn.fold(model, v))(jax.jit(model.init)(jax.random.key(0),
                                                                         images))
  name = 'block2a'
  wrong = dict(folded, **{name: dict(folded[name], project_conv=dict(
      folded[name]['project_conv'], packed=folded['block1a']['project_conv']['packed']))})
  with pytest.raises(Exception, match='wrong size'):
    jax.block_until_ready(onednn.network(model, wrong, images))
  mixed = dict(folded, block3a=folded['block4a'])  # 16 channels in where 8 arrive
  with pytest.raises(Exception, match='wrong size|do not follow'):
    jax.block_until_ready(onednn.network(model, mixed, images))
  assert np.isfinite(np.asarray(onednn.network(model, folded, images))).all()


def test_without_the_extension_bfloat16_falls_back_with_one_log_line(monkeypatch, caplog):
  """No oneDNN here: one warning saying why, and bfloat16 inference runs on XLA, the same values
  as the model's own apply."""
  def absent():
    raise onednn.OnednnUnavailable("oneDNN's headers and library were not found")
  monkeypatch.setattr(onednn, '_state', {})
  monkeypatch.setattr(onednn, '_onednn_prefix', absent)
  monkeypatch.setattr(xla_cpu, 'host_has_bf16_units', lambda: True)
  half = _tiny_b0(jnp.bfloat16)
  images = jnp.asarray(np.random.default_rng(1).standard_normal((2, 64, 64, 3)), jnp.float32)
  variables = jax.jit(half.init)(jax.random.key(0), images[:1])
  with caplog.at_level(logging.INFO, logger='efficientnet_jax.models.onednn'):
    assert not inference.uses_onednn(half)
    fn = make_inference_fn(half)
    make_inference_fn(half)
    got = fn(variables, images)
  lines = [r for r in caplog.records if r.name == 'efficientnet_jax.models.onednn']
  assert len(lines) == 1 and lines[0].levelno == logging.WARNING, caplog.text
  assert 'runs on XLA' in lines[0].getMessage()
  assert 'headers and library were not found' in lines[0].getMessage()
  want = jax.jit(lambda v, x: half.apply(v, x, train=False))(variables, images)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=2e-2, atol=2e-2 * float(jnp.abs(want).max()))


def test_disabled_by_environment(monkeypatch, caplog):
  monkeypatch.setattr(onednn, '_state', {})
  monkeypatch.setenv('EFFICIENTNET_JAX_ONEDNN', '0')
  with caplog.at_level(logging.WARNING, logger='efficientnet_jax.models.onednn'):
    assert onednn.load() is None
    assert onednn.load() is None
  assert len(caplog.records) == 1 and 'EFFICIENTNET_JAX_ONEDNN=0' in caplog.text
  # Asked for anyway, the path says why it cannot run.
  with pytest.raises(onednn.OnednnUnavailable, match='EFFICIENTNET_JAX_ONEDNN=0'):
    onednn.pack(jnp.zeros((8, 16), jnp.float32))


def test_build_failure_says_why(monkeypatch, tmp_path):
  """A compiler that fails: OnednnUnavailable with its message, and nothing left in the cache."""
  try:
    onednn._onednn_prefix()
  except onednn.OnednnUnavailable as e:
    pytest.skip(str(e))
  fake = tmp_path / 'fake-cxx'
  fake.write_text('#!/bin/sh\necho "fake-cxx: cannot compile" >&2\nexit 1\n')
  fake.chmod(0o755)
  monkeypatch.setenv('CXX', str(fake))
  monkeypatch.setenv('EFFICIENTNET_JAX_CACHE', str(tmp_path / 'cache'))
  with pytest.raises(onednn.OnednnUnavailable, match='fake-cxx: cannot compile'):
    onednn.build()
  assert not list((tmp_path / 'cache').iterdir())


def test_real_lite0_on_this_path_keeps_float32_top1(lite0_dir, tmp_path):  # noqa: F811
  """CPU inference (oneDNN where it loads, else XLA) on the real Lite0 weights against XLA's
  float32 `apply`: float32 to 1e-4 of the largest logit; bfloat16 the same top-1 on skimage's 8
  photos, logits within BF16_LOGIT_TOLERANCE."""
  model, variables, metadata = pretrained.load(lite0_dir)
  images = predict.normalize(np.stack([predict.preprocess(p, metadata)
                                       for p in photos(tmp_path)]), metadata)
  want = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images))
  full = np.asarray(make_inference_fn(model)(variables, images))
  half = model.clone(dtype=jnp.bfloat16)
  got = np.asarray(make_inference_fn(half)(variables, images), np.float32)
  where = lambda m: 'oneDNN' if inference.uses_onednn(m) else 'XLA'
  error, full_error = _relative(got, want), _relative(full, want)
  print(f'real Lite0 against XLA float32: float32 ({where(model)}) max |difference| / max |logit| '
        f'= {full_error:.2e}; bfloat16 ({where(half)}) {error:.2e}, top-1 '
        f'{got.argmax(-1).tolist()}')
  assert 281 <= want[0].argmax() <= 285 and want[1].argmax() == 967  # a cat, an espresso
  assert full_error <= 1e-4
  np.testing.assert_array_equal(full.argmax(-1), want.argmax(-1))
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
  assert error <= BF16_LOGIT_TOLERANCE


def test_command_builds_and_says_where_bfloat16_runs(tmp_path):
  """`python -m efficientnet_jax.models.onednn`: exit 0 naming oneDNN where it loads, else 1
  saying why (here: forced off)."""
  command = [sys.executable, '-m', 'efficientnet_jax.models.onednn']
  off = subprocess.run(command, env={**subprocess_env(), 'EFFICIENTNET_JAX_ONEDNN': '0'},
                       capture_output=True, text=True, timeout=300)
  assert off.returncode == 1, off.stderr
  assert 'runs on XLA: the oneDNN extension is not available (EFFICIENTNET_JAX_ONEDNN=0)' in (
      off.stdout)
  _need_extension()
  on = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert on.returncode == 0, on.stdout + on.stderr
  assert on.stdout.startswith('oneDNN 3.') and 'extension loaded from' in on.stdout
