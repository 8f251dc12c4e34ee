"""Fine-tune an ImageNet-pretrained EfficientNet on CIFAR-10: TFDS `cifar10`, 10 classes.

Paper section 5.3, Table 6 (train / test / classes): 50,000 / 10,000 / 10. Table 5 reports 98.9%
top-1 for fine-tuned B7. TFDS's splits are the paper's.

    python -m efficientnet_jax.main --config=configs/finetune_cifar10.py:b0 \
        --workdir=/tmp/finetune_cifar10 --config.init_from=PRETRAINED_DIR

The argument picks the variant (b0 ... b7, lite0 ... lite4; `,smoke` for a tiny run); the recipe,
and how to make PRETRAINED_DIR, are in docs/training.md.
"""
from efficientnet_jax import configs_lib

NUM_TRAIN_EXAMPLES = 50000
NUM_EVAL_EXAMPLES = 10000


def get_config(arg=None):
  return configs_lib.transfer_config(
      'cifar10', num_classes=10, train_split='train', eval_split='test',
      num_train_examples=NUM_TRAIN_EXAMPLES, arg=arg, cache=True)
