"""Inference-only EfficientNet with BatchNorm folded into the convolutions (CPU fast path).

At inference BatchNorm is a fixed per-channel affine map, y = x * inv + (beta - mean * inv) with
inv = gamma / sqrt(var + eps), so it folds into the preceding convolution: the kernel's output
channels are scaled by `inv` (for a depthwise kernel, each of its k*k taps) and the shift becomes a
bias. `fold_batch_norm` does that once, as a pure (differentiable) transformation of the
variables, and `folded_steps` runs the network on the folded parameters as plain JAX functions,
one step per stem / block / head.

It exists for `make_inference_fn`'s CPU path, which chunks the step list by resolution (see
docs/performance.md for what was measured).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from efficientnet_jax.models import layers
from efficientnet_jax.models.efficientnet import EfficientNet, MBConvOps, mbconv
from efficientnet_jax.models.naming import block_name


def _fold(kernel: jax.Array, bn_params: dict, bn_stats: dict, eps: float):
  """(kernel * inv over the output channels, bias) for a conv followed by inference BN."""
  inv = bn_params['scale'] * lax.rsqrt(bn_stats['var'] + eps)
  return {'kernel': kernel * inv, 'bias': bn_params['bias'] - bn_stats['mean'] * inv}


def supports_blocks(blocks) -> bool:
  """Whether every block is an MBConv with an identity skip or none (no regular conv, no
  pooling skip), the blocks this path implements."""
  return all(b.conv_type == 'depthwise' and b.skip in ('identity', 'none') for b in blocks)


def fold_batch_norm(model: EfficientNet, variables: Any) -> dict:
  """Returns the folded parameters of `model` (an EfficientNet) for `folded_forward`.

  Every conv + BN pair becomes {'kernel', 'bias'}; the SE convs and the classifier are copied.
  The result is a plain nested dict keyed like the Flax variables ('stem_conv', 'block2a'/
  'expand_conv', ...), differentiable with respect to `variables`.
  """
  if not isinstance(model, EfficientNet):
    raise TypeError(f'fold_batch_norm supports EfficientNet modules, not {type(model).__name__}.')
  if not supports_blocks(model.blocks):
    raise ValueError('fold_batch_norm supports MBConv blocks with an identity skip or none; this '
                     'network has a regular conv or a pooling skip. Run it unfolded '
                     '(make_inference_fn(..., fold_bn=False)).')
  params, stats, eps = variables['params'], variables['batch_stats'], model.bn_epsilon
  folded = {'stem_conv': _fold(params['stem_conv']['kernel'], params['stem_bn'],
                               stats['stem_bn'], eps),
            'top_conv': _fold(params['top_conv']['kernel'], params['top_bn'], stats['top_bn'],
                              eps),
            'predictions': dict(params['predictions'])}
  for stage, (repeats, _) in enumerate(model.stage_plan()):
    for i in range(repeats):
      name = block_name(stage + 1, i)
      p, s = params[name], stats[name]
      block = {'dwconv': _fold(p['dwconv']['kernel'], p['bn'], s['bn'], eps),
               'project_conv': _fold(p['project_conv']['kernel'], p['project_bn'],
                                     s['project_bn'], eps)}
      if 'expand_conv' in p:
        block['expand_conv'] = _fold(p['expand_conv']['kernel'], p['expand_bn'],
                                     s['expand_bn'], eps)
      for se in ('se_reduce', 'se_expand'):
        if se in p:
          block[se] = dict(p[se])
      folded[name] = block
  return folded


def _conv(x, p, stride=1):
  return layers.conv_matmul(x, p['kernel'], stride) + p['bias']


def _mbconv(x, p, stride: int, act, skip: str):
  """One MBConv block (`efficientnet.mbconv`) on folded parameters: convs with a bias."""
  kernel, expanded = p['dwconv']['kernel'], 'expand_conv' in p

  def depthwise(x):
    xp = layers.pad_for_depthwise(x, kernel.shape[0], stride)
    if expanded:
      # The expand conv's activation and this zero border in one pass, written once: left to
      # itself XLA:CPU computes the activation in one pass and the padding in another (see
      # docs/performance.md). An unexpanded input is already in memory, and its padding fuses
      # into the taps' loop.
      xp = lax.optimization_barrier(xp)
    return layers.depthwise_taps(xp, kernel, stride) + p['dwconv']['bias']

  conv = lambda name: (lambda x: _conv(x, p[name])) if name in p else None
  ops = MBConvOps(expand=conv('expand_conv'), depthwise=depthwise, se_reduce=conv('se_reduce'),
                  se_expand=conv('se_expand'), project=conv('project_conv'))
  return mbconv(x, ops, stride=stride, act=act, skip=skip)


Step = tuple[str, int, Callable[[dict, jax.Array], jax.Array]]


def steps_of(model: EfficientNet, stem: Callable, block: Callable, head: Callable) -> list[Step]:
  """(name, stride, fn(folded, x) -> x) for the stem, each block and the head of `model`.

  `block(params, x, args, stride)` runs one block from its own parameters (`folded[name]`) and
  its stage's `BlockArgs`. `stride` is the step's spatial downsampling, so callers can tell
  each step's resolution.
  """
  steps = [('stem', model.stem_stride, stem)]
  for stage, (repeats, args) in enumerate(model.stage_plan()):
    for i in range(repeats):
      name = block_name(stage + 1, i)
      stride = args.stride if i == 0 else 1
      steps.append((name, stride, lambda f, x, name=name, s=stride, a=args:
                    block(f[name], x, a, s)))
  steps.append(('head', 1, head))
  return steps


def run_steps(steps: list[Step], folded: dict, images: jax.Array) -> jax.Array:
  x = images
  for _, _, step in steps:
    x = step(folded, x)
  return x


def folded_steps(model: EfficientNet) -> list[Step]:
  """The network as a list of (name, stride, fn(folded, x) -> x): stem, each block, head."""
  act = layers.activation_fn(model.activation)

  def head(f, x):
    x = jnp.mean(act(_conv(x, f['top_conv'])), axis=(1, 2))
    return x @ f['predictions']['kernel'] + f['predictions']['bias']
  return steps_of(model, lambda f, x: act(_conv(x, f['stem_conv'], model.stem_stride)),
                  lambda p, x, args, stride: _mbconv(x, p, stride, act, args.skip), head)


def folded_forward(model: EfficientNet, folded: dict, images: jax.Array) -> jax.Array:
  """Inference logits of `model` from `fold_batch_norm`'s parameters (train=False semantics)."""
  return run_steps(folded_steps(model), folded, images)
