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
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from efficientnet_jax.models import create_model, naming

KINDS = ('conv', 'depthwise', 'bn', 'dense')


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
    return naming.path_order(self.path)


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
  model = create_model(model_name, num_classes=num_classes, **dict(overrides))
  variables: dict[tuple[str, ...], dict[tuple[str, str], tuple[int, ...]]] = {}
  for name, shape in naming.variable_shapes(model).items():
    collection, *path, var = name.split('/')
    variables.setdefault(tuple(path), {})[(collection, var)] = shape

  # Global block indices: blocks sorted by (stage, repeat).
  blocks = {path[0]: naming.parse_block_name(path[0]) for path in variables
            if len(path) == 2 and naming.parse_block_name(path[0])}
  index = {name: i for i, name in enumerate(sorted(blocks, key=blocks.get))}
  modules = []
  for path, wanted in variables.items():
    block = None
    if path[0] in blocks:
      layers = {p[1] for p in variables if p[0] == path[0]}
      stage, repeat = blocks[path[0]]
      block = BlockPosition(stage - 1, repeat, index[path[0]], 'expand_conv' in layers,
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


def block_order(modules: Sequence[OurModule], *, index: int | None = None,
                stage: int | None = None, repeat: int = 0, our_layer: str = '') -> tuple:
  """Sort key of a source layer inside a block given by global `index` or by `stage`/`repeat`.

  A global index beyond our blocks (a deeper checkpoint) sorts after our last block.
  """
  if index is not None:
    positions = {m.block.index: (m.block.stage, m.block.repeat) for m in modules if m.block}
    stage, repeat = positions.get(index, (1_000_000 + index, 0))
  return naming.block_order(stage, repeat, our_layer)


def split_name(name: str, separator: str) -> tuple[str, str]:
  """'_blocks.1._bn0.weight' -> ('_blocks.1._bn0', 'weight')."""
  layer, _, weight = name.rpartition(separator)
  return layer, weight


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
    ordered = [text for _, text in sorted(problems, key=lambda p: p[0])]
    raise error(
        f'Cannot convert {source} into {model_name} with {num_classes} classes: '
        f'{len(problems)} problem(s), first in network order:\n{naming.format_problems(ordered)}\n'
        f'{hint}Check that the model name matches the checkpoint\'s variant and that the '
        'checkpoint holds the whole network with its classifier.', ordered)
  return variables


def resolve_model_name(model_name: str | None, infer: Callable[[], str],
                       error: type[ConversionError]) -> tuple[str, str]:
  """(model name, hint for errors): the given name, else the one `infer` reads off the weights.

  When both exist and disagree, the hint says what the checkpoint looks like.
  """
  looks_like = None
  try:
    looks_like = infer()
  except error:
    if model_name is None:
      raise
  if model_name is None:
    return looks_like, ''
  if looks_like and looks_like != model_name:
    return model_name, f'The checkpoint looks like {looks_like}, not {model_name}. '
  return model_name, ''


def infer_from_tensors(tensors: Mapping[str, np.ndarray], *, stem: str, head: str,
                       repeats: int | Sequence[int], se_marker: str, source: str,
                       error: type[ConversionError], not_this_format: str) -> str:
  """Our variant for a PyTorch-layout checkpoint (OIHW kernels), from its structure.

  `stem` and `head` name the stem and head conv kernels, `se_marker` a substring only
  squeeze-excite tensors have; `not_this_format` ends the error when they are missing.
  """
  try:
    stem_filters = tensors[stem].shape[0]
    head_filters, head_in = tensors[head].shape[:2]
  except KeyError:
    raise error(f'{source} has no {stem}/{head}, so it is not {not_this_format}') from None
  return naming.infer_model_name(
      stem_filters=stem_filters, head_filters=head_filters, head_in_filters=head_in,
      repeats=repeats, has_se=any(se_marker in name for name in tensors), source=source,
      error=error)


def convert_inferring_model(tensors: Mapping[str, np.ndarray], layout: SourceLayout, *,
                            model_name: str | None, num_classes: int | None, classifier: str,
                            infer: Callable[[], str], source: str,
                            error: type[ConversionError]) -> tuple[dict[str, Any], str]:
  """`convert_tensors` with the model name from `infer` and the classes from `classifier`'s
  weight when not given; returns (variables, model_name)."""
  model_name, hint = resolve_model_name(model_name, infer, error)
  if num_classes is None:
    num_classes = int(tensors[classifier].shape[0]) if classifier in tensors else 1000
  variables = convert_tensors(tensors, layout, model_name, num_classes, source=source, hint=hint,
                              error=error)
  return variables, model_name
