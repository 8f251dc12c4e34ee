"""Fine-tune an ImageNet-pretrained EfficientNet on Pets: TFDS `oxford_iiit_pet`, 37 breeds.

Paper section 5.3, Table 6 (train / test / classes): 3,680 / 3,369 / 37. Table 5 reports 95.4%
top-1 for fine-tuned B6. TFDS's train split is the paper's 3,680 images. Its test split has 3,669
images; the paper's table says 3,369, which looks like a typo for the same official test list.

    python -m efficientnet_jax.main --config=configs/finetune_oxford_iiit_pet.py:b0 \
        --workdir=/tmp/finetune_oxford_iiit_pet --config.init_from=PRETRAINED_DIR

The argument picks the variant (b0 ... b7, lite0 ... lite4; `,smoke` for a tiny run); the recipe,
and how to make PRETRAINED_DIR, are in docs/training.md.
"""
from efficientnet_jax import configs_lib

NUM_TRAIN_EXAMPLES = 3680
NUM_EVAL_EXAMPLES = 3669


def get_config(arg=None):
  return configs_lib.transfer_config(
      'oxford_iiit_pet', num_classes=37, train_split='train', eval_split='test',
      num_train_examples=NUM_TRAIN_EXAMPLES, arg=arg)
