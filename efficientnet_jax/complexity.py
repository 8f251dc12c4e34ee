"""Model complexity without running the model: trainable parameters and multiply-adds.

Works for any Flax Linen module (EfficientNet here; ResNet and MobileNet use it too):

    from efficientnet_jax.complexity import count_madds, count_params, model_complexity
    model_complexity('efficientnet-b0')        # {'params': 5288548, 'madds': ..., 'resolution': 224}
    count_madds(model, (1, 224, 224, 3))       # multiply-adds per image

Nothing is computed on a device. The variables come from `jax.eval_shape(model.init, ...)` (shapes
only), and `jax.make_jaxpr(model.apply)` traces the forward pass on those abstract values; the count
is read off the jaxpr. Tracing costs a fraction of a second even for B7 at 600 px or L2 at 800 px.

Convention (the paper's, Tan & Le 2019, Table 2 "FLOPS"): one multiply-add (MAC) per multiply of
a convolution or a matrix product, per image. Counted:

  * `conv_general_dilated`: output elements x kernel height x kernel width x input channels per
    group (so a depthwise k x k conv costs k*k per output element). This covers the stem, every
    expand / depthwise / project conv, the squeeze-and-excitation 1x1 convs and the head conv.
  * `dot_general`: output elements x contracted size. This covers the classifier (`nn.Dense`) and
    any conv written as a matrix product.

Not counted: elementwise work (activations, BatchNorm, the SE gate's multiply, residual adds,
pooling, bias adds). XLA's own cost analysis counts those too and reports FLOPs (2 per MAC), which
is why it gives about twice the paper's figures and more.

Models with a `conv_impl` field (EfficientNet's 'xla' | 'cpu' | 'auto') are traced as
`conv_impl='xla'`: the CPU fast path writes depthwise convs as sums of shifted, scaled copies
(elementwise multiplies), which this counter would not see. Cloning makes the count independent
of the backend and of the implementation choice. For a module without such a field, convs written
elementwise are not counted.

Control flow: `scan` bodies count `length` times; of the `cond` branches, the most expensive one
counts; `while` loops (trip count unknown at trace time) count one iteration of the condition and
body; `shard_map` bodies count once per instance (the product of the newly manual mesh axes); any
other primitive holding sub-jaxprs (jit/pjit, remat, custom_jvp/custom_vjp calls, closed_call, ...)
counts each of them once.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ['abstract_variables', 'count_madds', 'count_params', 'jaxpr_madds',
           'model_complexity']


# ---------------------------------------------------------------------------------------------
# Parameters.


def _leaf_size(leaf) -> int:
  shape = getattr(leaf, 'shape', None)
  if shape is None:  # a Python scalar
    return int(np.size(leaf))
  return math.prod(int(d) for d in shape)


def count_params(variables_or_shapes: Any) -> int:
  """Number of trainable parameters: the elements of the 'params' collection.

  Accepts the variables of `model.init` (or of `jax.eval_shape(model.init, ...)`, i.e. a tree of
  `ShapeDtypeStruct`s); other collections such as 'batch_stats' are not trainable and not counted.
  A tree without a top-level 'params' key is taken to be the params tree itself.
  """
  tree = variables_or_shapes
  if isinstance(tree, Mapping) and 'params' in tree:
    tree = tree['params']
  return sum(_leaf_size(leaf) for leaf in jax.tree_util.tree_leaves(tree))


# ---------------------------------------------------------------------------------------------
# Multiply-adds of a jaxpr.


def _as_jaxpr(value):
  """The open Jaxpr inside a Jaxpr or ClosedJaxpr, else None (duck-typed across JAX versions)."""
  if hasattr(value, 'eqns'):
    return value
  inner = getattr(value, 'jaxpr', None)
  if inner is not None and hasattr(inner, 'eqns') and hasattr(value, 'consts'):
    return inner
  return None


def _sub_jaxprs(params) -> list:
  found = []
  for value in params.values():
    for v in (value if isinstance(value, (tuple, list)) else (value,)):
      jaxpr = _as_jaxpr(v)
      if jaxpr is not None:
        found.append(jaxpr)
  return found


def _conv_madds(eqn) -> int:
  rhs = eqn.invars[1].aval
  out = eqn.outvars[0].aval
  rhs_spec = eqn.params['dimension_numbers'].rhs_spec  # (out feature, in feature, *spatial)
  # The kernel's input-feature dimension is already the per-group count (cin / feature_groups).
  window = math.prod(int(rhs.shape[d]) for d in rhs_spec[1:])
  return math.prod(int(d) for d in out.shape) * window


def _dot_madds(eqn) -> int:
  lhs = eqn.invars[0].aval
  out = eqn.outvars[0].aval
  (lhs_contract, _), _ = eqn.params['dimension_numbers']
  contracted = math.prod(int(lhs.shape[d]) for d in lhs_contract)
  return math.prod(int(d) for d in out.shape) * contracted


def _shard_map_instances(params) -> int:
  mesh = params.get('mesh')
  if mesh is None:
    return 1
  sizes = dict(mesh.shape)
  axes = params.get('newly_manual_axes', params.get('manual_axes', tuple(sizes)))
  return math.prod(int(sizes[a]) for a in axes if a in sizes)


def jaxpr_madds(jaxpr) -> int:
  """Multiply-adds of one evaluation of a (closed) jaxpr, over its whole batch.

  See the module docstring for what counts and how control flow is handled.
  """
  jaxpr = _as_jaxpr(jaxpr)
  if jaxpr is None:
    raise TypeError(f'Expected a Jaxpr or ClosedJaxpr, got {type(jaxpr).__name__}.')
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    params = eqn.params
    if name == 'conv_general_dilated':
      total += _conv_madds(eqn)
    elif name == 'dot_general':
      total += _dot_madds(eqn)
    elif name == 'scan':
      total += int(params['length']) * jaxpr_madds(params['jaxpr'])
    elif name == 'cond':
      total += max((jaxpr_madds(b) for b in params['branches']), default=0)
    elif name == 'while':
      total += jaxpr_madds(params['cond_jaxpr']) + jaxpr_madds(params['body_jaxpr'])
    elif name == 'shard_map':
      total += _shard_map_instances(params) * jaxpr_madds(params['jaxpr'])
    elif name == 'xla_pmap':
      total += int(params.get('axis_size', 1)) * jaxpr_madds(params['call_jaxpr'])
    else:  # jit/pjit, remat, custom_jvp_call, custom_vjp_call, closed_call, ...
      total += sum(jaxpr_madds(sub) for sub in _sub_jaxprs(params))
  return total


# ---------------------------------------------------------------------------------------------
# Flax modules.

# Keyword arguments of `Module.apply` that `Module.init` does not take, or that tracing sets.
_APPLY_ONLY_KWARGS = ('mutable', 'rngs', 'capture_intermediates')


def _input_spec(input_shape, input_dtype) -> jax.ShapeDtypeStruct:
  if isinstance(input_shape, int):
    input_shape = (1, input_shape, input_shape, 3)
  shape = tuple(int(d) for d in input_shape)
  if not shape or shape[0] < 1:
    raise ValueError(f'input_shape must start with a batch size >= 1; got {input_shape!r}.')
  return jax.ShapeDtypeStruct(shape, input_dtype)


def _for_counting(model):
  """The model with XLA convolutions, where the module has a `conv_impl` field."""
  fields = getattr(type(model), '__dataclass_fields__', {})
  if 'conv_impl' in fields and getattr(model, 'conv_impl', None) != 'xla':
    return model.clone(conv_impl='xla')
  return model


def _rngs():
  key = jax.random.key(0)
  return {'params': key, 'dropout': key}


def abstract_variables(model, input_shape=(1, 224, 224, 3), *, input_dtype=jnp.float32,
                       **init_kwargs):
  """The variables of `model.init` as a tree of `ShapeDtypeStruct`s; nothing is computed."""
  spec = _input_spec(input_shape, input_dtype)
  init_kwargs = {k: v for k, v in init_kwargs.items() if k not in _APPLY_ONLY_KWARGS}
  return jax.eval_shape(lambda x: model.init(_rngs(), x, **init_kwargs), spec)


def _trace(model, spec, variables, apply_kwargs):
  apply_kwargs = dict(apply_kwargs)
  # Training-mode calls update BatchNorm statistics and draw dropout masks: allow both, they
  # add no multiply-adds.
  apply_kwargs.setdefault('mutable', True)

  def forward(v, x):
    kwargs = dict(apply_kwargs)
    kwargs.setdefault('rngs', _rngs())
    return model.apply(v, x, **kwargs)

  return jax.make_jaxpr(forward)(variables, spec)


def _abstract(leaf):
  if not hasattr(leaf, 'shape') or not hasattr(leaf, 'dtype'):
    leaf = np.asarray(leaf)
  return jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype)


def _madds_and_variables(model, input_shape, input_dtype, variables, apply_kwargs):
  model = _for_counting(model)
  spec = _input_spec(input_shape, input_dtype)
  if variables is None:
    variables = abstract_variables(model, spec.shape, input_dtype=input_dtype, **apply_kwargs)
  variables = jax.tree_util.tree_map(_abstract, variables)
  total = jaxpr_madds(_trace(model, spec, variables, apply_kwargs))
  batch = spec.shape[0]
  if total % batch:
    raise ValueError(
        f'{total} multiply-adds over a batch of {batch} do not split evenly per image; the model '
        'mixes examples. Count with a batch of 1.')
  return total // batch, variables


def count_madds(model, input_shape=(1, 224, 224, 3), *, input_dtype=jnp.float32, variables=None,
                **apply_kwargs) -> int:
  """Exact multiply-adds per example of `model.apply(variables, x, **apply_kwargs)`.

  Args:
    model: any Flax Linen module. One with a `conv_impl` field is counted as `conv_impl='xla'`.
    input_shape: the input's shape, batch first, e.g. (1, 224, 224, 3); an int r means
      (1, r, r, 3). The total is divided by the batch size.
    input_dtype: the input's dtype.
    variables: the model's variables (arrays or `ShapeDtypeStruct`s); by default they come from
      `jax.eval_shape(model.init, ...)`, so nothing is allocated.
    **apply_kwargs: passed to `model.apply` (and, less `mutable`/`rngs`, to `model.init`), e.g.
      `train=True` or `method=...`.

  Returns:
    Multiply-adds of the convolutions and matrix products (see the module docstring).
  """
  madds, _ = _madds_and_variables(model, input_shape, input_dtype, variables, apply_kwargs)
  return madds


def model_complexity(name_or_model, resolution: int | None = None, **create_kwargs) -> dict:
  """Trainable parameters and per-image multiply-adds of a named variant or a module.

  Args:
    name_or_model: a model name such as 'efficientnet-b0' or 'resnet-50' (see
      `models.ALL_VARIANTS`), or a Flax module taking NHWC RGB images.
    resolution: the square input size in pixels. Defaults to the variant's native resolution;
      required for a module.
    **create_kwargs: for a name, passed to `models.create_model` (e.g. `num_classes=10`).

  Returns:
    {'params': int, 'madds': int, 'resolution': int}
  """
  if isinstance(name_or_model, str):
    from efficientnet_jax.models import get_variant
    spec = get_variant(name_or_model)
    resolution = spec.resolution if resolution is None else int(resolution)
    create_kwargs = {'num_classes': 1000, **create_kwargs}  # one cache entry for the default
    try:
      key = (name_or_model, resolution, tuple(sorted(create_kwargs.items())))
      hash(key)
    except TypeError:  # an unhashable option: no caching
      return dict(_named_complexity.__wrapped__(name_or_model, resolution, create_kwargs))
    return dict(_named_complexity(*key))
  else:
    if create_kwargs:
      raise TypeError('Options such as num_classes apply only to a variant name, not a module.')
    if resolution is None:
      raise ValueError('model_complexity needs a resolution for a module (no native one known).')
    model = name_or_model
  return _module_complexity(model, int(resolution))


def _module_complexity(model, resolution: int) -> dict:
  madds, variables = _madds_and_variables(
      model, (1, resolution, resolution, 3), jnp.float32, None, {})
  return {'params': count_params(variables), 'madds': madds, 'resolution': resolution}


@functools.lru_cache(maxsize=None)
def _named_complexity(name: str, resolution: int, create_kwargs) -> dict:
  """Counts for a named variant; cached, since a name and options fix the architecture."""
  from efficientnet_jax.models import create_model
  return _module_complexity(create_model(name, **dict(create_kwargs)), resolution)
