"""Fine-tune an ImageNet-pretrained EfficientNet on Food-101: TFDS `food101`, 101 classes.

Paper section 5.3, Table 6 (train / test / classes): 75,750 / 25,250 / 101. Table 5 reports 93.0%
top-1 for fine-tuned B7. TFDS calls the official 25,250-image test set 'validation'.

    python -m efficientnet_jax.main --config=configs/finetune_food101.py:b0 \
        --workdir=/tmp/finetune_food101 --config.init_from=PRETRAINED_DIR

The argument picks the variant (b0 ... b7, lite0 ... lite4; `,smoke` for a tiny run); the recipe,
and how to make PRETRAINED_DIR, are in docs/training.md.
"""
from efficientnet_jax import configs_lib

NUM_TRAIN_EXAMPLES = 75750
NUM_EVAL_EXAMPLES = 25250


def get_config(arg=None):
  return configs_lib.transfer_config(
      'food101', num_classes=101, train_split='train', eval_split='validation',
      num_train_examples=NUM_TRAIN_EXAMPLES, arg=arg)
