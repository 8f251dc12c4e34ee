"""Transfer learning: start a training run from pretrained weights (paper section 5.3).

The paper fine-tunes ImageNet-trained EfficientNets on CIFAR, Flowers, Cars, Pets, Food-101 and
others. `config.init_from` names a pretrained directory (`python -m efficientnet_jax.convert ...
--output=DIR`, see `efficientnet_jax.pretrained`); `train_and_evaluate` calls
`init_from_pretrained` once, right after creating the fresh (sharded) state of a run that has no
checkpoint of its own. Every weight and BatchNorm statistic is loaded, except the classifier
(`predictions`) when the new task has a different number of classes: that one starts at zero. The
EMA starts from the loaded weights, and the optimizer state is rebuilt for
them.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from absl import logging

from efficientnet_jax import configs_lib, optim, pretrained
from efficientnet_jax.models import get_variant, naming


class InitFromError(ValueError):
  """`config.init_from` cannot initialise this config's model."""


def _coefficients(model_name: str, overrides: Mapping[str, Any]) -> tuple[float, float]:
  """(width, depth) of a pretrained model: its variant's, unless its overrides changed them."""
  spec = get_variant(model_name)
  width = overrides.get('width', overrides.get('width_coefficient', spec.width))
  depth = overrides.get('depth', overrides.get('depth_coefficient', spec.depth))
  return float(width), float(depth)


def architecture_mismatches(config: ml_collections.ConfigDict,
                            metadata: Mapping[str, Any]) -> list[str]:
  """How the pretrained model differs from the one `config` builds (model, width, depth)."""
  problems = []
  if metadata['model'] != config.model:
    problems.append(f'model: pretrained {metadata["model"]!r}, config.model {config.model!r}')
  try:
    width, depth = _coefficients(metadata['model'], metadata.get('model_overrides') or {})
  except ValueError:  # a model name this version does not know: already reported above
    return problems
  fields = configs_lib.model_fields(config)
  if not np.isclose(width, fields['width']):
    problems.append(f'width: pretrained {width:g}, config.width {fields["width"]:g}')
  if not np.isclose(depth, fields['depth']):
    problems.append(f'depth: pretrained {depth:g}, config.depth {fields["depth"]:g}')
  return problems


def _put(value: np.ndarray, like: jax.Array) -> jax.Array:
  """A host array placed with `like`'s sharding and dtype, on every process of the mesh."""
  value = np.asarray(value, dtype=like.dtype)
  return jax.make_array_from_callback(value.shape, like.sharding, lambda index: value[index])


def _merge(current: Any, loaded: Mapping[str, np.ndarray], prefix: str) -> Any:
  """`current` with every leaf found in `loaded` (by its 'a/b/c' name) replaced, same shardings."""
  def replace(path, leaf):
    name = '/'.join([prefix] + naming.key_names(path))
    return _put(loaded[name], leaf) if name in loaded else leaf
  return jax.tree_util.tree_map_with_path(replace, current)


def init_from_pretrained(state, config: ml_collections.ConfigDict, *, tx):
  """`state` (fresh from `create_train_state`) with the weights of `config.init_from` loaded.

  The loaded arrays take the shardings and dtypes of `state`'s own, so this works for any mesh
  and with FSDP. Raises `InitFromError` naming every difference when the directory is missing
  or not a pretrained directory, or holds another model, width or depth, or tensors of other
  shapes.
  """
  directory = config.init_from
  try:
    _, variables, metadata = pretrained.load(directory)
  except (OSError, ValueError) as e:
    raise InitFromError(f'config.init_from={directory!r} cannot be loaded: {e}') from e

  problems = architecture_mismatches(config, metadata)
  new_head = int(metadata['num_classes']) != int(config.num_classes)
  head = f'params/{optim.HEAD_MODULE}/'
  loaded = naming.flatten({'params': variables['params'],
                               'batch_stats': variables.get('batch_stats', {})})
  target = naming.flatten({'params': state.params, 'batch_stats': state.batch_stats})
  if not any(name.startswith(head) for name in target):
    problems.append(f'this model has no classifier named {optim.HEAD_MODULE!r} to re-initialise')
  if not problems:
    # A new classifier is re-initialised, so its shapes may differ.
    keep = lambda name: not (new_head and name.startswith(head))
    problems = naming.shape_problems(
        {name: tuple(np.shape(v)) for name, v in loaded.items() if keep(name)},
        {name: tuple(leaf.shape) for name, leaf in target.items() if keep(name)})
  if problems:
    raise InitFromError(
        f'config.init_from={directory!r} holds {metadata["model"]} ({metadata["num_classes"]} '
        f'classes), which does not match the model this config builds; {len(problems)} '
        f'difference(s):\n{naming.format_problems(problems)}\nFine-tuning changes only the classifier: set '
        '--config.model, --config.width and --config.depth to the pretrained model\'s (the '
        'finetune configs take the variant as their argument, e.g. '
        'configs/finetune_cifar10.py:lite0).')
  if new_head:
    loaded = {k: v for k, v in loaded.items() if not k.startswith(head)}
  count = len(loaded)
  if new_head:
    # The new classifier starts at zero (as big_vision's fine-tuning does), so the first
    # predictions are uniform (loss ln(num_classes)) and the first steps train the head against
    # fixed features instead of back-propagating a random head's noise into the backbone. The
    # ImageNet init (uniform +-1/sqrt(num_classes)) on Lite0's 1280 pretrained features gave an
    # initial loss of about 4.6 on the 10 digits instead of ln(10) = 2.3.
    loaded.update({name: np.zeros(leaf.shape, leaf.dtype) for name, leaf in target.items()
                   if name.startswith(head)})

  preprocessing = get_variant(config.model)
  for field in ('mean_rgb', 'stddev_rgb'):
    if not np.allclose(metadata[field], getattr(preprocessing, field)):
      logging.warning(
          'init_from: the pretrained weights expect %s=%s, but training normalises with %s=%s '
          '(the variant\'s); fine-tuning will have to adapt to the shift.', field,
          metadata[field], field, list(getattr(preprocessing, field)))

  params = _merge(state.params, loaded, 'params')
  batch_stats = _merge(state.batch_stats, loaded, 'batch_stats')
  replacements = {'params': params, 'batch_stats': batch_stats}
  if state.ema_params is not None:
    # Separate buffers from params (the train step donates the state, so none may be shared).
    replacements['ema_params'] = _merge(state.ema_params, loaded, 'params')
    replacements['ema_batch_stats'] = _merge(state.ema_batch_stats, loaded, 'batch_stats')
  # Our optimizers' initial states do not depend on the weights' values, but rebuilding keeps
  # that an implementation detail. Same shardings as the fresh state's.
  shardings = jax.tree.map(lambda x: x.sharding, state.opt_state)
  replacements['opt_state'] = jax.jit(tx.init, out_shardings=shardings)(params)
  logging.info(
      'Initialised from %s (%s, %d classes): %d tensors loaded%s.', directory, metadata['model'],
      metadata['num_classes'], count,
      f'; classifier re-initialised (zeros) for {config.num_classes} classes' if new_head else '')
  return state.replace(**replacements)
