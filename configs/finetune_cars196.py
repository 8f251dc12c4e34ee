"""Fine-tune an ImageNet-pretrained EfficientNet on Stanford Cars: TFDS `cars196`, 196 classes.

Paper section 5.3, Table 6 (train / test / classes): 8,144 / 8,041 / 196. Table 5 reports 94.7%
top-1 for fine-tuned B7. TFDS's splits are the paper's.

    python -m efficientnet_jax.main --config=configs/finetune_cars196.py:b0 \
        --workdir=/tmp/finetune_cars196 --config.init_from=PRETRAINED_DIR

The argument picks the variant (b0 ... b7, lite0 ... lite4; `,smoke` for a tiny run); the recipe,
and how to make PRETRAINED_DIR, are in docs/training.md.
"""
from efficientnet_jax import configs_lib

NUM_TRAIN_EXAMPLES = 8144
NUM_EVAL_EXAMPLES = 8041


def get_config(arg=None):
  return configs_lib.transfer_config(
      'cars196', num_classes=196, train_split='train', eval_split='test',
      num_train_examples=NUM_TRAIN_EXAMPLES, arg=arg)
