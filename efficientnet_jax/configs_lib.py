"""What every file in configs/ is built from: the paper's recipe and the helpers that vary it.

Config files import this module (never each other), so `--config=configs/b7.py` loads from any
working directory and a fact is stated once:

* `base_config()` is the paper's ImageNet recipe, field by field with a comment per group.
* `variant_config(...)` is one named variant under that recipe (configs/b0.py ... l2.py).
* `transfer_config(...)` fine-tunes a pretrained variant on another dataset (finetune_*.py).
* `digits_config()` is the offline quickstart recipe; `quick_study_recipe()` shrinks it for the
  studies' `--quick` runs.
* `apply_arguments(...)` handles big_vision style arguments such as `:smoke`.

The model's compound coefficients (width, depth, resolution, dropout) have one source, the variant
registry (`models/variants.py`). In a config they are typed placeholders: None means "the
variant's own", so `--config.model=efficientnet-b3` builds the real B3 at 300 px on any config,
while an explicit `--config.width=1.5` overrides (and the run's log says so). `resolve(config)`
fills them in; `train_and_evaluate` and the studies call it.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import jax
import ml_collections
from absl import logging

from efficientnet_jax import errors
from efficientnet_jax.models.layers import resolve_conv_impl
from efficientnet_jax.models.variants import get_variant

# Activation dtypes a config may name; 'auto' is bfloat16 on TPU and GPU, float32 on CPU.
DTYPES = ('auto', 'float32', 'bfloat16')
# The config fields whose default is the variant's own value (VariantSpec attributes).
MODEL_FIELDS = ('width', 'depth', 'resolution', 'dropout')
_FIELD_TYPES = {'width': float, 'depth': float, 'resolution': int, 'dropout': float}


def base_config() -> ml_collections.ConfigDict:
  """The paper's ImageNet recipe for EfficientNet-B0, unlocked (callers lock it)."""
  config = ml_collections.ConfigDict()

  # --- Model -------------------------------------------------------------------------------
  # The family, block table and compound coefficients come from `model` (models/variants.py).
  config.model = 'efficientnet-b0'
  # Width multiplier beta^phi on every channel count (rounded to multiples of 8). None: the
  # variant's own. The same holds for depth, resolution and dropout below.
  config.width = ml_collections.config_dict.placeholder(float)
  # Depth multiplier alpha^phi on every stage's repeat count (rounded up).
  config.depth = ml_collections.config_dict.placeholder(float)
  # Input resolution gamma^phi * 224 in pixels, for training and evaluation.
  config.resolution = ml_collections.config_dict.placeholder(int)
  # Dropout before the classifier.
  config.dropout = ml_collections.config_dict.placeholder(float)
  # EfficientNet only: a block table replacing the variant's, as official block strings
  # ('r1_k3_s11_e1_i32_o16_se0.25', ...), e.g. an architecture search's result. None: the
  # variant's own (B0's table for every B and Lite variant).
  config.blocks = ml_collections.config_dict.placeholder(tuple)
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
  # Compute dtype of activations: 'auto' (bfloat16 on TPU and GPU, float32 on CPU), 'float32' or
  # 'bfloat16'. Parameters, BN statistics, the loss and the logits stay float32 in every case.
  config.dtype = 'auto'
  # Convolution implementation: 'auto' (fast path on CPU, XLA's conv on TPU/GPU), 'xla', 'cpu'.
  config.conv_impl = 'auto'
  # Rematerialise every block (recompute its activations in the backward pass): less memory for
  # the large variants at their resolutions, at about a third more compute.
  config.remat = False

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
  # Load the dataset into memory once at start (small datasets; also the way to train on a
  # TFRecord-only TFDS copy that fits in memory). Every epoch is a full pseudo-random permutation
  # of the training examples, so there is no shuffle buffer to size.
  config.cache = False
  # Batches prefetched onto the accelerator ahead of the train step.
  config.prefetch_batches = 2
  # Record the example ids each step read in workdir/input_ids/ (for debugging, and checks).
  config.log_input_ids = False

  # --- Transfer learning (paper section 5.3) ---------------------------------------------------
  # A pretrained directory (`python -m efficientnet_jax.convert ... --output=DIR`) to start from
  # instead of a random initialisation; None trains from scratch. Only a fresh run reads it. Its
  # model, width and depth must be this config's; a classifier for another num_classes is
  # re-initialised.
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
  # The mesh is ('data', 'fsdp'): groups of fsdp_axis_size devices each hold a 1/fsdp_axis_size
  # share of the parameters, optimiser state and EMA (FSDP); 1 replicates them. The size must
  # divide the devices of a slice; it does not grow with the pod (sharding.py says why).
  config.fsdp_axis_size = 1
  # Only shard arrays with at least this many elements (smaller ones stay replicated).
  config.fsdp_min_size = 2**14

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
  # Save a checkpoint every this many steps (and always at the end and on a preemption notice).
  config.checkpoint_every_steps = 1000
  # Also save when this many minutes passed since the last save (checked at log steps); 0: off.
  config.checkpoint_every_minutes = 0.0
  # Checkpoints to keep.
  config.keep_checkpoints = 3
  # Also keep the checkpoint with the best value of this eval metric (workdir/best_checkpoint;
  # 'loss' metrics are minimised; eval_ema/... means eval/... when EMA is off); '' disables.
  config.best_checkpoint_metric = 'eval_ema/top1'
  # Persistent XLA compilation cache, so a restarted job does not recompile: 'workdir'
  # (workdir/compilation_cache), a directory (local or gs://, may be shared by runs) or '' (off).
  config.compilation_cache = 'workdir'
  # On a CPU, compile the train and eval steps with cheaper code generation (XLA:CPU optimisation
  # level 1): for runs whose compile dominates, like the studies' quick proxies (a tiny network's
  # train step: 16 s to compile instead of 21, 89 ms a step instead of 77). No effect elsewhere.
  config.cpu_fast_compile = False
  # Write a profile of a few steps to the workdir (clu periodic_actions.Profile).
  config.profile = False
  # Random seed for initialisation, dropout and the data order.
  config.seed = 0
  return config


# --- Arguments (`--config=configs/b7.py:smoke`) ----------------------------------------------


def smoke(config: ml_collections.ConfigDict) -> None:
  """Shrinks an experiment to run in a minute on a laptop CPU or under tfds mock data."""
  config.resolution = 64
  config.batch_size = 16
  config.eval_batch_size = 16
  config.num_train_steps = 4
  config.eval_every_steps = 4
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  config.augment = 'none'
  config.fsdp_axis_size = 1  # any device count, a laptop's one CPU included


ARGUMENTS = {'smoke': smoke}


def parse_arguments(arg: str | None, extra: Sequence[str] = ()) -> list[str]:
  """The comma-separated tokens of a config argument, each checked against the valid ones.

  Valid tokens are the names in `ARGUMENTS` and those in `extra` (e.g. a transfer config's
  variant names); any other token is an error that lists them.
  """
  tokens = [t.strip() for t in (arg or '').split(',') if t.strip()]
  unknown = [t for t in tokens if t not in ARGUMENTS and t not in extra]
  if unknown:
    valid = ', '.join(repr(a) for a in (*extra, *ARGUMENTS))
    raise ValueError(f'Unknown config argument {arg!r}. Valid arguments: {valid} '
                     '(comma-separated).')
  return tokens


def apply_arguments(config: ml_collections.ConfigDict, arg: str | None,
                    extra: Sequence[str] = ()) -> list[str]:
  """Applies the `ARGUMENTS` named in `arg` to `config`; returns its `extra` tokens, in order."""
  tokens = parse_arguments(arg, extra)
  for token in tokens:
    if token in ARGUMENTS:
      ARGUMENTS[token](config)
  return [t for t in tokens if t in extra]


def _finish(config: ml_collections.ConfigDict, overrides: Mapping[str, Any],
            arg: str | None) -> ml_collections.ConfigDict:
  # Locked: assigning a field that does not exist (a typo) raises instead of adding a new key.
  config.lock()
  for key, value in overrides.items():
    setattr(config, key, value)
  apply_arguments(config, arg)
  return config


def default_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The locked paper recipe (configs/default.py), with `arg` applied."""
  return _finish(base_config(), {}, arg)


# --- Variants ---------------------------------------------------------------------------------


def check_stated_coefficients(model: str, stated: Mapping[str, Any]) -> None:
  """Raises unless every coefficient in `stated` equals the registry's value for `model`."""
  spec = get_variant(model)
  unknown = sorted(set(stated) - set(MODEL_FIELDS))
  if unknown:
    raise ValueError(f'Unknown coefficient(s) {unknown} stated for {model}; a config states '
                     f'{", ".join(MODEL_FIELDS)}.')
  wrong = [f'{k}={v!r} (the registry has {getattr(spec, k)!r})' for k, v in stated.items()
           if v != getattr(spec, k)]
  if wrong:
    raise ValueError(
        f'The config states {model}\'s coefficients as {", ".join(wrong)}. The variant registry '
        '(efficientnet_jax/models/variants.py) is the one source of them: correct the config, or '
        'for a new network keep the stated values and override, e.g. --config.width=2.2.')


def variant_config(model: str, *, batch_size: int, coefficients: Mapping[str, Any],
                   arg: str | None = None, **overrides) -> ml_collections.ConfigDict:
  """The paper recipe for one named variant (configs/b0.py ... l2.py).

  `coefficients` states the variant's width, depth, resolution and dropout as the paper gives
  them; they are checked against the registry (an error if they disagree) and the config itself
  keeps the placeholders, so `--config.model=...` switches every coefficient with the name.
  `overrides` set any further field (e.g. fsdp_axis_size=8); a mistyped key raises.
  """
  check_stated_coefficients(model, coefficients)
  return _finish(base_config(), dict(model=model, batch_size=batch_size, **overrides), arg)


# --- Fine-tuning (paper section 5.3) ----------------------------------------------------------

# Variants a transfer config's argument may name: 'b0' ... 'b7', 'lite0' ... 'lite4'.
TRANSFER_VARIANTS = tuple(f'b{i}' for i in range(8)) + tuple(f'lite{i}' for i in range(5))


def transfer_config(dataset: str, *, num_classes: int, train_split: str, eval_split: str,
                    num_train_examples: int, arg: str | None = None,
                    default_variant: str = 'b0', **overrides) -> ml_collections.ConfigDict:
  """Fine-tuning an ImageNet-pretrained variant on another dataset (configs/finetune_*.py).

  `arg` names at most one variant ('b0' ... 'b7', 'lite0' ... 'lite4'; `default_variant` if
  none) and optionally 'smoke', comma-separated, e.g. 'lite0,smoke'. The variant's coefficients
  come from the registry, so they match converted weights passed as --config.init_from.

  The paper does not list its fine-tuning hyperparameters; these are a common recipe, our choice:
  SGD with Nesterov momentum 0.9, batch 256, learning rate 0.01 with a linear warmup over the
  first 5% of 10,000 steps then cosine decay, weight decay 1e-5 and label smoothing 0.1 as on
  ImageNet, EMA 0.999, Inception crops and flips without AutoAugment, at the variant's resolution.
  """
  variants = [t for t in parse_arguments(arg, TRANSFER_VARIANTS) if t in TRANSFER_VARIANTS]
  if len(variants) > 1:
    raise ValueError(f'Config argument {arg!r} names {len(variants)} variants; give one.')
  config = base_config()
  config.lock()
  config.model = get_variant(f'efficientnet-{variants[0] if variants else default_variant}').name
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
    setattr(config, key, value)
  apply_arguments(config, arg, extra=TRANSFER_VARIANTS)
  return config


# --- Small data: the offline digits -----------------------------------------------------------


def digits_recipe(config: ml_collections.ConfigDict) -> None:
  """What every run on scikit-learn's digits changes, whatever the network (in place).

  * The 8x8 digits are upscaled; eval takes the whole (centred) digit, not a centre crop.
  * +-4 px pad-and-crop shifts instead of Inception crops and AutoAugment; no flips (a mirrored
    digit is a different symbol).
  * BN momentum 0.9: with ~22 steps per epoch, the paper's 0.99 leaves the running statistics
    (used at eval) far behind the weights for most of a short run.
  * AdamW with cosine decay at batch 64, no EMA.
  """
  config.dataset = 'digits'
  config.num_classes = 10
  config.train_split = 'train'
  config.eval_split = 'test'
  config.crop_padding = 0
  config.bn_momentum = 0.9
  config.train_crop = 'pad_and_crop'
  config.random_flip = False
  config.augment = 'none'
  config.cache = True
  config.optimizer = 'adamw'
  config.learning_rate = 3e-3
  config.lr_batch_size = 64
  config.lr_schedule = 'cosine'
  config.weight_decay = 0.05
  config.ema_decay = 0.0
  config.drop_connect_rate = 0.0
  config.batch_size = 64
  config.eval_batch_size = 360
  config.keep_checkpoints = 1


def digits_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The offline quickstart (configs/quickstart.py): the real B0 on the digits, 20 epochs.

  32 px with a stride-1 stem, so the digits are not downsampled to nothing; no stochastic depth
  (in a 450-step run it mostly slows fitting: 96.4% test top-1 with the paper's 0.2).
  """
  config = base_config()
  config.lock()
  digits_recipe(config)
  config.resolution = 32
  config.stem_stride = 1
  config.warmup_epochs = 1.0
  config.label_smoothing = 0.1
  config.num_epochs = 20.0
  config.log_every_steps = 22
  config.eval_every_steps = 110
  config.checkpoint_every_steps = 110
  apply_arguments(config, arg)
  return config


def quick_study_recipe(steps: int = 80) -> ml_collections.ConfigDict:
  """The recipe of every study's `--quick` run: a tiny B0 on the digits, ~30-45 s on 2 cores.

  The quickstart's recipe at width 0.5 and depth 0.25 (one block per stage), 24 px, 80 steps
  of 32 and one evaluation: on a CPU every network costs a compile plus its steps.
  """
  config = digits_config()
  config.resolution = 24
  config.width = 0.5
  config.depth = 0.25
  config.dropout = 0.0
  config.label_smoothing = 0.0
  # conv_impl stays 'auto' (the CPU fast path on a CPU): XLA's grouped convolution compiles ~4 s
  # faster per network but its training steps are 4-5x slower (310 vs 67 ms at 24 px).
  config.batch_size = 32  # divides by the 8 fake devices of the tests
  config.lr_batch_size = 32
  config.learning_rate = 1e-3
  config.warmup_epochs = 0.0
  config.num_train_steps = steps
  config.eval_every_steps = steps  # evaluate and checkpoint once, at the end
  config.checkpoint_every_steps = steps
  config.best_checkpoint_metric = ''  # one evaluation, at the last checkpoint: no second copy
  config.log_every_steps = 20
  config.prefetch_batches = 1
  config.cpu_fast_compile = True
  return config


# --- Resolving the variant's own coefficients -------------------------------------------------


def model_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The effective width, depth, resolution and dropout: the config's where set, else the variant's."""
  spec = get_variant(config.model)
  fields = {}
  for name in MODEL_FIELDS:
    value = getattr(config, name, None)
    fields[name] = _FIELD_TYPES[name](getattr(spec, name) if value is None else value)
  return fields


def overridden_fields(config: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
  """{field: (config's value, variant's value)} for every coefficient the config sets differently."""
  spec = get_variant(config.model)
  return {name: (config.get(name), getattr(spec, name)) for name in MODEL_FIELDS
          if config.get(name) is not None and config.get(name) != getattr(spec, name)}


def check_dtype(dtype: str) -> None:
  if dtype not in DTYPES:
    raise errors.ConfigError(f'Unknown config.dtype {dtype!r}; valid: {", ".join(DTYPES)}.')


def resolved_dtype(dtype: str, platform: str | None = None) -> str:
  """'float32' or 'bfloat16': `dtype`, with 'auto' decided by `platform` (default: this
  process's backend). bfloat16 activations are the recipe on TPU (and fast on GPU); on a CPU
  they would only lose precision."""
  check_dtype(dtype)
  if dtype != 'auto':
    return dtype
  return 'float32' if (platform or jax.default_backend()) == 'cpu' else 'bfloat16'


def resolve(config: ml_collections.ConfigDict, log: bool = False,
            platform: str | None = None) -> ml_collections.ConfigDict:
  """A copy of `config` with the variant's own coefficients filled in where it leaves them None,
  and 'auto' dtype and conv_impl decided for `platform` (default: this process's backend; the
  TPU dry run passes 'tpu').

  With `log`, one line says which values are the variant's and which the config overrides.
  """
  fields = model_fields(config)
  if log:
    overridden = overridden_fields(config)
    parts = [f'{name} {fields[name]:g}' + (f' (set by the config; the variant\'s own is '
                                             f'{overridden[name][1]:g})' if name in overridden
                                             else '') for name in MODEL_FIELDS]
    logging.info('Model %s: %s%s.', config.model, ', '.join(parts),
                 '' if overridden else ', all the variant\'s own')
  resolved = copy.deepcopy(config)
  with resolved.unlocked():
    for name, value in fields.items():
      setattr(resolved, name, value)
    resolved.dtype = resolved_dtype(config.dtype, platform)
    resolved.conv_impl = resolve_conv_impl(config.conv_impl, platform)
  return resolved
