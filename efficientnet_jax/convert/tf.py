"""Official TensorFlow EfficientNet checkpoints (tensorflow/tpu) -> our variables.

The checkpoints of `models/official/efficientnet` (B0-B8, L2, NoisyStudent, AdvProp, and the Lite
ones under `lite/`) name their variables by the TF1 layer scopes of `efficientnet_model.py`:

    {scope}/stem/conv2d/kernel, {scope}/stem/tpu_batch_normalization/{gamma,beta,moving_*}
    {scope}/blocks_K/...                        (K counts every block from 0)
    {scope}/head/conv2d, head/tpu_batch_normalization, head/dense/{kernel,bias}

where {scope} is the model name ('efficientnet-b0', 'efficientnet-lite0'). TF1 numbers the
layers of one kind inside a scope in the order they are first called, so inside a block

    with expansion:    conv2d = expand, conv2d_1 = project;
                       tpu_batch_normalization = expand_bn, _1 = bn (after the depthwise), _2 =
                       project_bn
    without (stage 1): conv2d = project; tpu_batch_normalization = bn, _1 = project_bn

and depthwise_conv2d/depthwise_kernel, se/conv2d (reduce) and se/conv2d_1 (expand). Code run
with use_tpu=False names the BN layers `batch_normalization` instead; both are accepted.
Layouts are Keras's: conv HWIO and dense (in, out) as ours, depthwise (kh, kw, C, 1) -> (kh, kw,
1, C).

Every variable also has an `.../ExponentialMovingAverage` shadow: the official evaluation (and
the published accuracy) uses those, so they are preferred (`use_ema=True`), falling back to the
raw variable where a shadow is absent. Optimizer slots (RMSProp, Momentum) and global_step are
ignored. Files are read with `tf.train.load_checkpoint`; TensorFlow is imported lazily.

No official checkpoint can be downloaded on our test machine, so the tests write a checkpoint with
the official names and shapes from known weights and check that it converts back exactly.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from efficientnet_jax.convert.mapping import (TF_AXES, TF_BN, TF_DEPTHWISE, TF_PARAM,
                                            ConversionError, ConvertedCheckpoint, SourceLayout,
                                            block_order, convert_tensors)
from efficientnet_jax.models import VARIANTS
from efficientnet_jax.models.naming import top_order

EMA_SUFFIX = 'ExponentialMovingAverage'
# Slots an optimizer adds beside each variable: state of training, not weights.
_OPTIMIZER_SLOTS = ('RMSProp', 'RMSProp_1', 'Momentum')
_BN_NAMES = ('tpu_batch_normalization', 'batch_normalization')
_SCOPE_RE = re.compile(r'^(efficientnet-(?:b\d|l2|lite\d))$')
_BLOCK_RE = re.compile(r'^blocks_(\d+)/(.+)$')


class TFConversionError(ConversionError):
  """The TF checkpoint does not fit the requested efficientnet_jax variant."""


def block_layer_names(has_expand: bool, bn: str = 'tpu_batch_normalization') -> dict[str, str]:
  """Our block layer -> the official layer name inside `blocks_K` (see the module doc)."""
  if has_expand:
    return {'expand_conv': 'conv2d', 'expand_bn': bn, 'dwconv': 'depthwise_conv2d',
            'bn': f'{bn}_1', 'se_reduce': 'se/conv2d', 'se_expand': 'se/conv2d_1',
            'project_conv': 'conv2d_1', 'project_bn': f'{bn}_2'}
  return {'dwconv': 'depthwise_conv2d', 'bn': bn, 'se_reduce': 'se/conv2d',
          'se_expand': 'se/conv2d_1', 'project_conv': 'conv2d', 'project_bn': f'{bn}_1'}


def top_layer_names(bn: str = 'tpu_batch_normalization') -> dict[str, str]:
  """Our stem/head layer -> the official layer name."""
  return {'stem_conv': 'stem/conv2d', 'stem_bn': f'stem/{bn}', 'top_conv': 'head/conv2d',
          'top_bn': f'head/{bn}', 'predictions': 'head/dense'}


def tf_layout(scope: str, bn: str = 'tpu_batch_normalization') -> SourceLayout:
  """The official naming under `scope` ('efficientnet-b0'), with BN layers called `bn`."""
  top = top_layer_names(bn)
  ours_top = {v: k for k, v in top.items()}
  ours_block = {v: k for k, v in block_layer_names(True, bn).items()}

  def layer_name(module) -> str:
    if module.block is None:
      return f'{scope}/{top[module.layer]}'
    names = block_layer_names(module.block.has_expand, bn)
    return f'{scope}/blocks_{module.block.index}/{names[module.layer]}'

  def position(layer: str, modules) -> tuple:
    inner = layer[len(scope) + 1:] if layer.startswith(scope + '/') else layer
    match = _BLOCK_RE.match(inner)
    if match:
      return block_order(modules, index=int(match.group(1)),
                         our_layer=ours_block.get(match.group(2), match.group(2)))
    return top_order(ours_top.get(inner, inner))

  return SourceLayout(
      framework='TF checkpoint', separator='/', layer_name=layer_name,
      weight_names={'conv': TF_PARAM, 'depthwise': TF_DEPTHWISE, 'bn': TF_BN,
                    'dense': TF_PARAM},
      axes=TF_AXES, position=position)


def read_tf_checkpoint(path: str) -> dict[str, np.ndarray]:
  """Every variable of a TF checkpoint (prefix or directory) as {name: numpy array}."""
  import glob

  import tensorflow as tf

  if os.path.isdir(path) and not os.path.exists(os.path.join(path, 'checkpoint')):
    # A directory without TF's 'checkpoint' state file (e.g. copied by hand): use its only
    # checkpoint, if it holds exactly one.
    indexes = glob.glob(os.path.join(path, '*.index'))
    if len(indexes) == 1:
      path = indexes[0][:-len('.index')]
  try:
    reader = tf.train.load_checkpoint(path)
  except Exception as err:  # tf raises NotFoundError/DataLossError/ValueError here
    raise TFConversionError(
        f'Cannot read a TF checkpoint at {path!r} ({type(err).__name__}: {err}). Pass the '
        "checkpoint prefix (e.g. 'efficientnet-b0/model.ckpt', the part before "
        "'.index'/'.data-*') or its directory.") from err
  return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def checkpoint_scopes(variables: Mapping[str, Any]) -> list[str]:
  """The official model scopes ('efficientnet-b0', ...) that a checkpoint's variables sit under."""
  return sorted({name.split('/')[0] for name in variables
                 if '/' in name and _SCOPE_RE.match(name.split('/')[0])})


def select_weights(variables: Mapping[str, np.ndarray], scope: str | None = None,
                   use_ema: bool = True) -> tuple[dict[str, np.ndarray], str, int]:
  """The model weights of a checkpoint under one scope, EMA shadows preferred.

  Returns ({name without the EMA suffix: float32 array}, scope, how many came from EMA).
  """
  scopes = checkpoint_scopes(variables)
  if scope is None:
    if len(scopes) != 1:
      raise TFConversionError(
          f'Cannot tell which model the checkpoint holds: expected variables under exactly one '
          f"scope like 'efficientnet-b0/', found {scopes or 'none'}. Pass --model= (the scope "
          'is the model name).')
    scope = scopes[0]
  prefix = scope + '/'
  raw, ema = {}, {}
  for name, value in variables.items():
    if not name.startswith(prefix):
      continue  # global_step and other bookkeeping
    head, _, last = name.rpartition('/')
    if last == EMA_SUFFIX:
      ema[head] = value
    elif last in _OPTIMIZER_SLOTS:
      continue
    else:
      raw[name] = value
  if not raw and not ema:
    raise TFConversionError(
        f"The checkpoint has no variables under '{prefix}' (scopes found: {scopes or 'none'}). "
        'Check --model: the official checkpoints name their scope after the model.')
  chosen = {}
  from_ema = 0
  for name in sorted(set(raw) | set(ema)):
    if use_ema and name in ema:
      chosen[name] = np.asarray(ema[name], np.float32)
      from_ema += 1
    elif name in raw:
      chosen[name] = np.asarray(raw[name], np.float32)
  return chosen, scope, from_ema


def convert_tf_variables(variables: Mapping[str, np.ndarray], model_name: str | None = None,
                         num_classes: int | None = None, use_ema: bool = True,
                         source: str = 'the TF checkpoint') -> tuple[dict[str, Any], str, int]:
  """Converts {variable name: array} of an official checkpoint into our variables.

  Returns (variables, model_name, number of tensors taken from EMA shadows).
  """
  scopes = checkpoint_scopes(variables)
  # The scope is the model's name; a checkpoint under another single scope is still converted
  # (and then fails listing the mismatched tensors unless the architectures agree).
  scope = model_name if model_name in scopes or len(scopes) != 1 else scopes[0]
  tensors, scope, from_ema = select_weights(variables, scope, use_ema)
  hint = (f'The checkpoint\'s scope is {scope!r}. ' if model_name and scope != model_name
          else '')
  if model_name is None:
    if scope not in VARIANTS:
      raise TFConversionError(f'The checkpoint scope {scope!r} is no variant we know; pass '
                              '--model=.')
    model_name = scope
  bn = next((b for b in _BN_NAMES if f'{scope}/stem/{b}/gamma' in tensors), _BN_NAMES[0])
  if num_classes is None:
    kernel = tensors.get(f'{scope}/head/dense/kernel')
    num_classes = int(kernel.shape[-1]) if kernel is not None else 1000
  converted = convert_tensors(tensors, tf_layout(scope, bn), model_name, num_classes,
                              source=source, hint=hint, error=TFConversionError)
  return converted, model_name, from_ema


def load_tf_checkpoint(path: str, model_name: str | None = None, num_classes: int | None = None,
                       use_ema: bool = True) -> ConvertedCheckpoint:
  """Reads and converts an official tensorflow/tpu EfficientNet checkpoint.

  The official B-models take the ImageNet mean/std and Lite models (x - 127) / 128 (the variant
  defaults); AdvProp checkpoints take inputs in [-1, 1] - pass the CLI's --mean_rgb/--stddev_rgb
  for those, as their variables carry no trace of it.
  """
  variables, model_name, from_ema = convert_tf_variables(
      read_tf_checkpoint(path), model_name, num_classes, use_ema, source=repr(path))
  return ConvertedCheckpoint(
      variables=variables, model_name=model_name,
      num_classes=int(variables['params']['predictions']['kernel'].shape[-1]),
      preprocessing={},
      source={'format': 'tf', 'path': os.path.abspath(path), 'use_ema': use_ema,
              'tensors_from_ema': from_ema})
