"""The paper's ImageNet recipe for EfficientNet-B0: the base every other config overrides.

Launch (Cloud TPU VM or pod slice, ImageNet prepared under data_dir):

  python -m efficientnet_jax.main --config=configs/default.py --workdir=gs://BUCKET/b0 \
      --config.data_dir=gs://BUCKET/tensorflow_datasets

`get_config('smoke')` gives a tiny local version of the same experiment (small resolution, a
few steps), in the big_vision style: `--config=configs/default.py:smoke`.
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the full paper recipe; `arg='smoke'` shrinks it for a local smoke run."""
  config = ml_collections.ConfigDict()

  # --- Model -------------------------------------------------------------------------------
  # The family and block table come from `model`; the compound coefficients below are explicit
  # so a new variant (another phi, another alpha/beta/gamma) is a new config, not a code change.
  config.model = 'efficientnet-b0'
  # Width multiplier beta^phi applied to every channel count (rounded to multiples of 8).
  config.width = 1.0
  # Depth multiplier alpha^phi applied to every stage's repeat count (rounded up).
  config.depth = 1.0
  # Input resolution gamma^phi * 224 in pixels, for training and evaluation.
  config.resolution = 224
  # Dropout before the classifier.
  config.dropout = 0.2
  # Stochastic depth: the last block's drop rate; block i of N drops with rate * i / N.
  config.drop_connect_rate = 0.2
  # Number of output classes; must match the dataset's label count.
  config.num_classes = 1000
  # Stride of the stem conv; 1 keeps more resolution for tiny images (the digits quickstart).
  config.stem_stride = 2
  # BatchNorm momentum in the TF convention (running = momentum * running + (1-momentum) * batch).
  config.bn_momentum = 0.99
  # BatchNorm epsilon; TF's value, not Flax's 1e-5.
  config.bn_epsilon = 1e-3
  # Examples per BatchNorm statistics group; 0 means the whole global batch (synchronised BN).
  config.bn_group_size = 0
  # Compute dtype of activations: 'float32' or 'bfloat16' (parameters, loss, logits stay float32).
  config.dtype = 'float32'
  # Convolution implementation: 'auto' (fast path on CPU, XLA's conv on TPU/GPU), 'xla', 'cpu'.
  config.conv_impl = 'auto'

  # --- Data --------------------------------------------------------------------------------
  # TFDS name, 'digits' for the offline quickstart, or 'folder:/path' for class-named folders.
  config.dataset = 'imagenet2012'
  # TFDS data_dir holding prepared datasets (may be gs://); None uses TFDS's default.
  config.data_dir = ml_collections.config_dict.placeholder(str)
  # Where the ILSVRC2012 tar files were placed for TFDS to prepare imagenet2012.
  config.manual_dir = ml_collections.config_dict.placeholder(str)
  # Split to train on (TFDS split syntax).
  config.train_split = 'train'
  # Split to evaluate on; every example is evaluated (the last batch is padded and masked).
  config.eval_split = 'validation'
  # Training examples held out as 'minival' (the paper used 25,000); 0 disables.
  config.holdout_examples = 0
  # When holding out, evaluate on the minival split instead of eval_split.
  config.eval_on_holdout = False
  # Train-time crop: 'inception' (random-area crop), 'pad_and_crop' (+-4 px shifts), 'none'.
  config.train_crop = 'inception'
  # Pixels of padding around the eval center crop: crop = res / (res + crop_padding) * min(h, w).
  config.crop_padding = 32
  # Resize interpolation for train and eval.
  config.interpolation = 'bicubic'
  # Random horizontal flips in training (off for digits, where mirroring changes the class).
  config.random_flip = True
  # Augmentation on uint8 images: 'autoaugment' (policy v0), 'randaugment' or 'none'.
  config.augment = 'autoaugment'
  # RandAugment: number of ops per image.
  config.randaugment_num_layers = 2
  # RandAugment: magnitude (paper's later recipe uses 9..28 by model size).
  config.randaugment_magnitude = 9
  # Examples in the tf.data shuffle buffer.
  config.shuffle_buffer_size = 16_384
  # Keep decoded data in memory after the first epoch (only for small datasets).
  config.cache = False
  # Batches prefetched onto the accelerator ahead of the train step.
  config.prefetch_batches = 2
  # Contiguous shards the data is cut into; each process reads data_shards / process_count of
  # them. 0 means one per process. Fixing it makes the global batches (and so the loss curve)
  # independent of the number of processes the same devices are split into.
  config.data_shards = 0

  # --- Transfer learning (paper section 5.3) ---------------------------------------------------
  # A pretrained directory (`python -m efficientnet_jax.convert ... --output=DIR`) to start from
  # instead of a random initialisation; None trains from scratch. Used only by a fresh run: a
  # run resuming from its workdir's own checkpoint ignores it. Its model, width and depth must be
  # this config's; a classifier for a different num_classes is re-initialised.
  # A typed placeholder (None until set), so --config.init_from=DIR parses as a string.
  config.init_from = ml_collections.config_dict.placeholder(str)
  # Train only the classifier head: the backbone's weights and BatchNorm statistics stay as
  # loaded (the backbone runs in inference mode, which also turns the head's dropout off).
  config.freeze_backbone = False
  # The backbone's learning rate as a fraction of the head's (e.g. 0.1); 1.0 treats both alike.
  config.backbone_learning_rate_multiplier = 1.0

  # --- Optimisation ------------------------------------------------------------------------
  # 'rmsprop' (TF-style, the paper's), 'sgd' (Nesterov momentum) or 'adamw'.
  config.optimizer = 'rmsprop'
  # Learning rate per `lr_batch_size` examples; scaled linearly with the global batch.
  config.learning_rate = 0.016
  # Batch size the base learning rate refers to.
  config.lr_batch_size = 256
  # 'exponential' (x decay_rate every decay_epochs), 'cosine' or 'constant', after warmup.
  config.lr_schedule = 'exponential'
  # Epochs of linear warmup from 0.
  config.warmup_epochs = 5.0
  # Exponential schedule: multiply by this every lr_decay_epochs.
  config.lr_decay_rate = 0.97
  # Exponential schedule: epochs between decays.
  config.lr_decay_epochs = 2.4
  # Exponential schedule: decay in steps (True, the paper's) or continuously.
  config.lr_staircase = True
  # RMSProp decay of the mean-square accumulator.
  config.rmsprop_decay = 0.9
  # RMSProp epsilon, added inside the square root as TF1 does.
  config.rmsprop_epsilon = 1e-3
  # Momentum for RMSProp and SGD; AdamW's beta1.
  config.momentum = 0.9
  # AdamW's beta2.
  config.adam_b2 = 0.999
  # L2 weight decay on all non-BatchNorm weights (coupled, like 1e-5 * 1/2||w||^2 in the loss;
  # decoupled for AdamW).
  config.weight_decay = 1e-5
  # Label smoothing of the cross-entropy targets.
  config.label_smoothing = 0.1
  # EMA decay of parameters and BN statistics, ramped as min(decay, (1+t)/(10+t)); 0 disables.
  config.ema_decay = 0.9999
  # Also evaluate the raw (non-EMA) weights when EMA is on.
  config.eval_raw_weights = True
  # Micro-batches per step (gradient accumulation) to fit large global batches on small slices.
  config.grad_accum_steps = 1
  # Global gradient-norm clip; 0 disables.
  config.grad_clip_norm = 0.0

  # --- Parallelism ---------------------------------------------------------------------------
  # Shard parameters and optimiser state over the 'data' axis (FSDP) instead of replicating.
  config.fsdp = False
  # Only shard arrays with at least this many elements when fsdp is on.
  config.fsdp_min_size = 2**16

  # --- Loop --------------------------------------------------------------------------------
  # Global batch size across all devices and hosts (must divide by the device count).
  config.batch_size = 4096
  # Global evaluation batch size.
  config.eval_batch_size = 1024
  # Training length in epochs.
  config.num_epochs = 350.0
  # Training length in steps; overrides num_epochs when > 0.
  config.num_train_steps = -1
  # Evaluate every this many steps; -1 means once per epoch.
  config.eval_every_steps = -1
  # Log training metrics every this many steps.
  config.log_every_steps = 100
  # Save a checkpoint every this many steps (and always at the end).
  config.checkpoint_every_steps = 1000
  # Checkpoints to keep.
  config.keep_checkpoints = 3
  # Write a profile of a few steps to the workdir (clu periodic_actions.Profile).
  config.profile = False
  # Random seed for initialisation, dropout and the data order.
  config.seed = 0

  if arg:
    _apply_arg(config, arg)
  # Locked: assigning a field that does not exist (a typo) raises instead of adding a new key.
  config.lock()
  return config


def variant_config(model: str, *, width: float, depth: float, resolution: int, dropout: float,
                   batch_size: int, arg: str | None = None,
                   **overrides) -> ml_collections.ConfigDict:
  """The paper recipe for one variant: its compound coefficients and batch size, stated explicitly.

  Used by configs/b0.py ... lite4.py. `overrides` set any further field (e.g. fsdp=True).
  """
  config = get_config()  # locked
  config.model = model
  config.width = width
  config.depth = depth
  config.resolution = resolution
  config.dropout = dropout
  config.batch_size = batch_size
  for key, value in overrides.items():
    setattr(config, key, value)  # the config is locked: a mistyped key raises
  if arg:
    _apply_arg(config, arg)
  return config


# Variants a transfer config's argument may name: 'b0' ... 'b7', 'lite0' ... 'lite4'.
TRANSFER_VARIANTS = tuple(f'b{i}' for i in range(8)) + tuple(f'lite{i}' for i in range(5))


def transfer_config(dataset: str, *, num_classes: int, train_split: str, eval_split: str,
                    num_train_examples: int, arg: str | None = None,
                    default_variant: str = 'b0', **overrides) -> ml_collections.ConfigDict:
  """Fine-tuning an ImageNet-pretrained variant on another dataset (paper section 5.3).

  Used by configs/finetune_*.py. `arg` is a comma-separated list of a variant ('b0' ... 'b7',
  'lite0' ... 'lite4'; `default_variant` if none) and optionally 'smoke', e.g. 'lite0,smoke'.
  The variant sets model, width, depth, resolution and dropout from the model zoo, so they
  match the converted weights passed as --config.init_from.

  The paper names the datasets and fine-tunes ImageNet-trained checkpoints, but does not list
  its fine-tuning hyperparameters. These are a common fine-tuning recipe, our choice: SGD with
  Nesterov momentum 0.9, batch 256, learning rate 0.01 with a linear warmup over the first 5% of
  10,000 steps then cosine decay to 0, weight decay 1e-5 and label smoothing 0.1 as in the
  ImageNet recipe, EMA 0.999, the Inception crop and flips without AutoAugment, and images
  resized to the variant's resolution (CIFAR's 32 px images are upscaled).
  """
  from efficientnet_jax.models import get_variant  # pylint: disable=import-outside-toplevel

  tokens = [t.strip() for t in (arg or '').split(',') if t.strip()]
  unknown = [t for t in tokens if t not in TRANSFER_VARIANTS + ('smoke',)]
  variants = [t for t in tokens if t in TRANSFER_VARIANTS]
  if unknown or len(variants) > 1:
    raise ValueError(
        f'Unknown config argument {arg!r}. Valid arguments: one variant of '
        f'{", ".join(TRANSFER_VARIANTS)} and/or \'smoke\', comma-separated (e.g. \'lite0,smoke\').')
  spec = get_variant(f'efficientnet-{variants[0] if variants else default_variant}')

  config = get_config()  # locked
  config.model = spec.name
  config.width = spec.width
  config.depth = spec.depth
  config.resolution = spec.resolution
  config.dropout = spec.dropout
  config.dataset = dataset
  config.num_classes = num_classes
  config.train_split = train_split
  config.eval_split = eval_split

  config.optimizer = 'sgd'
  config.momentum = 0.9
  config.batch_size = 256
  config.eval_batch_size = 512
  config.learning_rate = 0.01
  config.lr_batch_size = 256
  config.lr_schedule = 'cosine'
  config.num_train_steps = 10_000
  steps_per_epoch = num_train_examples / config.batch_size
  config.warmup_epochs = 0.05 * config.num_train_steps / steps_per_epoch
  config.weight_decay = 1e-5
  config.label_smoothing = 0.1
  config.ema_decay = 0.999
  config.augment = 'none'
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 1000
  config.log_every_steps = 100
  for key, value in overrides.items():
    setattr(config, key, value)  # the config is locked: a mistyped key raises
  if 'smoke' in tokens:
    _apply_arg(config, 'smoke')
  return config


def _apply_arg(config: ml_collections.ConfigDict, arg: str) -> None:
  """Applies a big_vision style config argument, e.g. 'smoke'."""
  if arg == 'smoke':
    # Same experiment, shrunk to run in a minute on a laptop CPU or under tfds mock data.
    config.resolution = 64
    config.batch_size = 16
    config.eval_batch_size = 16
    config.num_train_steps = 4
    config.eval_every_steps = 4
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.shuffle_buffer_size = 64
    config.augment = 'none'
  else:
    raise ValueError(f"Unknown config argument {arg!r}. Valid arguments: 'smoke'.")
