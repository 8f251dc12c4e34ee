"""Official TF checkpoints (tensorflow/tpu models/official/efficientnet) -> efficientnet_jax.

No official checkpoint can be downloaded here, so each test writes one: every variable under
the official name and in the official layout (spelled out below from efficientnet_model.py's
layer-creation order, independently of the converter), with distinct raw and
ExponentialMovingAverage values, optimizer slots and global_step, as the published files have.
Converting it back must recover exactly the weights it was written from.
"""
import jax
import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')

from efficientnet_jax.convert.tf import (TFConversionError, convert_tf_variables,  # noqa: E402
                                         load_tf_checkpoint)
from efficientnet_jax.models import create_model  # noqa: E402


def random_variables(model_name, seed, num_classes=1000):
  model = create_model(model_name, num_classes=num_classes, conv_impl='xla')
  shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32), dict(shapes))


def official_names(variables, scope, bn='tpu_batch_normalization'):
  """{official variable name: array in the official layout} for our variables."""
  params, stats = variables['params'], variables['batch_stats']
  out = {}

  def bn_vars(prefix, p, s):
    out.update({f'{prefix}/gamma': p['scale'], f'{prefix}/beta': p['bias'],
                f'{prefix}/moving_mean': s['mean'], f'{prefix}/moving_variance': s['var']})

  out[f'{scope}/stem/conv2d/kernel'] = params['stem_conv']['kernel']
  bn_vars(f'{scope}/stem/{bn}', params['stem_bn'], stats['stem_bn'])
  block_names = sorted((k for k in params if k.startswith('block')),
                       key=lambda k: (int(k[5]), k[6:]))
  for index, name in enumerate(block_names):
    p, s, prefix = params[name], stats[name], f'{scope}/blocks_{index}'
    # TF1 numbers conv2d / tpu_batch_normalization per scope in call order: expand conv, its BN,
    # depthwise BN, project conv, its BN; without expansion the numbering starts at the depthwise.
    if 'expand_conv' in p:
      out[f'{prefix}/conv2d/kernel'] = p['expand_conv']['kernel']
      bn_vars(f'{prefix}/{bn}', p['expand_bn'], s['expand_bn'])
      dw_bn, project, project_bn = f'{bn}_1', 'conv2d_1', f'{bn}_2'
    else:
      dw_bn, project, project_bn = bn, 'conv2d', f'{bn}_1'
    out[f'{prefix}/depthwise_conv2d/depthwise_kernel'] = p['dwconv']['kernel'].transpose(0, 1, 3, 2)
    bn_vars(f'{prefix}/{dw_bn}', p['bn'], s['bn'])
    if 'se_reduce' in p:
      for tf_name, ours in (('se/conv2d', 'se_reduce'), ('se/conv2d_1', 'se_expand')):
        out[f'{prefix}/{tf_name}/kernel'] = p[ours]['kernel']
        out[f'{prefix}/{tf_name}/bias'] = p[ours]['bias']
    out[f'{prefix}/{project}/kernel'] = p['project_conv']['kernel']
    bn_vars(f'{prefix}/{project_bn}', p['project_bn'], s['project_bn'])
  out[f'{scope}/head/conv2d/kernel'] = params['top_conv']['kernel']
  bn_vars(f'{scope}/head/{bn}', params['top_bn'], stats['top_bn'])
  out[f'{scope}/head/dense/kernel'] = params['predictions']['kernel']
  out[f'{scope}/head/dense/bias'] = params['predictions']['bias']
  return out


def write_checkpoint(prefix, tensors):
  """A TF V2 checkpoint with exactly these variable names (what a tf.compat.v1 Saver writes)."""
  names = sorted(tensors)
  tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[''] * len(names),
                    tensors=[tf.constant(tensors[n]) for n in names])
  return prefix


def official_checkpoint(tmp_path, model_name, bn='tpu_batch_normalization'):
  """Writes raw + EMA + optimizer-slot variables; returns (prefix, raw vars, EMA vars)."""
  raw, ema = random_variables(model_name, 1), random_variables(model_name, 2)
  tensors = dict(official_names(raw, model_name, bn))
  for name, value in official_names(ema, model_name, bn).items():
    tensors[f'{name}/ExponentialMovingAverage'] = value
    tensors[f'{name}/RMSProp'] = np.zeros_like(value)
  tensors['global_step'] = np.array(1000, np.int64)
  return write_checkpoint(str(tmp_path / 'model.ckpt'), tensors), raw, ema


def test_b0_official_names_round_trip_with_ema(tmp_path):
  prefix, raw, ema = official_checkpoint(tmp_path, 'efficientnet-b0')
  shapes = {n: tuple(s) for n, s in tf.train.list_variables(prefix)}
  # Spot checks of the published B0 checkpoint's names and shapes.
  assert shapes['efficientnet-b0/blocks_0/conv2d/kernel'] == (1, 1, 32, 16)  # project, no expand
  assert shapes['efficientnet-b0/blocks_1/conv2d/kernel'] == (1, 1, 16, 96)  # expand
  assert shapes['efficientnet-b0/blocks_1/conv2d_1/kernel'] == (1, 1, 96, 24)  # project
  assert shapes['efficientnet-b0/blocks_1/tpu_batch_normalization_2/gamma'] == (24,)
  assert shapes['efficientnet-b0/blocks_0/se/conv2d/kernel'] == (1, 1, 32, 8)
  assert shapes['efficientnet-b0/blocks_15/depthwise_conv2d/depthwise_kernel'] == (3, 3, 1152, 1)
  assert shapes['efficientnet-b0/head/dense/kernel'] == (1280, 1000)

  converted = load_tf_checkpoint(prefix)  # model name from the scope, EMA by default
  assert (converted.model_name, converted.num_classes) == ('efficientnet-b0', 1000)
  assert converted.source['tensors_from_ema'] == len(jax.tree.leaves(ema))
  jax.tree.map(np.testing.assert_array_equal, converted.variables, ema)
  plain = load_tf_checkpoint(str(tmp_path), use_ema=False)  # a directory works too
  jax.tree.map(np.testing.assert_array_equal, plain.variables, raw)


def test_lite0_scope_and_plain_batch_normalization_names(tmp_path):
  prefix, _, ema = official_checkpoint(tmp_path, 'efficientnet-lite0', bn='batch_normalization')
  converted = load_tf_checkpoint(prefix)
  assert converted.model_name == 'efficientnet-lite0'
  jax.tree.map(np.testing.assert_array_equal, converted.variables, ema)


def test_wrong_model_and_unreadable_checkpoints(tmp_path):
  variables = official_names(random_variables('efficientnet-b0', 3), 'efficientnet-b0')
  with pytest.raises(TFConversionError) as err:
    convert_tf_variables(variables, 'efficientnet-b1')
  lines = str(err.value).splitlines()
  assert "The checkpoint's scope is 'efficientnet-b0'" in str(err.value)
  # B1's blocks_1 is a second non-expanding block (block1b); B0's is the expanding block2a.
  assert lines[1] == ('  shape mismatch: efficientnet-b0/blocks_1/depthwise_conv2d/'
                      'depthwise_kernel is (3, 3, 96, 1), which is (3, 3, 1, 96) in our layout; '
                      'expected (3, 3, 1, 16) (our block1b/dwconv/kernel)')
  with pytest.raises(TFConversionError, match='Cannot read a TF checkpoint'):
    load_tf_checkpoint(str(tmp_path / 'missing.ckpt'))
  with pytest.raises(TFConversionError, match='Cannot tell which model'):
    convert_tf_variables({'global_step': np.array(1)})
  missing_head = {k: v for k, v in variables.items() if '/head/dense/' not in k}
  with pytest.raises(TFConversionError, match=r"missing: no TF checkpoint layer "
                                              r"'efficientnet-b0/head/dense'"):
    convert_tf_variables(missing_head, num_classes=1000)


def test_cli_writes_a_pretrained_directory(tmp_path, capsys):
  from efficientnet_jax import pretrained
  from efficientnet_jax.convert import __main__ as cli

  prefix, raw, _ = official_checkpoint(tmp_path, 'efficientnet-lite0')
  output = str(tmp_path / 'out')
  assert cli.main(['--source=tf', f'--weights={prefix}', f'--output={output}', '--no_ema']) == 0
  model, variables, metadata = pretrained.load(output)
  assert metadata['model'] == 'efficientnet-lite0' and metadata['mean_rgb'] == [127.0] * 3
  assert metadata['source']['use_ema'] is False and metadata['source']['format'] == 'tf'
  jax.tree.map(np.testing.assert_array_equal, variables, raw)
  # A second conversion into the same directory is refused unless --overwrite.
  assert cli.main(['--source=tf', f'--weights={prefix}', f'--output={output}']) == 1
  assert 'already exists' in capsys.readouterr().err
  assert cli.main(['--source=tf', f'--weights={prefix}', f'--output={output}',
                   '--overwrite', '--mean_rgb=127.5', '--label_set=none']) == 0
  metadata = pretrained.read_metadata(output)
  assert metadata['mean_rgb'] == [127.5] * 3 and metadata['overridden'] == ['mean_rgb']
  assert metadata['label_set'] is None and metadata['source']['use_ema'] is True
