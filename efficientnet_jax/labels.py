"""Human-readable class names for predictions: ImageNet's 1,000, or a checkpoint's own list.

`efficientnet_jax/data/imagenet2012_labels.txt` ships with the package: line i (after the `#`
header) is TFDS `imagenet2012` label i, as `<WordNet synset id> TAB <WordNet lemmas>`, e.g.
`n02123045	tabby, tabby cat` for label 281. It was generated offline from two files inside installed
wheels: the label order of tensorflow_datasets 4.9.10 (`datasets/imagenet2012/labels.txt`, the
synset ids TFDS numbers 0..999) and the WordNet 3.0 lemmas of timm 1.0.31
(`timm/data/_info/imagenet_synset_to_lemma.txt`). The names are facts about the dataset; nothing
is read from those packages at run time.
"""
from __future__ import annotations

import functools
import importlib.resources
from typing import Sequence

IMAGENET2012 = 'imagenet2012'
_IMAGENET2012_FILE = 'imagenet2012_labels.txt'


@functools.lru_cache(maxsize=None)
def _imagenet2012_rows() -> tuple[tuple[str, str], ...]:
  text = importlib.resources.files('efficientnet_jax') / 'data' / _IMAGENET2012_FILE
  rows = []
  for line in text.read_text(encoding='utf-8').splitlines():
    if line and not line.startswith('#'):
      synset, lemmas = line.split('\t')
      rows.append((synset, lemmas))
  if len(rows) != 1000:  # pragma: no cover - a damaged installation
    raise RuntimeError(f'{_IMAGENET2012_FILE} has {len(rows)} classes instead of 1000.')
  return tuple(rows)


def imagenet2012_synsets() -> tuple[str, ...]:
  """The WordNet synset ids of TFDS imagenet2012's labels 0..999 ('n01440764', ...)."""
  return tuple(synset for synset, _ in _imagenet2012_rows())


def imagenet2012_lemmas() -> tuple[str, ...]:
  """Every WordNet lemma of each class, comma separated ('tabby, tabby cat' for label 281)."""
  return tuple(lemmas for _, lemmas in _imagenet2012_rows())


def imagenet2012_names() -> tuple[str, ...]:
  """The short name of each class: its first WordNet lemma ('tench', ..., 'tabby', ...,
  'espresso', ..., 'toilet tissue').

  Two pairs of classes share a first lemma, as in every ImageNet label list built from WordNet:
  'crane' (134, the bird; 517, the machine) and 'maillot' (638, 639). `imagenet2012_lemmas()`
  tells them apart.
  """
  return tuple(lemmas.split(',')[0].strip() for lemmas in imagenet2012_lemmas())


def class_names(label_set: str | Sequence[str] | None,
                num_classes: int | None = None) -> tuple[str, ...] | None:
  """The names a checkpoint's metadata `label_set` stands for.

  Args:
    label_set: 'imagenet2012' (the shipped ImageNet names), an explicit list of class names
      (index i named by entry i), or None (no names: predictions show indices only).
    num_classes: the classifier's width; when given, the names must cover it exactly.

  Raises:
    ValueError: for an unknown label-set name, or names that do not match `num_classes`.
  """
  if label_set is None:
    return None
  if isinstance(label_set, str):
    if label_set != IMAGENET2012:
      raise ValueError(
          f'Unknown label_set {label_set!r}: known sets are {IMAGENET2012!r}; a checkpoint can '
          'also list its class names explicitly, or give none (null) to show indices only.')
    names = imagenet2012_names()
  else:
    names = tuple(str(name) for name in label_set)
  if num_classes is not None and len(names) != num_classes:
    raise ValueError(
        f'The label set has {len(names)} names but the classifier has {num_classes} classes.')
  return names
