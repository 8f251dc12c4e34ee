"""Weight converters from other EfficientNet implementations into efficientnet_jax variables.

* `efficientnet_jax.convert.keras`: keras.applications EfficientNetB0-B7 (and their ImageNet
  `.h5` files) -> {'params', 'batch_stats'}; see `convert_keras_model` and `load_keras_weights`.

Import the submodule you need; nothing here imports TensorFlow or Keras, so `import
efficientnet_jax.convert` stays cheap.
"""
