"""The search space (efficientnet_jax/search/space.py) and the block strings it writes.

The published networks are points of the default space, checked by building what their choice
vectors decode to and counting parameters against the published models (shapes only: nothing is
computed).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from efficientnet_jax import complexity
from efficientnet_jax.models import B0_BLOCKS, create_model, decode_block_string
from efficientnet_jax.models.mobilenet import MOBILENET_V2_BLOCKS
from efficientnet_jax.models.variants import BlockArgs, block_table_digest, decode_blocks
from efficientnet_jax.search import space as space_lib
from efficientnet_jax.search.space import DECISIONS, default_space, network_key


def params_of(blocks) -> int:
  return complexity.count_params(complexity.abstract_variables(
      create_model('efficientnet-b0', blocks=blocks), 224))


@pytest.mark.parametrize('reference, published', [
    ('efficientnet-b0', 5_288_548),   # REFERENCE.md, the official, Keras and timm count
    ('mobilenet-v2', 3_504_872),      # torchvision / Keras MobileNetV2 (1.0, 224)
    # timm's semnasnet_100, MnasNet-A1; the MnasNet paper gives 3.9M and 312M multiply-adds.
    ('mnasnet-a1', 3_887_038),
])
def test_published_networks_decode_to_their_parameter_counts(reference, published):
  space = default_space()
  table = space_lib.REFERENCE_TABLES[reference]
  choices = space.encode(table)
  decoded = space.decode(choices)
  assert decoded == tuple(table)  # every field, in_filters included
  assert params_of(decoded) == published
  if reference == 'mobilenet-v2':  # the same count as the MobileNetV2 module itself
    assert complexity.model_complexity('mobilenet-v2')['params'] == published


def test_b0_choice_vector_reads_as_the_paper_describes_it():
  space = default_space()
  params = space.params(space.encode(B0_BLOCKS))
  assert [params[f'block{b}_conv_op'] for b in range(1, 8)] == ['dconv'] + ['mbconv6'] * 6
  assert [params[f'block{b}_kernel_size'] for b in range(1, 8)] == [3, 3, 5, 3, 5, 5, 3]
  assert {params[f'block{b}_se_ratio'] for b in range(1, 8)} == {0.25}
  assert {params[f'block{b}_skip'] for b in range(1, 8)} == {'identity'}
  assert [params[f'block{b}_filters'] for b in range(1, 8)] == [16, 24, 40, 80, 112, 192, 320]
  assert [params[f'block{b}_layers'] for b in range(1, 8)] == [1, 2, 2, 3, 3, 4, 1]


def test_default_space_options():
  # MobileNetV2's filters x {0.75, 1, 1.25} to the nearest multiple of 8 (ties away from the
  # count: 0.75 x 16 = 12 -> 8), plus B0's 112 and 192; MobileNetV2's layers + {-1, 0, 1}.
  space = default_space()
  assert [b.stride for b in space.blocks] == [1, 2, 2, 2, 1, 2, 1]
  assert [b.filters for b in space.blocks] == [
      (8, 16, 24), (16, 24, 32), (24, 32, 40), (48, 64, 80), (72, 96, 112, 120),
      (120, 160, 192, 200), (240, 320, 400)]
  assert [b.layers for b in space.blocks] == [
      (0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 5), (2, 3, 4), (2, 3, 4), (0, 1, 2)]
  # MnasNet's 432 choices per block (4 conv ops x 2 kernels x 2 SE x 3 skips x 3 x 3).
  assert [b.size for b in space.blocks] == [432, 432, 432, 432, 576, 576, 432]
  assert space.size == 432**5 * 576**2
  assert len(space.dimensions) == 7 * len(DECISIONS)
  assert space.dimensions[0].name == 'block1_conv_op'


def test_encode_decode_round_trip_on_random_points():
  space = default_space()
  rng = np.random.default_rng(0)
  for _ in range(200):
    choices = tuple(int(rng.integers(n)) for n in space.option_counts)
    blocks = space.decode(choices)
    assert space.encode(blocks) == choices
    strings = [b.encode() for b in blocks]
    assert decode_blocks(strings) == blocks
    assert space.choices_from_params(space.params(choices)) == choices


def test_decode_chains_filters_past_empty_blocks():
  space = default_space()
  choices = list(space.encode(B0_BLOCKS))
  choices[DECISIONS.index('layers')] = 0  # block 1 has no layers: block 2 reads the stem
  blocks = space.decode(choices)
  assert blocks[0].repeats == 0 and blocks[1].in_filters == 32


def test_encode_names_what_is_not_in_the_space():
  table = list(B0_BLOCKS)
  table[2] = dataclasses.replace(table[2], kernel_size=7)
  table[5] = dataclasses.replace(table[5], expand_ratio=4)
  with pytest.raises(ValueError, match=r"block 3: kernel_size 7 is not one of \(3, 5\).*"
                                       r"block 6: conv_op .*expand ratio 4"):
    default_space().encode(table)
  with pytest.raises(ValueError, match='The space has 7 blocks; the table has 2'):
    default_space().encode(B0_BLOCKS[:2])


def test_bad_choice_vectors_and_parameters():
  space = default_space()
  with pytest.raises(ValueError, match='A choice vector of this space has 42 entries'):
    space.decode([0] * 41)
  with pytest.raises(ValueError, match='A choice vector of this space'):
    space.decode([9] * 42)
  with pytest.raises(ValueError, match='not a point of this space.*another space'):
    space.choices_from_params({'block1_conv_op': 'dconv'})


def test_slice_fixes_the_other_decisions_at_the_reference():
  space = default_space().slice(B0_BLOCKS, blocks=(2, 3), decisions=('conv_op', 'kernel_size'))
  assert space.size == (4 * 2)**2
  assert sum(n > 1 for n in space.option_counts) == 4
  assert space.decode(space.encode(B0_BLOCKS)) == B0_BLOCKS
  with pytest.raises(ValueError, match=r"Unknown decision\(s\) or block\(s\) \['kernel', 9\]"):
    default_space().slice(B0_BLOCKS, blocks=(9,), decisions=('kernel',))
  assert space.fingerprint() != default_space().fingerprint()


def test_block_choices_validation():
  with pytest.raises(ValueError, match='needs at least one layer'):
    space_lib.BlockChoices(stride=2, filters=(16,), layers=(0, 1))
  with pytest.raises(ValueError, match='Unknown conv op or skip'):
    space_lib.BlockChoices(stride=1, filters=(16,), layers=(1,), conv_op=('sep',))
  with pytest.raises(ValueError, match='distinct and not empty'):
    space_lib.BlockChoices(stride=1, filters=(16, 16), layers=(1,))


def test_network_key_identifies_the_built_network():
  # An identity skip on a one-layer block that changes its width is no skip; a block without
  # layers has no other choice that matters; channel rounding at width 0.5 merges filters.
  blocks = list(B0_BLOCKS)
  key = network_key(blocks, 1.0, 1.0)
  assert key.split()[0] == 'r1_k3_s11_e1_i32_o16_se0.25_noskip'
  assert network_key([dataclasses.replace(blocks[0], skip='none')] + blocks[1:], 1.0, 1.0) == key
  # A pooling skip over layers that keep their shape is the identity.
  six = dataclasses.replace(blocks[6], in_filters=320, skip='pool', stride=1)
  seven = blocks[:6] + [dataclasses.replace(blocks[6], out_filters=192)]
  assert network_key(seven, 1.0, 1.0) == network_key(
      blocks[:6] + [dataclasses.replace(six, out_filters=192, in_filters=192)], 1.0, 1.0)
  empty = [dataclasses.replace(blocks[0], repeats=0)] + blocks[1:]
  assert network_key(empty, 1.0, 1.0) == network_key(
      [dataclasses.replace(empty[0], kernel_size=5, se_ratio=0.0)] + blocks[1:], 1.0, 1.0)
  assert network_key(empty, 1.0, 1.0).split()[0] == 'r2_k3_s22_e6_i32_o24_se0.25'
  wide = [dataclasses.replace(blocks[1], out_filters=30)]
  assert network_key(blocks[:1] + wide + blocks[2:], 0.5, 0.25) == network_key(
      blocks[:1] + [dataclasses.replace(blocks[1], out_filters=32)] + blocks[2:], 0.5, 0.25)
  assert space_lib.network_name(key).startswith('net-') and len(space_lib.network_name(key)) == 16


def test_nearest_multiple_of_8():
  assert space_lib.nearest_multiple_of_8(18, away_from=24) == 16
  assert space_lib.nearest_multiple_of_8(12, away_from=16) == 8
  assert space_lib.nearest_multiple_of_8(20, away_from=16) == 24
  assert space_lib.nearest_multiple_of_8(150, away_from=120) == 152


# --- Block strings: the conv type and the skip ---------------------------------------------------


@pytest.mark.parametrize('string, conv_type, skip', [
    ('r1_k3_s11_e1_i32_o16_se0.25', 'depthwise', 'identity'),
    ('r1_k3_s11_e1_i32_o16_noskip', 'depthwise', 'none'),   # the official MnasNet token
    ('r2_k5_s22_e1_i16_o24_c1_se0.25', 'regular', 'identity'),
    ('r2_k5_s22_e3_i16_o24_c1_se0_poolskip', 'regular', 'pool'),
])
def test_conv_type_and_skip_tokens(string, conv_type, skip):
  args = decode_block_string(string)
  assert (args.conv_type, args.skip) == (conv_type, skip)
  assert decode_block_string(args.encode()) == args


def test_existing_block_strings_are_unchanged():
  for args in B0_BLOCKS + MOBILENET_V2_BLOCKS:
    assert (args.conv_type, args.skip) == ('depthwise', 'identity')
    assert '_c' not in args.encode() and 'skip' not in args.encode()
  assert BlockArgs(1, 3, 1, 1, 32, 16, 0.25).encode() == 'r1_k3_s11_e1_i32_o16_se0.25'


def test_bad_conv_type_and_skip():
  with pytest.raises(ValueError, match=r"Unknown conv_type 'grouped'; valid values: depthwise"):
    BlockArgs(1, 3, 1, 1, 32, 16, 0.25, conv_type='grouped')
  with pytest.raises(ValueError, match=r"Unknown skip 'dense'; valid values: identity, pool"):
    BlockArgs(1, 3, 1, 1, 32, 16, 0.25, skip='dense')
  with pytest.raises(ValueError, match=r"Cannot parse block string.*\[_noskip\|_poolskip\]"):
    decode_block_string('r1_k3_s11_e1_i32_o16_c2')
  with pytest.raises(TypeError, match='not one block'):
    decode_blocks('r1_k3_s11_e1_i32_o16')


def test_create_model_takes_block_strings_and_digest_names_tables():
  strings = [b.encode() for b in B0_BLOCKS]
  assert create_model('efficientnet-b0', blocks=strings).blocks == B0_BLOCKS
  assert block_table_digest(strings) == block_table_digest(B0_BLOCKS)
  assert block_table_digest(strings) != block_table_digest(strings[::-1])
