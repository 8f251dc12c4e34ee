"""Fine-tune an ImageNet-pretrained EfficientNet on birds: TFDS `caltech_birds2011`, 200 species.

Paper section 5.3, Table 6 (train / test / classes): 47,386 / 2,443 / 500 (Birdsnap). Table 5
reports 84.3% top-1 for fine-tuned B7. The paper's bird dataset is Birdsnap, which TFDS does not
have; Caltech-UCSD Birds-200-2011 (5,994 train / 5,794 test, 200 species) is the closest
fine-grained bird dataset in TFDS, so its numbers are not comparable with the paper's Birdsnap
result.

    python -m efficientnet_jax.main --config=configs/finetune_caltech_birds2011.py:b0 \
        --workdir=/tmp/finetune_caltech_birds2011 --config.init_from=PRETRAINED_DIR

The argument picks the variant (b0 ... b7, lite0 ... lite4; `,smoke` for a tiny run); the recipe,
and how to make PRETRAINED_DIR, are in docs/training.md.
"""
from efficientnet_jax import configs_lib

NUM_TRAIN_EXAMPLES = 5994
NUM_EVAL_EXAMPLES = 5794


def get_config(arg=None):
  return configs_lib.transfer_config(
      'caltech_birds2011', num_classes=200, train_split='train', eval_split='test',
      num_train_examples=NUM_TRAIN_EXAMPLES, arg=arg)
