"""The one walk every converter shares: fill our variable tree from a flat dict of source tensors.

A converter only describes its framework (`SourceLayout`): what each of our modules is called
there, what its weights are called, and how their axes are laid out. `convert_tensors` then walks
*our* expected variable tree (from `jax.eval_shape` of `model.init`, so nothing is materialised),
in network order, and

* fills every variable we need exactly once, transposed into our layout,
* reports every tensor that is missing, mis-shaped, or left over in the source, sorted stem ->
  blocks -> head, so the first line of the error is the earliest place the two networks diverge.

Our Flax modules carry the Keras layer names (`stem_conv`, `block2a/expand_conv`, `top_bn`,
`predictions`), and each module is one of four kinds: 'conv' (kernel HWIO, optional bias),
'depthwise' (kernel (kh, kw, 1, C)), 'bn' (params scale/bias, batch_stats mean/var) and 'dense'
(kernel (in, out), bias).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

KINDS = ('conv', 'depthwise', 'bn', 'dense')
# Our layer names inside one MBConv block, in the order the block applies them.
BLOCK_LAYERS = ('expand_conv', 'expand_bn', 'dwconv', 'bn', 'se_reduce', 'se_expand',
                'project_conv', 'project_bn')
# Sections of the network, for sorting: stem, blocks, head, then anything unrecognised.
STEM, BLOCKS, HEAD, OTHER = range(4)
_TOP_LAYERS = {'stem_conv': (STEM, 0), 'stem_bn': (STEM, 1), 'top_conv': (HEAD, 0),
               'top_bn': (HEAD, 1), 'predictions': (HEAD, 2)}
_BLOCK_RE = re.compile(r'^block(\d+)([a-z]|_\d+)$')
# How many problems an error lists before summarising the rest.
LIST_LIMIT = 12


class ConversionError(ValueError):
  """A checkpoint's tensors do not fit the requested efficientnet_jax variant."""

  def __init__(self, message: str, problems: Sequence[str] = ()):
    super().__init__(message)
    self.problems = list(problems)


@dataclasses.dataclass(frozen=True)
class ConvertedCheckpoint:
  """What every converter's `load_*` returns: our variables plus what to store beside them.

  Attributes:
    variables: {'params': ..., 'batch_stats': ...} of float32 numpy arrays.
    model_name: our variant name (given or inferred from the checkpoint).
    num_classes: the classifier size.
    preprocessing: the input preprocessing the weights expect where it differs from the
      variant's default (`pretrained.save` keyword overrides: mean_rgb, stddev_rgb, notes, ...).
    source: where the weights came from, for metadata.json.
  """
  variables: dict[str, Any]
  model_name: str
  num_classes: int
  preprocessing: Mapping[str, Any]
  source: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class BlockPosition:
  """Where an MBConv block sits: `stage` and `repeat` from 0, `index` counts every block."""
  stage: int
  repeat: int
  index: int
  has_expand: bool
  has_se: bool


@dataclasses.dataclass(frozen=True)
class OurModule:
  """One of our weight-bearing modules and the variables it needs."""
  path: tuple[str, ...]  # ('block2a', 'expand_conv') or ('stem_conv',)
  kind: str  # one of KINDS
  block: BlockPosition | None  # None for stem and head layers
  variables: Mapping[tuple[str, str], tuple[int, ...]]  # (collection, name) -> shape

  @property
  def layer(self) -> str:
    """The last path element: 'expand_conv', 'stem_bn', ..."""
    return self.path[-1]

  @property
  def order(self) -> tuple:
    """Sort key in network order (comparable with `SourceLayout.position`)."""
    if self.block is None:
      section, pos = _TOP_LAYERS.get(self.layer, (OTHER, 0))
      return (section, 0, 0, pos, self.layer)
    return (BLOCKS, self.block.stage, self.block.repeat, block_inner_position(self.layer),
            self.layer)


def path_order(path: Sequence[str]) -> tuple:
  """Network-order sort key of one of our module paths, ('block2a', 'dwconv') or ('top_bn',)."""
  match = _BLOCK_RE.match(path[0]) if len(path) >= 2 else None
  if match:
    stage, letter = match.groups()
    repeat = ord(letter) - ord('a') if len(letter) == 1 else int(letter[1:])
    return (BLOCKS, int(stage) - 1, repeat, block_inner_position(path[1]), path[1])
  return top_order(path[0])


def block_inner_position(layer: str) -> int:
  """The position of one of our block layer names inside a block (for sorting)."""
  return BLOCK_LAYERS.index(layer) if layer in BLOCK_LAYERS else len(BLOCK_LAYERS)


def _kind(layer: str) -> str:
  if layer == 'dwconv':
    return 'depthwise'
  if layer == 'bn' or layer.endswith('_bn'):
    return 'bn'
  if layer == 'predictions':
    return 'dense'
  return 'conv'


@functools.lru_cache(maxsize=32)
def _expected_modules_cached(model_name: str, num_classes: int,
                             overrides: tuple[tuple[str, Any], ...]) -> tuple[OurModule, ...]:
  import jax
  import jax.numpy as jnp

  from efficientnet_jax.models import create_model

  model = create_model(model_name, num_classes=num_classes, **dict(overrides))
  # The variables depend neither on conv_impl nor on the input size, which only has to survive
  # the network's total stride; 'xla' keeps the abstract trace short.
  size = max(32, model.total_stride)
  model = model.clone(conv_impl='xla')
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
  variables: dict[tuple[str, ...], dict[tuple[str, str], tuple[int, ...]]] = {}
  for collection in ('params', 'batch_stats'):
    for path, leaf in jax.tree_util.tree_leaves_with_path(shapes.get(collection, {})):
      keys = tuple(entry.key for entry in path)
      variables.setdefault(keys[:-1], {})[(collection, keys[-1])] = tuple(leaf.shape)

  # Global block indices: blocks sorted by (stage, repeat).
  blocks = {}
  for path in variables:
    match = _BLOCK_RE.match(path[0]) if len(path) == 2 else None
    if match:
      stage, letter = match.groups()
      repeat = ord(letter) - ord('a') if len(letter) == 1 else int(letter[1:])
      blocks[path[0]] = (int(stage) - 1, repeat)
  index = {name: i for i, name in enumerate(sorted(blocks, key=blocks.get))}
  modules = []
  for path, wanted in variables.items():
    block = None
    if path[0] in blocks:
      layers = {p[1] for p in variables if p[0] == path[0]}
      stage, repeat = blocks[path[0]]
      block = BlockPosition(stage, repeat, index[path[0]], 'expand_conv' in layers,
                            'se_reduce' in layers)
    modules.append(OurModule(path, _kind(path[-1]), block, wanted))
  return tuple(sorted(modules, key=lambda m: m.order))


def expected_modules(model_name: str, num_classes: int = 1000,
                     **model_overrides) -> tuple[OurModule, ...]:
  """Our weight-bearing modules for a variant, in network order (cached; from abstract shapes)."""
  return _expected_modules_cached(model_name, int(num_classes),
                                  tuple(sorted(model_overrides.items())))


@dataclasses.dataclass(frozen=True)
class SourceLayout:
  """How one framework names and lays out EfficientNet weights.

  Attributes:
    framework: the framework's name, for messages ('PyTorch', 'TF checkpoint', ...).
    separator: joins a layer name and a weight name into a tensor name ('.' or '/').
    layer_name: our module -> the source layer name that holds its weights.
    weight_names: per kind, our (collection, variable) -> the source weight name.
    axes: per kind, the transpose that takes the source array to our layout (None: as is).
    position: (a source layer name, our modules) -> its sort key in network order, comparable
      with `OurModule.order`; lists leftover source tensors where they belong (see
      `top_order` and `block_order`).
  """
  framework: str
  separator: str
  layer_name: Callable[[OurModule], str]
  weight_names: Mapping[str, Mapping[tuple[str, str], str]]
  axes: Mapping[str, tuple[int, ...] | None]
  position: Callable[[str, Sequence[OurModule]], tuple]


# The weight names every PyTorch BatchNorm2d uses, and its counter that is not a weight.
TORCH_BN = {('params', 'scale'): 'weight', ('params', 'bias'): 'bias',
            ('batch_stats', 'mean'): 'running_mean', ('batch_stats', 'var'): 'running_var'}
TORCH_PARAM = {('params', 'kernel'): 'weight', ('params', 'bias'): 'bias'}
# PyTorch: conv OIHW -> HWIO; depthwise (C, 1, kh, kw) -> (kh, kw, 1, C) is the same transpose;
# Linear (out, in) -> (in, out).
TORCH_AXES = {'conv': (2, 3, 1, 0), 'depthwise': (2, 3, 1, 0), 'bn': None, 'dense': (1, 0)}
# TF/Keras BatchNormalization names.
TF_BN = {('params', 'scale'): 'gamma', ('params', 'bias'): 'beta',
         ('batch_stats', 'mean'): 'moving_mean', ('batch_stats', 'var'): 'moving_variance'}
TF_PARAM = {('params', 'kernel'): 'kernel', ('params', 'bias'): 'bias'}
TF_DEPTHWISE = {('params', 'kernel'): 'depthwise_kernel'}
# TF/Keras: conv HWIO and dense (in, out) as ours; depthwise (kh, kw, C, 1) -> (kh, kw, 1, C).
TF_AXES = {'conv': None, 'depthwise': (0, 1, 3, 2), 'bn': None, 'dense': None}


def top_order(our_layer: str) -> tuple:
  """Sort key of a stem/head layer given by our name ('stem_conv', 'top_bn', 'predictions')."""
  section, pos = _TOP_LAYERS.get(our_layer, (OTHER, 0))
  return (section, 0, 0, pos, our_layer)


def block_order(modules: Sequence[OurModule], *, index: int | None = None,
                stage: int | None = None, repeat: int = 0, our_layer: str = '') -> tuple:
  """Sort key of a source layer inside a block given by global `index` or by `stage`/`repeat`.

  A global index beyond our blocks (a deeper checkpoint) sorts after our last block.
  """
  if index is not None:
    positions = {m.block.index: (m.block.stage, m.block.repeat) for m in modules if m.block}
    stage, repeat = positions.get(index, (1_000_000 + index, 0))
  return (BLOCKS, stage, repeat, block_inner_position(our_layer), our_layer)


def split_name(name: str, separator: str) -> tuple[str, str]:
  """'_blocks.1._bn0.weight' -> ('_blocks.1._bn0', 'weight')."""
  layer, _, weight = name.rpartition(separator)
  return layer, weight


def format_problems(problems: Sequence[tuple[tuple, str]], limit: int = LIST_LIMIT) -> str:
  """The first `limit` (sort key, text) problems in network order, one per line."""
  ordered = [text for _, text in sorted(problems, key=lambda p: p[0])]
  lines = [f'  {text}' for text in ordered[:limit]]
  if len(ordered) > limit:
    lines.append(f'  ... and {len(ordered) - limit} more')
  return '\n'.join(lines)


def convert_tensors(tensors: Mapping[str, Any], layout: SourceLayout, model_name: str,
                    num_classes: int, *, source: str, hint: str = '',
                    error: type[ConversionError] = ConversionError,
                    model_overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Maps a flat {tensor name: array} checkpoint onto our variables.

  Args:
    tensors: every weight of the source model by full name ('_blocks.1._bn0.weight'); non-weight
      entries (BN step counters, optimizer slots, global_step) must already be removed.
    layout: the source framework's naming and layouts.
    model_name, num_classes, model_overrides: the variant to fill (`create_model` arguments).
    source: names the checkpoint in error messages; `hint` is prepended to the error's advice.
    error: the ConversionError subclass to raise.

  Returns:
    {'params': ..., 'batch_stats': ...}: nested dicts of float32 numpy arrays.

  Raises:
    `error` listing every missing, mis-shaped or unused tensor, first in network order.
  """
  modules = expected_modules(model_name, num_classes, **dict(model_overrides or {}))
  by_layer: dict[str, dict[str, Any]] = {}
  for name, value in tensors.items():
    layer, weight = split_name(name, layout.separator)
    by_layer.setdefault(layer, {})[weight] = value

  variables: dict[str, dict] = {}
  used: set[str] = set()
  problem_layers: set[str] = set()
  problems: list[tuple[tuple, str]] = []
  sep = layout.separator
  for module in modules:
    layer = layout.layer_name(module)
    weights = by_layer.get(layer)
    ours = '/'.join(module.path)
    if weights is None:
      problems.append((module.order, f'missing: no {layout.framework} layer {layer!r} '
                                     f'(for our {ours}, {len(module.variables)} variable(s))'))
      continue
    names = layout.weight_names[module.kind]
    axes = layout.axes[module.kind]
    for (collection, var), shape in module.variables.items():
      weight = names.get((collection, var))
      tensor = f'{layer}{sep}{weight or var}'
      if weight is None or weight not in weights:
        problems.append((module.order, f'missing: {tensor} (for our {collection} {ours}/{var} '
                                       f'{shape}); the layer has {sorted(weights)}'))
        problem_layers.add(layer)
        continue
      value = np.asarray(weights[weight], dtype=np.float32)
      raw_shape = value.shape
      if axes is not None and value.ndim == len(axes):
        value = value.transpose(axes)
      if value.shape != shape:
        problems.append((module.order, f'shape mismatch: {tensor} is {raw_shape}, which is '
                                       f'{value.shape} in our layout; expected {shape} (our '
                                       f'{ours}/{var})' if axes is not None else
                                       f'shape mismatch: {tensor} is {raw_shape}, expected '
                                       f'{shape} (our {ours}/{var})'))
        problem_layers.add(layer)
        continue
      used.add(tensor)
      node = variables.setdefault(collection, {})
      for key in module.path:
        node = node.setdefault(key, {})
      node[var] = value

  for name, value in tensors.items():
    layer, _ = split_name(name, sep)
    if name in used or layer in problem_layers:
      continue  # a layer already reported above is not reported again, tensor by tensor
    problems.append((layout.position(layer, modules), f'unused: {layout.framework} weight {name} '
                                             f'{tuple(np.shape(value))} has no place in '
                                             f'{model_name}'))
  if problems:
    raise error(
        f'Cannot convert {source} into {model_name} with {num_classes} classes: '
        f'{len(problems)} problem(s), first in network order:\n{format_problems(problems)}\n'
        f'{hint}Check that the model name matches the checkpoint\'s variant and that the '
        'checkpoint holds the whole network with its classifier.',
        [text for _, text in sorted(problems, key=lambda p: p[0])])
  return variables


def _stem_head_filters(model) -> tuple[int, int]:
  from efficientnet_jax.models import round_filters
  from efficientnet_jax.models.variants import HEAD_FILTERS, STEM_FILTERS

  if model.fix_stem_head:
    return STEM_FILTERS, HEAD_FILTERS
  return (round_filters(STEM_FILTERS, model.width_coefficient),
          round_filters(HEAD_FILTERS, model.width_coefficient))


def infer_model_name(*, stem_filters: int, head_filters: int, head_in_filters: int,
                     repeats: int | Sequence[int], has_se: bool, source: str,
                     error: type[ConversionError] = ConversionError) -> str:
  """Our variant whose structure matches a checkpoint's: widths, blocks, squeeze-excite.

  `head_in_filters` is the last block's output width (the head conv's input): Lite fixes its stem
  and head widths, and Lite1 and Lite2 have the same blocks, so only this tells them apart.
  `repeats` is the number of blocks per stage, or only the total where the checkpoint does not
  group blocks by stage. Raises `error` when no variant, or more than one, matches.
  """
  from efficientnet_jax.models import VARIANTS, create_model

  matches = []
  for name in VARIANTS:
    model = create_model(name)
    plan = tuple(r for r, _ in model.stage_plan())
    # Compare per stage where the checkpoint tells stages apart, else the total.
    if isinstance(repeats, int):
      if sum(plan) != repeats:
        continue
    elif tuple(repeats) != plan:
      continue
    if _stem_head_filters(model) != (stem_filters, head_filters):
      continue
    if model.stage_plan()[-1][1].out_filters != head_in_filters:
      continue
    if has_se != any(0 < args.se_ratio <= 1 for _, args in model.stage_plan()):
      continue
    matches.append(name)
  if len(matches) != 1:
    what = ('no variant' if not matches else f'several variants ({", ".join(matches)})')
    raise error(
        f'Cannot tell which EfficientNet {source} is: {what} has stem {stem_filters}, last block '
        f'{head_in_filters} and head {head_filters} channels, blocks {repeats} and '
        f'{"" if has_se else "no "}'
        'squeeze-excite. Pass the model name explicitly (--model=...).')
  return matches[0]
