"""Parameter and multiply-add counts: hand-computed toys, an analytic EfficientNet count, the
paper's Table 2 figures and the compound-scaling rule."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax import lax

from efficientnet_jax.complexity import (abstract_variables, count_madds, count_params,
                                         jaxpr_madds, model_complexity)
from efficientnet_jax.models import (VARIANTS, compound_coefficients, create_model, round_filters,
                                     round_repeats)
from efficientnet_jax.models.variants import HEAD_FILTERS, STEM_FILTERS

B_VARIANTS = [f'efficientnet-b{i}' for i in range(8)]


# --- toy modules with hand-computed counts -------------------------------------------------------


class ConvNet(nn.Module):
  features: int = 8
  kernel: int = 3
  stride: int = 1
  groups: int = 1

  @nn.compact
  def __call__(self, x):
    return nn.Conv(self.features, (self.kernel, self.kernel), strides=self.stride,
                   padding='SAME', feature_group_count=self.groups)(x)


@pytest.mark.parametrize('stride, groups, expected', [
    (1, 1, 10 * 10 * 8 * (3 * 3 * 4)),  # 28,800
    (2, 1, 5 * 5 * 8 * (3 * 3 * 4)),    # 7,200: SAME, stride 2 -> 5x5 outputs
    (1, 4, 10 * 10 * 8 * (3 * 3 * 1)),  # 4 groups: one input channel per output
])
def test_single_conv(stride, groups, expected):
  model = ConvNet(stride=stride, groups=groups)
  assert count_madds(model, (1, 10, 10, 4)) == expected
  # Per image: a batch of 3 gives the same number.
  assert count_madds(model, (3, 10, 10, 4)) == expected


def test_single_dense_and_params():
  model = nn.Dense(10)
  assert count_madds(model, (1, 16)) == 16 * 10
  assert count_madds(model, (5, 16)) == 16 * 10
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16)))
  assert count_params(variables) == 16 * 10 + 10
  assert count_params(variables['params']) == 170  # a bare params tree works too
  assert count_params(abstract_variables(model, (1, 16))) == 170
  assert count_madds(model, (1, 16), variables=variables) == 160  # given, concrete variables


def test_params_exclude_batch_stats():
  class ConvBN(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.BatchNorm(use_running_average=True)(nn.Conv(8, (3, 3), use_bias=False)(x))

  variables = abstract_variables(ConvBN(), (1, 8, 8, 4))
  assert set(variables) == {'params', 'batch_stats'}
  assert count_params(variables) == 3 * 3 * 4 * 8 + 2 * 8  # kernel + BN scale/bias


def test_control_flow_and_sub_jaxprs():
  """scan counts `length` times; cond counts its dearest branch; jit, remat and custom
  derivatives are looked into."""
  w = jnp.ones((4, 4))
  step = 2 * 4 * 4  # one (2, 4) @ (4, 4) product

  def f(x):
    x, _ = lax.scan(lambda c, _: (c @ w, None), x, None, length=3)       # 3 steps
    x = lax.cond(x.sum() > 0, lambda a: (a @ w) @ w, lambda a: a, x)     # max: 2 steps
    x = jax.checkpoint(lambda a: a @ w)(x)                                # 1
    x = jax.jit(lambda a: a @ w)(x)                                       # 1

    @jax.custom_vjp
    def g(a):
      return a @ w
    g.defvjp(lambda a: (g(a), a), lambda a, ct: (ct,))
    x = g(x)                                                              # 1

    @jax.custom_jvp
    def h(a):
      return a @ w
    h.defjvp(lambda p, t: (h(p[0]), t[0]))
    return h(x)                                                           # 1

  assert jaxpr_madds(jax.make_jaxpr(f)(jnp.ones((2, 4)))) == 9 * step


def test_nested_flax_transforms():
  """nn.scan and nn.remat over a Dense layer: 4 scanned steps plus one remat'd layer."""
  class Body(nn.Module):
    @nn.compact
    def __call__(self, c, _):
      return nn.Dense(6)(c), None

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x, _ = nn.scan(Body, variable_axes={'params': 0}, split_rngs={'params': True},
                     length=4)()(x, None)
      return nn.remat(nn.Dense)(3)(x)

  assert count_madds(Net(), (1, 6)) == 4 * 6 * 6 + 6 * 3
  assert count_params(abstract_variables(Net(), (1, 6))) == 4 * (36 + 6) + 18 + 3


def test_shard_map_counts_every_instance():
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((4, 2), ('data', 'model'))
  w = jnp.ones((4, 4))
  f = jax.shard_map(lambda a, b: a @ b, mesh=mesh, in_specs=(P('data'), P()),
                    out_specs=P('data'))
  x = jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P('data')))
  # 8 instances (4 x 2 devices), each a (2, 4) @ (4, 4) product; 'model' replicates the work.
  assert jaxpr_madds(jax.make_jaxpr(f)(x, w)) == 8 * 2 * 4 * 4


# --- EfficientNet --------------------------------------------------------------------------------


def analytic_madds(name: str, resolution: int) -> int:
  """EfficientNet's multiply-adds from the block table alone, by hand (no tracing)."""
  spec = VARIANTS[name]
  w, d, lite = spec.width, spec.depth, spec.lite
  stem = STEM_FILTERS if lite else round_filters(STEM_FILTERS, w)
  head = HEAD_FILTERS if lite else round_filters(HEAD_FILTERS, w)
  size = -(-resolution // 2)
  total = size * size * stem * 3 * 3 * 3
  channels = stem
  for stage, b in enumerate(spec.blocks):
    fixed = lite and stage in (0, len(spec.blocks) - 1)
    repeats = b.repeats if fixed else round_repeats(b.repeats, d)
    cin, cout = round_filters(b.in_filters, w), round_filters(b.out_filters, w)
    for i in range(repeats):
      c_in, stride = (cin, b.stride) if i == 0 else (cout, 1)
      # `channels` is what the previous layer made. It equals the nominal c_in except in Lite's
      # block1a, whose stem stays at 32 while c_in = round_filters(32, w); there the expand ratio
      # is 1 and there is no SE, so the block simply runs on 32 channels (as the official code).
      expanded = channels * b.expand_ratio
      if b.expand_ratio != 1:
        total += size * size * channels * expanded
      size = -(-size // stride)
      total += size * size * expanded * b.kernel_size**2
      if b.se_ratio:
        squeezed = max(1, int(c_in * b.se_ratio))
        total += 2 * expanded * squeezed
      total += size * size * expanded * cout
      channels = cout
  return total + size * size * channels * head + head * 1000


@pytest.mark.parametrize('name, resolution', [
    ('efficientnet-b0', 224), ('efficientnet-b4', 380), ('efficientnet-lite3', 280),
    ('efficientnet-b1', 193)])  # an odd size exercises SAME padding's ceil
def test_matches_analytic_count(name, resolution):
  assert model_complexity(name, resolution)['madds'] == analytic_madds(name, resolution)


@pytest.mark.parametrize('name', B_VARIANTS)
def test_paper_table2(name):
  spec = VARIANTS[name]
  result = model_complexity(name)
  assert result['resolution'] == spec.resolution
  assert result['params'] == spec.published_params
  # Measured ratios: B0 0.989, B1 0.981, B2 0.994, B3 1.015, B4 1.046, B5 1.037, B6 1.004,
  # B7 1.020 (the paper rounds to two significant figures).
  assert result['madds'] == pytest.approx(spec.paper_madds, rel=0.05)


def test_b0_exact():
  # Also cross-checked by analytic_madds; the paper rounds this to 0.39B.
  assert model_complexity('efficientnet-b0') == {
      'params': 5_288_548, 'madds': 385_814_752, 'resolution': 224}


def test_conv_impl_does_not_change_the_count():
  xla = create_model('efficientnet-b0', conv_impl='xla')
  cpu = create_model('efficientnet-b0', conv_impl='cpu')
  auto = create_model('efficientnet-b0', conv_impl='auto')
  counts = {m.conv_impl: count_madds(m, 224) for m in (xla, cpu, auto)}
  assert counts == {'xla': 385_814_752, 'cpu': 385_814_752, 'auto': 385_814_752}
  # Why the counter clones to 'xla': traced as is, the CPU path's depthwise convs are
  # elementwise multiplies and would drop out of the count.
  spec = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  variables = abstract_variables(xla, 224)
  raw_cpu = jaxpr_madds(jax.make_jaxpr(cpu.apply)(variables, spec))
  assert raw_cpu < counts['xla']


def test_train_mode_and_bfloat16_count_the_same():
  model = create_model('efficientnet-lite0')
  inference = count_madds(model, 224)
  assert count_madds(model, 224, train=True) == inference
  assert count_madds(create_model('efficientnet-lite0', dtype=jnp.bfloat16), 224) == inference


def test_model_complexity_of_a_module():
  model = create_model('efficientnet-b0', num_classes=10)
  result = model_complexity(model, 224)
  assert result['resolution'] == 224
  assert result['params'] == 5_288_548 - 1280 * 990 - 990
  assert result['madds'] == 385_814_752 - 1280 * 990
  assert model_complexity('efficientnet-b0', num_classes=10) == result
  with pytest.raises(ValueError, match='resolution'):
    model_complexity(model)
  with pytest.raises(ValueError, match='Valid names'):
    model_complexity('efficientnet-b9')


# --- compound scaling ----------------------------------------------------------------------------


def phi_madds(phi: float) -> int:
  depth, width, res = compound_coefficients(phi)
  resolution = int(round(224 * res))
  return count_madds(create_model('efficientnet-b0', width=width, depth=depth), resolution)


def test_phi_one_doubles_flops_roughly():
  assert compound_coefficients(1) == (1.2, 1.1, 1.15)
  b0, phi1 = phi_madds(0), phi_madds(1)
  assert b0 == 385_814_752
  # The continuous rule predicts alpha * beta^2 * gamma^2 = 1.92x. Measured: 2.573x
  # (0.993B at 258 px), because ceil() on the repeats makes phi=1's depth 23/16 blocks
  # (1.48x of the MACs) instead of 1.2x; the paper's own B2/B0 = 1.0B/0.39B = 2.56x agrees.
  ratio = phi1 / b0
  assert 2.4 < ratio < 2.7
  assert ratio == pytest.approx(1.0 / 0.39, rel=0.05)
  # Over a longer span the rounding washes out: (MACs(phi=4) / MACs(0))^(1/4) = 2.012.
  per_unit = (phi_madds(4) / b0)**0.25
  assert 1.8 < per_unit < 2.3


def test_fractional_and_negative_phi_are_monotone():
  counts = [phi_madds(phi) for phi in (-1, 0, 0.5, 1)]
  # Measured: 0.302B, 0.386B, 0.731B, 0.993B.
  assert counts == sorted(counts) and len(set(counts)) == 4
  assert math.isclose(counts[1], 385_814_752)
