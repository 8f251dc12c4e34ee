"""Fine-tune an ImageNet-pretrained EfficientNet on CIFAR-100: TFDS `cifar100`, 100 classes.

Paper section 5.3, Table 6 (train / test / classes): 50,000 / 10,000 / 100. Table 5 reports 91.7%
top-1 for fine-tuned B7. TFDS's splits are the paper's.

    python -m efficientnet_jax.main --config=configs/finetune_cifar100.py:b0 \
        --workdir=/tmp/finetune_cifar100 --config.init_from=PRETRAINED_DIR

The argument picks the variant (b0 ... b7, lite0 ... lite4; `,smoke` for a tiny run); the recipe,
and how to make PRETRAINED_DIR, are in docs/training.md.
"""
from efficientnet_jax import configs_lib

NUM_TRAIN_EXAMPLES = 50000
NUM_EVAL_EXAMPLES = 10000


def get_config(arg=None):
  return configs_lib.transfer_config(
      'cifar100', num_classes=100, train_split='train', eval_split='test',
      num_train_examples=NUM_TRAIN_EXAMPLES, arg=arg, cache=True)
