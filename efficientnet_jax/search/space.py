"""MnasNet's factorised, hierarchical search space (Tan et al. 2019, section 4.1) as data.

After a fixed stem, the network is a sequence of blocks with MobileNetV2's strides. Every layer of
a block shares the block's six decisions: ConvOp, kernel size, SE ratio, SkipOp, output filters
and number of layers. A *choice vector* holds one option index per decision, block by block, and
`SearchSpace.decode` turns it into the block table `models.create_model(..., blocks=...)` builds
(official block strings, `BlockArgs.encode`); `encode` maps a table back.

    space = default_space()                     # 7 blocks, 432-576 choices each
    space.encode(B0_BLOCKS)                     # B0 is a point of the space
    space.decode(choices)                       # -> tuple of BlockArgs
    space.slice(B0_BLOCKS, blocks=(2, 3), decisions=('conv_op', 'kernel_size'))  # a sub-space

The default per-block options are MnasNet's: ConvOp in {regular conv, depthwise conv, MBConv3,
MBConv6}, kernel 3 or 5, SE 0 or 0.25, skip identity / pooling / none, MobileNetV2's filters times
{0.75, 1, 1.25} and MobileNetV2's layers + {-1, 0, +1}. Two adjustments make the published
networks points of the space: filter counts are multiples of 8 (the network rounds every width
to one, `round_filters`), and B0's own counts (112 after MobileNetV2's 96, 192 after its 160) are
added where the grid misses them. MnasNet-A1 then fits every block (its 112 is B0's).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

from efficientnet_jax.models.mobilenet import MOBILENET_V2_BLOCKS
from efficientnet_jax.models.scaling import round_filters, scaled_stages
from efficientnet_jax.models.variants import (B0_BLOCKS, SKIPS, STEM_FILTERS, BlockArgs,
                                              decode_block_string)

__all__ = ['CONV_OPS', 'DECISIONS', 'MNASNET_A1_BLOCK_STRINGS', 'REFERENCE_TABLES', 'BlockChoices',
           'Dimension', 'SearchSpace', 'default_space', 'network_key', 'network_name']

# MnasNet's ConvOp as (BlockArgs.conv_type, expand_ratio): a depthwise conv is MBConv without
# the expansion (MnasNet's SepConv, B0's first block).
CONV_OPS = {'conv': ('regular', 1), 'dconv': ('depthwise', 1), 'mbconv3': ('depthwise', 3),
            'mbconv6': ('depthwise', 6)}
# The decisions of each block, in the order the controller emits them (MnasNet's Figure 4).
DECISIONS = ('conv_op', 'kernel_size', 'se_ratio', 'skip', 'filters', 'layers')
FILTER_MULTIPLIERS = (0.75, 1.25)
LAYER_OFFSETS = (-1, 0, 1)

# MnasNet-A1 (the official TPU reference's table; ReLU, where B0 has swish).
MNASNET_A1_BLOCK_STRINGS = (
    'r1_k3_s11_e1_i32_o16_noskip',
    'r2_k3_s22_e6_i16_o24',
    'r3_k5_s22_e3_i24_o40_se0.25',
    'r4_k3_s22_e6_i40_o80',
    'r2_k3_s11_e6_i80_o112_se0.25',
    'r3_k5_s22_e6_i112_o160_se0.25',
    'r1_k3_s11_e6_i160_o320',
)
# The published networks of the default space, by name (a config's `space.reference`).
REFERENCE_TABLES = {
    'efficientnet-b0': B0_BLOCKS,
    'mobilenet-v2': MOBILENET_V2_BLOCKS,
    'mnasnet-a1': tuple(decode_block_string(s) for s in MNASNET_A1_BLOCK_STRINGS),
}


def conv_op(args: BlockArgs) -> str:
  """The ConvOp name of a block (a key of CONV_OPS)."""
  for name, value in CONV_OPS.items():
    if value == (args.conv_type, args.expand_ratio):
      return name
  raise ValueError(f'Block {args.encode()!r} has no MnasNet ConvOp: expand ratio '
                   f'{args.expand_ratio} with a {args.conv_type} conv (valid: {_conv_ops_text()}).')


def _conv_ops_text() -> str:
  return ', '.join(f'{name} = {t} conv, expand {e}' for name, (t, e) in CONV_OPS.items())


def _decision_value(args: BlockArgs, decision: str) -> Any:
  return {'conv_op': conv_op, 'kernel_size': lambda a: a.kernel_size,
          'se_ratio': lambda a: a.se_ratio, 'skip': lambda a: a.skip,
          'filters': lambda a: a.out_filters, 'layers': lambda a: a.repeats}[decision](args)


def nearest_multiple_of_8(value: float, away_from: float) -> int:
  """The multiple of 8 nearest `value`; a tie goes away from `away_from` (so 0.75 x 16 = 12
  becomes 8, not 16, and stays a distinct option)."""
  low = int(value // 8) * 8
  high = low + 8
  if value - low != high - value:
    return low if value - low < high - value else high
  return low if away_from > value else high


@dataclasses.dataclass(frozen=True)
class BlockChoices:
  """The options of one block; every layer of the block shares the values chosen."""
  stride: int
  filters: tuple[int, ...]
  layers: tuple[int, ...]
  conv_op: tuple[str, ...] = tuple(CONV_OPS)
  kernel_size: tuple[int, ...] = (3, 5)
  se_ratio: tuple[float, ...] = (0.0, 0.25)
  skip: tuple[str, ...] = SKIPS

  def __post_init__(self):
    for decision in DECISIONS:
      options = self.options(decision)
      if not options or len(set(options)) != len(options):
        raise ValueError(f'Block options for {decision} must be distinct and not empty; got '
                         f'{options!r}.')
    unknown = [op for op in self.conv_op if op not in CONV_OPS]
    if unknown or any(s not in SKIPS for s in self.skip):
      raise ValueError(f'Unknown conv op or skip in {self.conv_op!r} / {self.skip!r}; valid conv '
                       f'ops: {", ".join(CONV_OPS)}; skips: {", ".join(SKIPS)}.')
    if self.stride > 1 and min(self.layers) < 1:
      raise ValueError(f'A block with stride {self.stride} needs at least one layer (it carries '
                       f'the downsampling); got layers {self.layers!r}.')

  def options(self, decision: str) -> tuple:
    return getattr(self, decision)

  @property
  def size(self) -> int:
    return math.prod(len(self.options(d)) for d in DECISIONS)


@dataclasses.dataclass(frozen=True)
class Dimension:
  """One decision of one block: a factor of the space, named like an Optuna parameter."""
  name: str  # e.g. 'block3_kernel_size'
  block: int  # from 0
  decision: str
  options: tuple


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """A sequence of blocks with their options after a fixed stem (and before the fixed head)."""
  blocks: tuple[BlockChoices, ...]
  stem_filters: int = STEM_FILTERS

  @functools.cached_property
  def dimensions(self) -> tuple[Dimension, ...]:
    """Every decision of every block in order; a choice vector indexes their options."""
    return tuple(Dimension(f'block{b + 1}_{d}', b, d, block.options(d))
                 for b, block in enumerate(self.blocks) for d in DECISIONS)

  @property
  def option_counts(self) -> tuple[int, ...]:
    return tuple(len(dim.options) for dim in self.dimensions)

  @property
  def size(self) -> int:
    """The number of choice vectors (432 per unrestricted block with three filter options)."""
    return math.prod(block.size for block in self.blocks)

  def decode(self, choices: Sequence[int]) -> tuple[BlockArgs, ...]:
    """The block table (baseline channels and layers) of a choice vector."""
    choices = self._check(choices)
    table, in_filters = [], self.stem_filters
    for b, block in enumerate(self.blocks):
      value = {d: block.options(d)[choices[b * len(DECISIONS) + i]]
               for i, d in enumerate(DECISIONS)}
      conv_type, expand_ratio = CONV_OPS[value['conv_op']]
      table.append(BlockArgs(
          repeats=value['layers'], kernel_size=value['kernel_size'], stride=block.stride,
          expand_ratio=expand_ratio, in_filters=in_filters, out_filters=value['filters'],
          se_ratio=value['se_ratio'], conv_type=conv_type, skip=value['skip']))
      if value['layers']:
        in_filters = value['filters']
    return tuple(table)

  def encode(self, blocks: Sequence[BlockArgs]) -> tuple[int, ...]:
    """The choice vector of a block table; a ValueError names any block that is not a point."""
    if len(blocks) != len(self.blocks):
      raise ValueError(f'The space has {len(self.blocks)} blocks; the table has {len(blocks)}.')
    choices, problems = [], []
    for b, (block, args) in enumerate(zip(self.blocks, blocks)):
      if args.stride != block.stride:
        problems.append(f'block {b + 1}: stride {args.stride}, the space\'s is {block.stride}')
      for d in DECISIONS:
        try:
          value = _decision_value(args, d)
          choices.append(block.options(d).index(value))
        except ValueError as e:
          choices.append(0)
          problems.append(f'block {b + 1}: {d} ' + (str(e) if d == 'conv_op' else
                          f'{value!r} is not one of {block.options(d)!r}'))
    if problems:
      raise ValueError('The block table is not a point of the search space: ' +
                       '; '.join(problems) + '.')
    return tuple(choices)

  def params(self, choices: Sequence[int]) -> dict[str, Any]:
    """{dimension name: option value}, the form an Optuna trial stores."""
    choices = self._check(choices)
    return {dim.name: dim.options[c] for dim, c in zip(self.dimensions, choices)}

  def choices_from_params(self, params: Mapping[str, Any]) -> tuple[int, ...]:
    """The choice vector of `params` (inverse of `params`); a decision with one option may be
    left out."""
    try:
      return tuple(dim.options.index(params[dim.name]) if dim.name in params or
                   len(dim.options) > 1 else 0 for dim in self.dimensions)
    except (KeyError, ValueError) as e:
      raise ValueError(f'Parameters {dict(params)!r} are not a point of this space ({e}). Was '
                       'the search store written with another space?') from None

  def slice(self, reference: Sequence[BlockArgs], blocks: Sequence[int] | None = None,
            decisions: Sequence[str] = DECISIONS) -> SearchSpace:
    """The sub-space that searches `decisions` of `blocks` (numbered from 1; None: all) and
    fixes every other decision at `reference`'s value (a point of this space)."""
    choices = self.encode(reference)
    free_blocks = set(range(1, len(self.blocks) + 1) if blocks is None else blocks)
    unknown = sorted(set(decisions) - set(DECISIONS)) + sorted(
        b for b in free_blocks if not 1 <= b <= len(self.blocks))
    if unknown:
      raise ValueError(f'Unknown decision(s) or block(s) {unknown}; decisions: '
                       f'{", ".join(DECISIONS)}; blocks 1 to {len(self.blocks)}.')
    new_blocks = []
    for b, block in enumerate(self.blocks):
      fields = {}
      for i, d in enumerate(DECISIONS):
        if b + 1 not in free_blocks or d not in decisions:
          fields[d] = (block.options(d)[choices[b * len(DECISIONS) + i]],)
      new_blocks.append(dataclasses.replace(block, **fields))
    return dataclasses.replace(self, blocks=tuple(new_blocks))

  def fingerprint(self) -> str:
    """A short digest of the options, to refuse a store written with another space."""
    text = repr((self.stem_filters, [dataclasses.astuple(b) for b in self.blocks]))
    return hashlib.sha256(text.encode()).hexdigest()[:12]

  def _check(self, choices: Sequence[int]) -> tuple[int, ...]:
    choices = tuple(int(c) for c in choices)
    counts = self.option_counts
    if len(choices) != len(counts) or any(not 0 <= c < n for c, n in zip(choices, counts)):
      raise ValueError(f'A choice vector of this space has {len(counts)} entries with entry i in '
                       f'[0, options_i); got {choices!r} for option counts {counts!r}.')
    return choices


def default_space() -> SearchSpace:
  """MnasNet's space over MobileNetV2's seven blocks, with B0's filter counts added."""
  blocks = []
  for mobilenet, b0 in zip(MOBILENET_V2_BLOCKS, B0_BLOCKS):
    f = mobilenet.out_filters
    filters = {nearest_multiple_of_8(m * f, away_from=f) for m in FILTER_MULTIPLIERS}
    filters |= {f, b0.out_filters}
    layers = tuple(mobilenet.repeats + o for o in LAYER_OFFSETS if mobilenet.repeats + o >= 0)
    blocks.append(BlockChoices(stride=mobilenet.stride, filters=tuple(sorted(filters)),
                               layers=layers))
  return SearchSpace(tuple(blocks))


def _canonical_skip(args: BlockArgs, in_filters: int) -> str:
  """The skip that builds the same network: an identity skip with no layer to skip over is no
  skip, and a pooling skip over layers that keep their shape is the identity."""
  first_changes_shape = args.stride > 1 or in_filters != args.out_filters
  if args.skip == 'identity' and first_changes_shape and args.repeats == 1:
    return 'none'
  if args.skip == 'pool' and not first_changes_shape:
    return 'identity'
  return args.skip


def network_key(blocks: Sequence[BlockArgs], width: float, depth: float) -> str:
  """The network a block table builds at `width` and `depth`, as canonical block strings.

  Two tables that build the same network (channels rounded alike, a block with no layers, an
  identity skip no layer can take) get the same key, so a search trains it once.
  """
  in_filters, strings = round_filters(STEM_FILTERS, width), []
  for repeats, args in scaled_stages(blocks, width, depth):
    if repeats == 0:
      continue
    args = dataclasses.replace(args, in_filters=in_filters,
                               skip=_canonical_skip(args, in_filters))
    strings.append(args.encode())
    in_filters = args.out_filters
  return ' '.join(strings)


def network_name(key: str) -> str:
  """A directory name for a network key: 'net-' and twelve hex digits."""
  return 'net-' + hashlib.sha256(key.encode()).hexdigest()[:12]
