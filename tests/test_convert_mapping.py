"""The walk every converter shares: expected modules, network order, problem listings, inference.

The per-format tests (test_convert_{keras,torch,timm,tf}.py) check real checkpoints; this one
checks the shared mechanism on a synthetic PyTorch-named checkpoint.
"""
import numpy as np
import pytest

from efficientnet_jax.convert.mapping import ConversionError, convert_tensors, expected_modules
from efficientnet_jax.convert.torch import TORCH_LAYOUT
from efficientnet_jax.models import VARIANTS, create_model
from efficientnet_jax.models.naming import infer_model_name
from efficientnet_jax.models.scaling import stem_head_filters


def torch_tensors(model_name):
  """A state dict with the efficientnet_pytorch names and PyTorch layouts of our variables."""
  tensors = {}
  for module in expected_modules(model_name):
    layer = TORCH_LAYOUT.layer_name(module)
    for (collection, var), shape in module.variables.items():
      weight = TORCH_LAYOUT.weight_names[module.kind][(collection, var)]
      axes = TORCH_LAYOUT.axes[module.kind]
      value = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
      # Our layout -> PyTorch's: the inverse of the converter's transpose.
      inverse = axes and value.ndim == len(axes)
      tensors[f'{layer}.{weight}'] = value.transpose(np.argsort(axes)) if inverse else value
  return tensors


def test_expected_modules_are_in_network_order():
  modules = expected_modules('efficientnet-b0')
  paths = ['/'.join(m.path) for m in modules]
  assert paths[:2] == ['stem_conv', 'stem_bn'] and paths[-3:] == ['top_conv', 'top_bn',
                                                                   'predictions']
  assert paths[2:8] == ['block1a/dwconv', 'block1a/bn', 'block1a/se_reduce', 'block1a/se_expand',
                        'block1a/project_conv', 'block1a/project_bn']
  assert paths[8] == 'block2a/expand_conv'
  blocks = sorted({m.block.index for m in modules if m.block})
  assert blocks == list(range(16))
  assert {m.kind for m in modules} == {'conv', 'depthwise', 'bn', 'dense'}


def test_round_trip_and_problem_listing():
  tensors = torch_tensors('efficientnet-b0')
  variables = convert_tensors(tensors, TORCH_LAYOUT, 'efficientnet-b0', 1000, source='synthetic')
  assert variables['params']['block2a']['dwconv']['kernel'].shape == (3, 3, 1, 96)

  broken = dict(tensors)
  del broken['_blocks.3._bn1.running_var']  # missing
  broken['_bn0.weight'] = np.zeros(5, np.float32)  # mis-shaped, the earliest problem
  broken['_blocks.20._bn0.weight'] = np.zeros(5, np.float32)  # left over, after our last block
  with pytest.raises(ConversionError) as err:
    convert_tensors(broken, TORCH_LAYOUT, 'efficientnet-b0', 1000, source='synthetic')
  problems = err.value.problems
  assert problems[0] == ('shape mismatch: _bn0.weight is (5,), expected (32,) (our '
                         'stem_bn/scale)')
  assert problems[1].startswith("missing: _blocks.3._bn1.running_var (for our batch_stats "
                                'block3a/bn/var (144,))')
  assert problems[2].startswith('unused: PyTorch weight _blocks.20._bn0.weight (5,)')
  assert 'synthetic into efficientnet-b0 with 1000 classes: 3 problem(s)' in str(err.value)


def test_long_listings_are_summarised():
  with pytest.raises(ConversionError) as err:
    convert_tensors(torch_tensors('efficientnet-b0'), TORCH_LAYOUT, 'efficientnet-b1', 1000,
                    source='synthetic')
  assert len(str(err.value).splitlines()) == 1 + 12 + 2  # header, 12 problems, '... more', advice
  assert f'... and {len(err.value.problems) - 12} more' in str(err.value)


@pytest.mark.parametrize('per_stage', [True, False])
def test_every_variant_is_inferred_from_its_structure(per_stage):
  for name in VARIANTS:
    model = create_model(name)
    plan = [r for r, _ in model.stage_plan()]
    stem, head = stem_head_filters(model.width_coefficient, model.fix_stem_head)
    head_in = model.stage_plan()[-1][1].out_filters
    assert infer_model_name(stem_filters=stem, head_filters=head, head_in_filters=head_in,
                            repeats=plan if per_stage else sum(plan),
                            has_se=not model.fix_stem_head, source='x') == name
  with pytest.raises(ConversionError, match='Cannot tell which EfficientNet x is: no variant'):
    infer_model_name(stem_filters=32, head_filters=1280, head_in_filters=320, repeats=99,
                     has_se=True, source='x', error=ConversionError)
