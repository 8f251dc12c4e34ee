"""Our variables' names, once: module paths, their network order, flattening, and shapes.

The bottom of the layering (it imports only the variant tables and the scaling rule): the Flax
modules name their submodules with `block_name`, and pretrained directories, converters,
transfer learning and the optimizer's masks read the names back with the functions here.

Names follow the Keras applications model: 'stem_conv', 'stem_bn', 'block{stage}{letter}/
{expand_conv, expand_bn, dwconv, bn, se_reduce, se_expand, project_conv, project_bn}', 'top_conv',
'top_bn', 'predictions'.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from efficientnet_jax.models.scaling import scaled_stages, stem_head_filters
from efficientnet_jax.models.variants import VARIANTS

# Our layer names inside one MBConv block, in the order the block applies them (a pooling skip's
# projection, in searched networks only, last).
BLOCK_LAYERS = ('expand_conv', 'expand_bn', 'dwconv', 'bn', 'se_reduce', 'se_expand',
                'project_conv', 'project_bn', 'skip_conv', 'skip_bn')
# Sections of the network, for sorting: stem, blocks, head, then anything unrecognised.
STEM, BLOCKS, HEAD, OTHER = range(4)
TOP_LAYERS = {'stem_conv': (STEM, 0), 'stem_bn': (STEM, 1), 'top_conv': (HEAD, 0),
              'top_bn': (HEAD, 1), 'predictions': (HEAD, 2)}
# How many problems an error lists before summarising the rest.
LIST_LIMIT = 12

_BLOCK_NAME_RE = re.compile(r'^block(\d+)([a-z]|_\d+)$')


def block_name(stage: int, index: int) -> str:
  """'block{stage}{letter}': stages counted from 1, repeats lettered from 'a' ('_26' past 'z')."""
  letter = chr(ord('a') + index) if index < 26 else f'_{index}'
  return f'block{stage}{letter}'


def parse_block_name(name: str) -> tuple[int, int] | None:
  """(stage from 1, repeat from 0) of a `block_name`, or None for any other name."""
  match = _BLOCK_NAME_RE.match(name)
  if not match:
    return None
  stage, letter = match.groups()
  return int(stage), (ord(letter) - ord('a') if len(letter) == 1 else int(letter[1:]))


def block_inner_position(layer: str) -> int:
  """The position of one of our layer names inside a block (unknown names sort last)."""
  return BLOCK_LAYERS.index(layer) if layer in BLOCK_LAYERS else len(BLOCK_LAYERS)


def top_order(layer: str) -> tuple:
  """Network-order sort key of a stem/head layer ('stem_conv', 'top_bn', 'predictions')."""
  section, pos = TOP_LAYERS.get(layer, (OTHER, 0))
  return (section, 0, 0, pos, layer)


def block_order(stage: int, repeat: int, layer: str = '') -> tuple:
  """Network-order sort key of `layer` in the block at (`stage` from 0, `repeat` from 0)."""
  return (BLOCKS, stage, repeat, block_inner_position(layer), layer)


def path_order(path: Sequence[str]) -> tuple:
  """Network-order sort key of a module path, ('block2a', 'dwconv') or ('top_bn',)."""
  parsed = parse_block_name(path[0]) if len(path) >= 2 else None
  if parsed:
    return block_order(parsed[0] - 1, parsed[1], path[1])
  return top_order(path[0])


def variable_order(name: str) -> tuple:
  """Sort key of a flattened variable name 'params/block2a/dwconv/kernel': network order."""
  parts = name.split('/')
  return (path_order(parts[1:-1] or parts[1:]), parts[0] != 'params', name)


def key_names(path) -> list[str]:
  """A jax key path as plain strings (dict keys, attribute names, sequence indices)."""
  names = []
  for entry in path:
    if isinstance(entry, jax.tree_util.DictKey):
      names.append(str(entry.key))
    elif isinstance(entry, jax.tree_util.GetAttrKey):
      names.append(str(entry.name))
    elif isinstance(entry, jax.tree_util.SequenceKey):
      names.append(str(entry.idx))
    else:  # FlattenedIndexKey and anything newer.
      names.append(str(getattr(entry, 'key', entry)))
  return names


def flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  """{'params/block1a/dwconv/kernel': leaf, ...} of any pytree (nested dicts, FrozenDicts, ...)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(([prefix] if prefix else []) + key_names(path)): leaf for path, leaf in leaves}


def abstract_variables(model) -> Any:
  """`model`'s variables as a tree of ShapeDtypeStructs, without materialising any array.

  The shapes depend neither on the input size (which only has to survive the network's stride)
  nor on conv_impl or features_only, so the full network is traced at a small size with XLA convs.
  """
  size = max(32, getattr(model, 'total_stride', 32))
  fields = {k: v for k, v in (('features_only', False), ('conv_impl', 'xla')) if hasattr(model, k)}
  return jax.eval_shape(model.clone(**fields).init, jax.random.key(0),
                        jnp.zeros((1, size, size, 3)))


def variable_shapes(model) -> dict[str, tuple[int, ...]]:
  """Flattened {name: shape} of `abstract_variables(model)`."""
  return {name: tuple(leaf.shape) for name, leaf in flatten(abstract_variables(model)).items()}


def format_problems(problems: Sequence[str], limit: int = LIST_LIMIT) -> str:
  """The first `limit` problems, one indented line each, then how many more there are."""
  lines = [f'  {p}' for p in problems[:limit]]
  if len(problems) > limit:
    lines.append(f'  ... and {len(problems) - limit} more')
  return '\n'.join(lines)


def shape_problems(found: Mapping[str, tuple[int, ...]],
                   expected: Mapping[str, tuple[int, ...]]) -> list[str]:
  """Missing, unexpected and mis-shaped variables (flattened names), in network order."""
  problems = []
  for name in sorted(expected, key=variable_order):
    shape = tuple(expected[name])
    if name not in found:
      problems.append(f'missing: {name} {shape}')
    elif tuple(found[name]) != shape:
      problems.append(f'shape mismatch: {name} is {tuple(found[name])}, the model needs {shape}')
  problems += [f'unexpected: {name} {tuple(found[name])}'
               for name in sorted(found, key=variable_order) if name not in expected]
  return problems


class UnknownStructureError(ValueError):
  """No EfficientNet variant, or more than one, has a checkpoint's structure."""


def infer_model_name(*, stem_filters: int | None, head_filters: int | None,
                     head_in_filters: int | None, repeats: int | Sequence[int],
                     has_se: bool | None, source: str,
                     error: type[ValueError] = UnknownStructureError) -> str:
  """The EfficientNet variant whose structure matches a checkpoint's.

  Args:
    stem_filters, head_filters: the stem and head conv widths.
    head_in_filters: the last block's output width. Lite fixes its stem and head widths, and
      Lite1 and Lite2 have the same blocks, so only this tells them apart. None: not compared.
    repeats: blocks per stage, or only the total where the checkpoint does not group blocks by
      stage.
    has_se: whether the blocks squeeze-and-excite; None: not compared.
    source: names the checkpoint in the error.
    error: the exception class to raise when no variant, or more than one, matches.
  """
  matches = []
  for name, spec in VARIANTS.items():
    plan = scaled_stages(spec.blocks, spec.width, spec.depth, fixed_ends=spec.lite)
    per_stage = tuple(r for r, _ in plan)
    if (sum(per_stage) != repeats) if isinstance(repeats, int) else (tuple(repeats) != per_stage):
      continue
    if stem_head_filters(spec.width, fixed=spec.lite) != (stem_filters, head_filters):
      continue
    if head_in_filters is not None and plan[-1][1].out_filters != head_in_filters:
      continue
    if has_se is not None and has_se != any(0 < args.se_ratio <= 1 for _, args in plan):
      continue
    matches.append(name)
  if len(matches) != 1:
    what = 'no variant' if not matches else f'several variants ({", ".join(matches)})'
    se = '' if has_se is None else (' and ' + ('' if has_se else 'no ') + 'squeeze-excite')
    raise error(
        f'Cannot tell which EfficientNet {source} is: {what} has stem {stem_filters}, last block '
        f'{head_in_filters} and head {head_filters} channels and blocks {repeats}{se}. Pass the '
        'model name explicitly (--model=...).')
  return matches[0]
