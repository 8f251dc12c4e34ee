"""The data pipeline, in the order it runs: source -> preprocessing -> pipeline -> prefetch.

* `sources.py`: datasets (TFDS in ArrayRecord or in memory, image folders, the offline `digits`
  in `digits.py`) as random-access readers of example i.
* `preprocessing.py` (+ `augment.py`): one image's crop, resize, flip and AutoAugment /
  RandAugment, as pure functions of (image, seed).
* `pipeline.py`: which example each step reads (a pure function of seed, step and batch size,
  so resuming is exact and free), batched per process.
* `prefetch.py`: host batches onto the device mesh, a few steps ahead.
* `prepare.py`: `python -m efficientnet_jax.data.prepare` prepares a TFDS dataset as ArrayRecord.

Importing a submodule imports TensorFlow; `efficientnet_jax.models` never does.
"""
