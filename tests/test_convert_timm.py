"""timm tf_efficientnet / tf_efficientnet_lite state dicts -> efficientnet_jax: logits parity.

Real timm models (random weights, randomised BN statistics; timm cannot download anything here)
are built with `timm.create_model(..., pretrained=False)` and compared with our model on the same
images. timm imports torchvision at load time, and no torchvision build works with the CPU
PyTorch installed here, so `tests/torchvision_stub.py` stands in for the few torchvision names
timm's import touches, inside these tests only.
"""
import importlib.util

import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='PyTorch is not installed (pip install ".[torch]")')
if importlib.util.find_spec('timm') is None:
  pytest.skip('timm is not installed (pip install --no-deps timm pyyaml huggingface_hub '
              'safetensors)', allow_module_level=True)

import jax  # noqa: E402

import torchvision_stub  # noqa: E402
from efficientnet_jax.convert.timm import (TimmConversionError, convert_state_dict,  # noqa: E402
                                           load_timm_checkpoint, timm_preprocessing)
from efficientnet_jax.models import create_model  # noqa: E402

RES = 72  # stride-2 layers see 72, 36, 18, 9 and 5 pixels: odd sizes exercise TF 'SAME' padding


@pytest.fixture(scope='module')
def timm():
  with torchvision_stub.installed():
    import timm
    yield timm


def build(timm, name, seed=0):
  torch.manual_seed(seed)
  model = timm.create_model(name, pretrained=False)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        c = module.num_features
        module.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        module.bias.copy_(torch.randn(c, generator=gen) * 0.2)
        module.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
        module.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
  return model.eval()


@pytest.mark.parametrize('timm_name,ours', [('tf_efficientnet_b0', 'efficientnet-b0'),
                                            ('tf_efficientnet_lite0', 'efficientnet-lite0')])
def test_logits_match_timm(timm, timm_name, ours, tmp_path):
  model = build(timm, timm_name)
  assert {m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-3}
  path = str(tmp_path / f'{timm_name}.pth')
  torch.save(model.state_dict(), path)
  converted = load_timm_checkpoint(path)  # model name inferred from the structure
  assert (converted.model_name, converted.num_classes) == (ours, 1000)
  # The preprocessing recorded for a bare file is timm's own for the default tag.
  cfg = model.pretrained_cfg
  recorded = {'mean_rgb': [m * 255 for m in cfg['mean']],
              'stddev_rgb': [s * 255 for s in cfg['std']]}
  defaults = {'efficientnet-b0': [0.485 * 255, 0.456 * 255, 0.406 * 255]}
  assert converted.preprocessing.get('mean_rgb', defaults.get(ours)) == pytest.approx(
      recorded['mean_rgb'])
  from_cfg = timm_preprocessing(ours, cfg)
  assert from_cfg['resolution'] == 224 and from_cfg['crop_fraction'] == cfg['crop_pct']

  images = np.random.default_rng(1).normal(size=(2, RES, RES, 3)).astype(np.float32)
  with torch.no_grad():
    theirs = model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  net = create_model(ours)
  ours_logits = np.asarray(jax.jit(lambda v, x: net.apply(v, x, train=False))(
      converted.variables, images))
  rel = float(np.abs(ours_logits - theirs).max() / np.abs(theirs).max())
  print(f'{timm_name} (timm, random): max |diff| / max |logit| = {rel:.2e}')
  assert rel <= 1e-4


def test_wrong_model_lists_first_mismatched_tensors(timm):
  lite0 = build(timm, 'tf_efficientnet_lite0').state_dict()
  with pytest.raises(TimmConversionError) as err:
    convert_state_dict(lite0, 'efficientnet-b0')
  lines = str(err.value).splitlines()
  assert 'looks like efficientnet-lite0, not efficientnet-b0' in str(err.value)
  # Lite has no squeeze-excite: the first difference is block1a's SE reduce conv.
  assert lines[1].startswith("  missing: no timm layer 'blocks.0.0.se.conv_reduce'")

  with pytest.raises(TimmConversionError, match=r'not a timm EfficientNet.*--source=torch'):
    convert_state_dict({'_conv_stem.weight': np.zeros((32, 3, 3, 3))})


def test_cli_converts_a_timm_file(timm, tmp_path):
  from efficientnet_jax import pretrained
  from efficientnet_jax.convert import __main__ as cli

  model = build(timm, 'tf_efficientnet_lite0', seed=3)
  path = str(tmp_path / 'lite0.pth')
  torch.save(model.state_dict(), path)
  output = str(tmp_path / 'out')
  assert cli.main(['--source=timm', f'--weights={path}', f'--output={output}']) == 0
  _, variables, metadata = pretrained.load(output)
  assert metadata['model'] == 'efficientnet-lite0'
  assert metadata['mean_rgb'] == metadata['stddev_rgb'] == [127.5] * 3  # timm's Lite config
  assert metadata['overridden'] == ['mean_rgb', 'stddev_rgb']
  jax.tree.map(np.testing.assert_array_equal, variables, load_timm_checkpoint(path).variables)
