"""Every named model as data: the B0 block table and one row of coefficients per variant.

Nothing here builds a network. `efficientnet.EfficientNet` reads these tables, and
`scaling.round_filters` / `scaling.round_repeats` turn B0's table into any larger variant's.
The other ConvNets of the paper (ResNet, MobileNetV1/V2) have one row each in `CONVNET_VARIANTS`;
their stage tables live beside their modules (`resnet.py`, `mobilenet.py`).
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import re

from efficientnet_jax import errors


class UnknownModelError(errors.UserError, ValueError):
  """A model name that no registry entry has."""


# How a block convolves (MnasNet's ConvOp; `expand_ratio` tells MBConv3/6 from the depthwise conv):
# 'depthwise' is MBConv, a 1x1 expand (skipped at expand ratio 1) and a kxk depthwise conv;
# 'regular' puts one kxk conv in their place (EfficientNetV2's fused MBConv, conv_type 1).
CONV_TYPES = ('depthwise', 'regular')
# MnasNet's SkipOp: 'identity' adds the input where the shapes allow (stride 1, in = out);
# 'pool' adds it on every block, average-pooled by the stride and projected by a 1x1 conv where
# the width changes; 'none' never adds it (the official strings' `noskip`).
SKIPS = ('identity', 'pool', 'none')
# The block-string token of each non-default conv type and skip.
_CONV_TYPE_TOKENS = {'depthwise': 'c0', 'regular': 'c1'}
_SKIP_TOKENS = {'identity': '', 'pool': 'poolskip', 'none': 'noskip'}


@dataclasses.dataclass(frozen=True)
class BlockArgs:
  """One stage of blocks, in baseline (B0) channels and repeats."""
  repeats: int
  kernel_size: int
  stride: int
  expand_ratio: int
  in_filters: int
  out_filters: int
  se_ratio: float  # 0 disables squeeze-and-excitation.
  conv_type: str = 'depthwise'  # one of CONV_TYPES
  skip: str = 'identity'  # one of SKIPS

  def __post_init__(self):
    if self.conv_type not in CONV_TYPES:
      raise ValueError(f'Unknown conv_type {self.conv_type!r}; valid values: '
                       f'{", ".join(CONV_TYPES)}.')
    if self.skip not in SKIPS:
      raise ValueError(f'Unknown skip {self.skip!r}; valid values: {", ".join(SKIPS)}.')

  def encode(self) -> str:
    """The official block-string form, e.g. 'r1_k3_s11_e1_i32_o16_se0.25'.

    A regular conv adds `_c1` before the SE ratio, a skip other than the identity `_noskip` or
    `_poolskip` at the end; the defaults add nothing, so every MBConv table keeps its strings.
    """
    text = (f'r{self.repeats}_k{self.kernel_size}_s{self.stride}{self.stride}_e{self.expand_ratio}'
            f'_i{self.in_filters}_o{self.out_filters}')
    if self.conv_type != 'depthwise':
      text += f'_{_CONV_TYPE_TOKENS[self.conv_type]}'
    text += f'_se{self.se_ratio:g}'
    if _SKIP_TOKENS[self.skip]:
      text += f'_{_SKIP_TOKENS[self.skip]}'
    return text


_BLOCK_RE = re.compile(
    r'^r(?P<r>\d+)_k(?P<k>\d+)_s(?P<s>\d)(?P<s2>\d)_e(?P<e>\d+)_i(?P<i>\d+)_o(?P<o>\d+)'
    r'(?:_c(?P<c>[01]))?(?:_se(?P<se>\d+(?:\.\d+)?))?(?:_(?P<skip>noskip|poolskip))?$')


def decode_block_string(block_string: str) -> BlockArgs:
  """Parses an official block string such as 'r2_k3_s22_e6_i16_o24_se0.25'."""
  match = _BLOCK_RE.match(block_string)
  if not match or match['s'] != match['s2']:
    raise ValueError(
        f'Cannot parse block string {block_string!r}. Expected the official form '
        "'r<repeats>_k<kernel>_s<stride><stride>_e<expand>_i<in>_o<out>[_c1][_se<ratio>]"
        "[_noskip|_poolskip]', for example 'r2_k3_s22_e6_i16_o24_se0.25' (square strides only).")
  conv_type = {token: name for name, token in _CONV_TYPE_TOKENS.items()}[f'c{match["c"] or 0}']
  skip = {token: name for name, token in _SKIP_TOKENS.items()}[match['skip'] or '']
  return BlockArgs(
      repeats=int(match['r']), kernel_size=int(match['k']), stride=int(match['s']),
      expand_ratio=int(match['e']), in_filters=int(match['i']), out_filters=int(match['o']),
      se_ratio=float(match['se'] or 0.0), conv_type=conv_type, skip=skip)


def decode_blocks(blocks) -> tuple[BlockArgs, ...]:
  """A block table from block strings or `BlockArgs` (mixed is fine), as a tuple."""
  if isinstance(blocks, (str, BlockArgs)):
    raise TypeError('Expected a sequence of blocks (block strings or BlockArgs), not one block; '
                    f'got {blocks!r}. Wrap it in a tuple.')
  return tuple(b if isinstance(b, BlockArgs) else decode_block_string(b) for b in blocks)


def block_table_digest(blocks) -> str:
  """Eight hex digits naming a block table, for directory names (same table, same digest)."""
  text = ' '.join(b.encode() for b in decode_blocks(blocks))
  return hashlib.sha256(text.encode()).hexdigest()[:8]


# EfficientNet-B0, found by the paper's architecture search (Table 1).
B0_BLOCK_STRINGS = (
    'r1_k3_s11_e1_i32_o16_se0.25',
    'r2_k3_s22_e6_i16_o24_se0.25',
    'r2_k5_s22_e6_i24_o40_se0.25',
    'r3_k3_s22_e6_i40_o80_se0.25',
    'r3_k5_s11_e6_i80_o112_se0.25',
    'r4_k5_s22_e6_i112_o192_se0.25',
    'r1_k3_s11_e6_i192_o320_se0.25',
)
B0_BLOCKS = tuple(decode_block_string(s) for s in B0_BLOCK_STRINGS)
# EfficientNet-Lite removes squeeze-and-excitation, which quantises and runs poorly on mobile
# accelerators.
LITE_BLOCKS = tuple(dataclasses.replace(b, se_ratio=0.0) for b in B0_BLOCKS)

STEM_FILTERS = 32
HEAD_FILTERS = 1280

# Input normalisation, in [0, 255] pixel units.
IMAGENET_MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
LITE_MEAN_RGB = (127.0, 127.0, 127.0)
LITE_STDDEV_RGB = (128.0, 128.0, 128.0)
# Inception-style [-1, 1] scaling, as the TF-slim and Keras MobileNets expect.
INCEPTION_MEAN_RGB = (127.5, 127.5, 127.5)
INCEPTION_STDDEV_RGB = (127.5, 127.5, 127.5)


@dataclasses.dataclass(frozen=True)
class VariantSpec:
  """Everything that distinguishes one named variant: coefficients plus preprocessing metadata.

  The preprocessing fields travel with the weights so that pipelines and converters never guess
  (a wrong mean/std or crop costs 5-20 points of top-1).
  """
  name: str
  width: float
  depth: float
  resolution: int
  dropout: float
  lite: bool = False
  family: str = 'efficientnet'  # a key of models.FAMILIES: which module builds it
  crop_padding: int = 32
  interpolation: str = 'bicubic'
  mean_rgb: tuple[float, float, float] = IMAGENET_MEAN_RGB
  stddev_rgb: tuple[float, float, float] = IMAGENET_STDDEV_RGB
  # Published figures, for tests and the summary table (None where none is published).
  published_params: int | None = None
  paper_madds: float | None = None  # multiply-adds, the paper's Table 2 (Table 3: MobileNets)
  paper_top1: float | None = None

  @property
  def blocks(self) -> tuple[BlockArgs, ...]:
    """EfficientNet's block table (other families keep theirs beside their module)."""
    self._check_efficientnet('blocks')
    return LITE_BLOCKS if self.lite else B0_BLOCKS

  @property
  def activation(self) -> str:
    self._check_efficientnet('activation')
    return 'relu6' if self.lite else 'swish'

  def _check_efficientnet(self, what: str) -> None:
    if self.family != 'efficientnet':
      raise ValueError(
          f'{self.name} is a {self.family} model: `{what}` describes EfficientNet only. Build it '
          'with efficientnet_jax.models.create_model(name).')

  @property
  def crop_fraction(self) -> float:
    return self.resolution / (self.resolution + self.crop_padding)


def _b(n, w, d, r, p, params=None, madds=None, top1=None):
  return VariantSpec(f'efficientnet-{n}', w, d, r, p, published_params=params, paper_madds=madds,
                     paper_top1=top1)


def _lite(n, w, d, r, p, top1):
  return VariantSpec(f'efficientnet-lite{n}', w, d, r, p, lite=True, paper_top1=top1,
                     mean_rgb=LITE_MEAN_RGB, stddev_rgb=LITE_STDDEV_RGB)


VARIANTS: dict[str, VariantSpec] = {v.name: v for v in (
    _b('b0', 1.0, 1.0, 224, 0.2, 5_288_548, 0.39e9, 77.1),
    _b('b1', 1.0, 1.1, 240, 0.2, 7_794_184, 0.70e9, 79.1),
    _b('b2', 1.1, 1.2, 260, 0.3, 9_109_994, 1.0e9, 80.1),
    _b('b3', 1.2, 1.4, 300, 0.3, 12_233_232, 1.8e9, 81.6),
    _b('b4', 1.4, 1.8, 380, 0.4, 19_341_616, 4.2e9, 82.9),
    _b('b5', 1.6, 2.2, 456, 0.4, 30_389_784, 9.9e9, 83.6),
    _b('b6', 1.8, 2.6, 528, 0.5, 43_040_704, 19e9, 84.0),
    _b('b7', 2.0, 3.1, 600, 0.5, 66_347_960, 37e9, 84.3),
    _b('b8', 2.2, 3.6, 672, 0.5),
    _b('l2', 4.3, 5.3, 800, 0.5),
    _lite(0, 1.0, 1.0, 224, 0.2, 75.1),
    _lite(1, 1.0, 1.1, 240, 0.2, 76.7),
    _lite(2, 1.1, 1.2, 260, 0.3, 77.6),
    _lite(3, 1.2, 1.4, 280, 0.3, 79.8),
    _lite(4, 1.4, 1.8, 300, 0.3, 81.5),
)}


def _convnet(name, family, dropout, mean, std, params, madds=None, top1=None):
  # Baseline width and depth; the references resize bilinearly and center-crop 87.5% (224/256).
  return VariantSpec(name, 1.0, 1.0, 224, dropout, family=family, interpolation='bilinear',
                     mean_rgb=mean, stddev_rgb=std, published_params=params, paper_madds=madds,
                     paper_top1=top1)


# The other ConvNets of the paper. Parameters: the standard (torchvision / Keras) trainable
# counts. Multiply-adds and top-1: the EfficientNet paper (Table 2 for ResNet-50/152, Table 3's
# baselines for the MobileNets); ResNet-101 appears in neither.
CONVNET_VARIANTS: dict[str, VariantSpec] = {v.name: v for v in (
    _convnet('resnet-50', 'resnet', 0.0, IMAGENET_MEAN_RGB, IMAGENET_STDDEV_RGB,
             25_557_032, 4.1e9, 76.0),
    _convnet('resnet-101', 'resnet', 0.0, IMAGENET_MEAN_RGB, IMAGENET_STDDEV_RGB, 44_549_160),
    _convnet('resnet-152', 'resnet', 0.0, IMAGENET_MEAN_RGB, IMAGENET_STDDEV_RGB,
             60_192_808, 11e9, 77.8),
    _convnet('mobilenet-v1', 'mobilenet-v1', 1e-3, INCEPTION_MEAN_RGB, INCEPTION_STDDEV_RGB,
             4_231_976, 0.6e9, 70.6),
    _convnet('mobilenet-v2', 'mobilenet-v2', 0.2, INCEPTION_MEAN_RGB, INCEPTION_STDDEV_RGB,
             3_504_872, 0.3e9, 72.0),
)}

# Every name `get_variant` and `models.create_model` accept. `VARIANTS` stays EfficientNet's.
ALL_VARIANTS: dict[str, VariantSpec] = {**VARIANTS, **CONVNET_VARIANTS}


def get_variant(name: str) -> VariantSpec:
  """Looks any model (EfficientNet, ResNet, MobileNet) up by name, with a hint for typos."""
  try:
    return ALL_VARIANTS[name]
  except KeyError:
    close = difflib.get_close_matches(str(name), list(ALL_VARIANTS), n=1)
    hint = f' Did you mean {close[0]!r}?' if close else ''
    raise UnknownModelError(
        f'Unknown model {name!r}.{hint} Valid names: {", ".join(ALL_VARIANTS)}.') from None
