"""Fine-tune an ImageNet-pretrained EfficientNet on Flowers: TFDS `oxford_flowers102`, 102 classes.

Paper section 5.3, Table 6 (train / test / classes): 2,040 / 6,149 / 102. Table 5 reports 98.8%
top-1 for fine-tuned B7. The paper's 2,040 training images are TFDS's train and validation splits
together (1,020 each); its 6,149 test images are TFDS's test split.

    python -m efficientnet_jax.main --config=configs/finetune_oxford_flowers102.py:b0 \
        --workdir=/tmp/finetune_oxford_flowers102 --config.init_from=PRETRAINED_DIR

The argument picks the variant (b0 ... b7, lite0 ... lite4; `,smoke` for a tiny run); the recipe,
and how to make PRETRAINED_DIR, are in docs/training.md.
"""
from efficientnet_jax import configs_lib

NUM_TRAIN_EXAMPLES = 2040
NUM_EVAL_EXAMPLES = 6149


def get_config(arg=None):
  return configs_lib.transfer_config(
      'oxford_flowers102', num_classes=102, train_split='train+validation', eval_split='test',
      num_train_examples=NUM_TRAIN_EXAMPLES, arg=arg)
