"""The four export formats: one serving function, written by each format's own exporter.

The serving function is `model.apply(variables, (images - mean) / std, train=False)` on uint8
[B, R, R, 3] images, with the variables as constants and the model built with XLA's
convolutions (`conv_impl='xla'`: the CPU shifted-sum form is a JAX-side optimisation that every
runtime below would only see as hundreds of slices and adds). The batch is symbolic in every
format but TFLite (batch 1, see `write_tflite`). Exporters are imported only when used (the `export` extra); TensorFlow is a dependency of
the package already.

* stablehlo: `jax.export` for CPU, CUDA and TPU, serialised (reload with `jax.export.deserialize`).
* savedmodel: jax2tf's native serialisation (the same StableHLO inside an XlaCallModule op) under
  a `serving_default` signature {'images'} -> {'logits'}.
* tflite: TensorFlow's TFLite converter on that SavedModel (CPU-only, batch 1). The converter
  lowers the StableHLO to builtin LiteRT ops (CONV_2D, DEPTHWISE_CONV_2D, ...), so no Flex or
  custom op is needed; optional full-integer int8 post-training quantisation from calibration
  images. Why this path and not jax2onnx -> onnx2tf: docs/export.md.
* onnx: jax2onnx, opset 18 (ONNX Runtime >= 1.14, OpenVINO, TensorRT >= 10).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from efficientnet_jax import artifacts, errors

ONNX_OPSET = 18
# Platforms a StableHLO / SavedModel artifact is lowered for (a module carries one lowering each).
SERVING_PLATFORMS = ('cpu', 'cuda', 'tpu')
_EXTRA = "install the 'export' extra: pip install -e '.[export]' (see docs/export.md)"


class ExportError(errors.UserError, ValueError):
  """An export cannot be made as asked: the format, the checkpoint or an op it cannot convert."""


def serving_function(model, variables: Mapping[str, Any], mean_rgb, stddev_rgb
                     ) -> Callable[[jax.Array], jax.Array]:
  """uint8 [B, R, R, 3] -> float32 logits, normalised inside, the variables as constants."""
  variables = jax.tree.map(np.asarray, dict(variables))
  mean = np.asarray(mean_rgb, np.float32)
  std = np.asarray(stddev_rgb, np.float32)

  def serve(images):
    x = (images.astype(jnp.float32) - mean) / std  # as predict.normalize does it
    return model.apply(variables, x, train=False).astype(jnp.float32)
  return serve


def input_spec(resolution: int) -> jax.ShapeDtypeStruct:
  """The images argument: uint8 [batch, R, R, 3] with a symbolic batch."""
  batch, = jax.export.symbolic_shape('batch')
  return jax.ShapeDtypeStruct((batch, resolution, resolution, 3), jnp.uint8)


# --- Naming the op an exporter cannot convert -------------------------------------------------

_OP_PATTERNS = (
    re.compile(r"primitive '([^']+)'"),  # jax2onnx
    re.compile(r"'((?:vhlo|stablehlo|chlo|mhlo|tf|tfl)\.[\w.]+)' op"),  # the TFLite converter
    re.compile(r'custom call target ([\w.@-]+)'),  # jax.export, for non-portable custom calls
)


def unconvertible_op(message: str) -> str | None:
  """The op an exporter's error names, if it names one."""
  if 'host_callback' in message or 'python_callback' in message:
    return 'a host callback (jax.pure_callback / io_callback)'
  for pattern in _OP_PATTERNS:
    match = pattern.search(message)
    if match:
      return match.group(1)
  return None


def _converting(fmt: str, what: str, convert: Callable[[], Any]) -> Any:
  """Runs `convert`, turning an exporter's failure on an op into an ExportError naming it."""
  try:
    return convert()
  except ExportError:
    raise
  except ImportError as e:
    raise ExportError(f'Exporting to {fmt} needs {e.name or e}; {_EXTRA}.') from e
  except Exception as e:  # pylint: disable=broad-except  (each exporter has its own types)
    op = unconvertible_op(str(e))
    if op is None:
      raise
    first = next((line.strip() for line in str(e).splitlines() if op in line), str(e))[:300]
    raise ExportError(
        f'The {fmt} exporter cannot convert the op {op} in {what}: {first}. The other formats '
        f'may still convert it (`--format=...`); for {fmt}, build the model without that op.'
    ) from e


# --- Writers: each writes the artifact at a new path (the caller renames it into place) --------


def write_stablehlo(serve, spec, path: str, what: str) -> None:
  exported = _converting('stablehlo', what, lambda: jax.export.export(
      jax.jit(serve), platforms=SERVING_PLATFORMS)(spec))
  with open(path, 'wb') as f:
    f.write(exported.serialize())


def write_savedmodel(serve, spec, path: str, what: str,
                     platforms: Iterable[str] = SERVING_PLATFORMS, batch: int | None = None) -> None:
  """`batch` None keeps the batch symbolic; an int fixes it (the TFLite path)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from jax.experimental import jax2tf  # pylint: disable=import-outside-toplevel

  size = spec.shape[1]
  converted = jax2tf.convert(
      serve, polymorphic_shapes=None if batch else [f'(b, {size}, {size}, 3)'],
      with_gradient=False, native_serialization_platforms=tuple(platforms))
  module = tf.Module()
  module.serve = tf.function(
      lambda images: {artifacts.OUTPUT_NAME: converted(images)}, autograph=False,
      input_signature=[tf.TensorSpec([batch, size, size, 3], tf.uint8,
                                     name=artifacts.INPUT_NAME)])
  signature = _converting('savedmodel', what, module.serve.get_concrete_function)
  tf.saved_model.save(module, path, signatures={'serving_default': signature})


def write_tflite(serve, spec, path: str, what: str,
                 calibration: np.ndarray | None = None) -> None:
  """Float32, or full-integer int8 when `calibration` (uint8 [N, R, R, 3]) is given.

  The batch is fixed at 1 in the file, as on-device models are: with a symbolic batch every BatchNorm and relu6 stays a separate MUL, ADD, MAXIMUM and MINIMUM
  behind a BROADCAST_TO of the runtime shape, which the converter cannot fuse into the
  convolutions; int8 then quantises each of those intermediate tensors on its own (a cup
  instead of an espresso on the real Lite0 weights). With batch 1 the graph is CONV_2D and
  DEPTHWISE_CONV_2D with BatchNorm and relu6 fused. (LiteRT's `resize_tensor_input` works for
  Lite0 but not for B0, whose squeeze-and-excitation reshapes keep the batch of 1, so
  `artifacts.Artifact` runs a batch image by image.)
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  with tempfile.TemporaryDirectory() as tmp:
    saved = os.path.join(tmp, 'savedmodel')
    write_savedmodel(serve, spec, saved, what, platforms=('cpu',), batch=1)
    converter = tf.lite.TFLiteConverter.from_saved_model(saved)
    if calibration is not None:
      converter.optimizations = [tf.lite.Optimize.DEFAULT]
      converter.representative_dataset = lambda: ([image[None]] for image in calibration)
      converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    flatbuffer = _converting('tflite', what, converter.convert)
  with open(path, 'wb') as f:
    f.write(flatbuffer)


def write_onnx(serve, spec, path: str, what: str, model_name: str = 'efficientnet') -> None:
  def convert():
    from jax2onnx import to_onnx  # pylint: disable=import-outside-toplevel
    return to_onnx(serve, [spec], model_name=model_name, opset=ONNX_OPSET,
                   input_names=[artifacts.INPUT_NAME], output_names=[artifacts.OUTPUT_NAME])
  model = _converting('onnx', what, convert)
  import onnx  # pylint: disable=import-outside-toplevel
  relu6_as_clip(model)
  onnx.save(model, path)


def relu6_as_clip(model) -> int:
  """Rewrites jax2onnx's relu6, Min(Max(x, 0), 6), as Clip(x, 0, 6) in place; returns the count.

  ONNX Runtime fuses a Conv with a following Clip (and keeps its blocked NCHWc layout across it)
  but not with the Max/Min pair: Lite0 at batch 32 ran 1.5x faster with Clip, with identical
  logits (docs/export.md).
  """
  from onnx import helper, numpy_helper  # pylint: disable=import-outside-toplevel
  graph = model.graph
  constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
  constants.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                    if n.op_type == 'Constant' and n.attribute and n.attribute[0].name == 'value'})
  producer = {output: node for node in graph.node for output in node.output}
  consumers: dict[str, int] = {}
  for node in graph.node:
    for name in node.input:
      consumers[name] = consumers.get(name, 0) + 1

  def is_scalar(name, value):
    return name in constants and constants[name].size == 1 and float(constants[name]) == value

  replaced, nodes = set(), []
  for node in graph.node:
    if node.op_type == 'Min' and len(node.input) == 2:
      inner = producer.get(node.input[0])
      if (inner is not None and inner.op_type == 'Max' and len(inner.input) == 2
          and consumers.get(node.input[0]) == 1 and is_scalar(node.input[1], 6.0)
          and is_scalar(inner.input[1], 0.0)):
        replaced.add(id(inner))
        nodes.append(helper.make_node('Clip', [inner.input[0], inner.input[1], node.input[1]],
                                      list(node.output), name=f'{node.name}_relu6'))
        continue
    nodes.append(node)
  if replaced:
    kept = [node for node in nodes if id(node) not in replaced]
    del graph.node[:]
    graph.node.extend(kept)
  return len(replaced)


WRITERS = {'stablehlo': write_stablehlo, 'savedmodel': write_savedmodel,
           'tflite': write_tflite, 'onnx': write_onnx}


def write_atomically(path: str, write: Callable[[str], None], overwrite: bool) -> None:
  """Calls write(temporary sibling path), then renames the result to `path`."""
  path = os.path.abspath(path)
  if os.path.exists(path) and not overwrite:
    raise ExportError(f'{path} already exists; choose a new --output, or pass --overwrite to '
                      'replace it.')
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  staging = os.path.join(parent, f'.{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}')
  try:
    write(staging)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    os.replace(staging, path)
  finally:
    if os.path.isdir(staging):
      shutil.rmtree(staging, ignore_errors=True)
    elif os.path.exists(staging):
      os.remove(staging)
