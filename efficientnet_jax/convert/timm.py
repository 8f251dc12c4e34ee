"""timm `tf_efficientnet_b0..b8` / `tf_efficientnet_lite0..4` state dicts -> our variables.

timm groups blocks by stage (`blocks.S.R`), and its first stage uses a DepthwiseSeparable block
(no expansion) whose layers are named differently from the InvertedResidual blocks after it:

    conv_stem, bn1                                  -> stem_conv, stem_bn
    blocks.S.R (DepthwiseSeparable, expand ratio 1):
      conv_dw, bn1, se.conv_reduce, se.conv_expand, conv_pw, bn2
                                                    -> dwconv, bn, se_reduce, se_expand,
                                                       project_conv, project_bn
    blocks.S.R (InvertedResidual):
      conv_pw, bn1, conv_dw, bn2, se.conv_reduce, se.conv_expand, conv_pwl, bn3
                                                    -> expand_conv, expand_bn, dwconv, bn,
                                                       se_reduce, se_expand, project_conv,
                                                       project_bn
    conv_head, bn2, classifier                      -> top_conv, top_bn, predictions

Only the `tf_` models match ours: they use TF 'SAME' padding (`Conv2dSame`) and BN eps 1e-3
(timm's plain `efficientnet_b0` pads symmetrically, a different network numerically). Layouts
are PyTorch's (see `efficientnet_jax.convert.torch`).

timm's own preprocessing metadata per weight tag: `tf_efficientnet_b*` `.aa_in1k`, `.ra_in1k`,
`.ns_jft_in1k` use the ImageNet mean/std; the AdvProp tags `.ap_in1k` use mean = std = 0.5 (inputs
in [-1, 1]); `tf_efficientnet_lite*` `.in1k` use mean = std = 0.5. A state dict does not carry its
tag, so `load_timm_checkpoint` records the ImageNet mean/std for B-models and 0.5/0.5 for Lite;
pass `pretrained_cfg` (e.g. `timm_model.pretrained_cfg`) or the CLI's --mean_rgb/--stddev_rgb for
other tags.
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
from efficientnet_jax.models import get_variant
from efficientnet_jax.models.naming import top_order
from efficientnet_jax.convert.torch import read_state_dict, state_dict_to_numpy

TOP_LAYERS = {'stem_conv': 'conv_stem', 'stem_bn': 'bn1', 'top_conv': 'conv_head',
              'top_bn': 'bn2', 'predictions': 'classifier'}
# Our block layer -> timm's, for blocks without (DepthwiseSeparable) and with expansion.
DS_LAYERS = {'dwconv': 'conv_dw', 'bn': 'bn1', 'se_reduce': 'se.conv_reduce',
             'se_expand': 'se.conv_expand', 'project_conv': 'conv_pw', 'project_bn': 'bn2'}
IR_LAYERS = {'expand_conv': 'conv_pw', 'expand_bn': 'bn1', 'dwconv': 'conv_dw', 'bn': 'bn2',
             'se_reduce': 'se.conv_reduce', 'se_expand': 'se.conv_expand',
             'project_conv': 'conv_pwl', 'project_bn': 'bn3'}
_OURS_TOP = {v: k for k, v in TOP_LAYERS.items()}
_OURS_IR = {v: k for k, v in IR_LAYERS.items()}
_BLOCK_RE = re.compile(r'^blocks\.(\d+)\.(\d+)\.([\w.]+)$')
# timm's pretrained_cfg mean/std (in [0, 1] units) for the default tags, see the module doc.
TIMM_LITE_MEAN_STD = (0.5, 0.5)


class TimmConversionError(ConversionError):
  """The timm checkpoint does not fit the requested efficientnet_jax variant."""


def _layer_name(module) -> str:
  if module.block is None:
    return TOP_LAYERS[module.layer]
  names = IR_LAYERS if module.block.has_expand else DS_LAYERS
  return f'blocks.{module.block.stage}.{module.block.repeat}.{names[module.layer]}'


def _position(layer: str, modules) -> tuple:
  match = _BLOCK_RE.match(layer)
  if match:
    # For sorting only: DepthwiseSeparable names read as InvertedResidual ones lands them in
    # the right block, which is what matters in an error listing.
    inner = match.group(3)
    return block_order(modules, stage=int(match.group(1)), repeat=int(match.group(2)),
                       our_layer=_OURS_IR.get(inner, inner))
  return top_order(_OURS_TOP.get(layer, layer))


TIMM_LAYOUT = SourceLayout(
    framework='timm', separator='.', layer_name=_layer_name,
    weight_names={'conv': TORCH_PARAM, 'depthwise': TORCH_PARAM, 'bn': TORCH_BN,
                  'dense': TORCH_PARAM},
    axes=TORCH_AXES, position=_position)


def infer_timm_model_name(tensors: Mapping[str, np.ndarray], source: str = 'the checkpoint'
                          ) -> str:
  """Our variant name from the structure of a timm tf_efficientnet state dict."""
  repeats: dict[int, int] = {}
  for name in tensors:
    match = _BLOCK_RE.match(name.rpartition('.')[0])
    if match:
      stage, repeat = int(match.group(1)), int(match.group(2))
      repeats[stage] = max(repeats.get(stage, 0), repeat + 1)
  per_stage = [repeats.get(s, 0) for s in range(max(repeats) + 1)] if repeats else []
  return infer_from_tensors(
      tensors, stem='conv_stem.weight', head='conv_head.weight', repeats=per_stage,
      se_marker='.se.conv_reduce.', source=source, error=TimmConversionError,
      not_this_format='a timm EfficientNet checkpoint (efficientnet_pytorch checkpoints use '
                      '_conv_stem: pass --source=torch).')


def convert_state_dict(state_dict: Mapping[str, Any], model_name: str | None = None,
                       num_classes: int | None = None, source: str = 'the timm state dict'
                       ) -> tuple[dict[str, Any], str]:
  """Converts a timm tf_efficientnet state dict (tensors or arrays) into our variables.

  Returns (variables, model_name); both the model name and the number of classes are inferred
  from the tensors when not given.
  """
  tensors = state_dict_to_numpy(state_dict, source)
  return convert_inferring_model(
      tensors, TIMM_LAYOUT, model_name=model_name, num_classes=num_classes,
      classifier='classifier.weight', infer=lambda: infer_timm_model_name(tensors, source),
      source=source, error=TimmConversionError)


def timm_preprocessing(model_name: str, pretrained_cfg: Mapping[str, Any] | None = None
                       ) -> dict[str, Any]:
  """`pretrained.save` preprocessing overrides for timm weights (see the module doc)."""
  spec = get_variant(model_name)
  if pretrained_cfg is None:
    if not spec.lite:
      return {}  # ImageNet mean/std: the variant default
    mean, std = TIMM_LITE_MEAN_STD
    return {'mean_rgb': [mean * 255] * 3, 'stddev_rgb': [std * 255] * 3,
            'notes': "timm's tf_efficientnet_lite .in1k config: mean = std = 0.5."}
  found: dict[str, Any] = {
      'mean_rgb': [float(v) * 255 for v in pretrained_cfg['mean']],
      'stddev_rgb': [float(v) * 255 for v in pretrained_cfg['std']],
  }
  if 'input_size' in pretrained_cfg:
    found['resolution'] = int(pretrained_cfg['input_size'][-1])
  if 'crop_pct' in pretrained_cfg:
    found['crop_fraction'] = float(pretrained_cfg['crop_pct'])
  if 'interpolation' in pretrained_cfg:
    found['interpolation'] = str(pretrained_cfg['interpolation'])
  tag = pretrained_cfg.get('tag')
  if tag:
    found['notes'] = f'timm pretrained_cfg of tag {tag!r}.'
  return found


def load_timm_checkpoint(path: str, model_name: str | None = None,
                         num_classes: int | None = None,
                         pretrained_cfg: Mapping[str, Any] | None = None) -> ConvertedCheckpoint:
  """Reads and converts a timm tf_efficientnet `.pth`/`.bin` state dict (weights only).

  `.safetensors` files are read with the safetensors package when it is installed.
  """
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file

    if not os.path.isfile(path):
      raise FileNotFoundError(f'No timm checkpoint at {path!r}.')
    tensors = load_file(path)
  else:
    tensors = read_state_dict(path)
  variables, model_name = convert_state_dict(tensors, model_name, num_classes, source=repr(path))
  return ConvertedCheckpoint(
      variables=variables, model_name=model_name,
      num_classes=int(variables['params']['predictions']['kernel'].shape[-1]),
      preprocessing=timm_preprocessing(model_name, pretrained_cfg),
      source={'format': 'timm', 'path': os.path.abspath(path)})
