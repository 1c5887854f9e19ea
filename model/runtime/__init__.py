"""Vision runtimes other than torch: the vision tower exported to OpenVINO IR (fp32 / int8).

The base class and the torch runtime live in :mod:`model.backbone`; this package holds the
OpenVINO one, split by concern:

- :mod:`model.runtime.export`: the vision blocks with their layer taps as one module, exported
  to an OpenVINO model at a fixed resolution;
- :mod:`model.runtime.calibration`: images for int8 calibration (a folder, a product's photos,
  or the built-in synthetic textures) and NNCF post-training quantization;
- :mod:`model.runtime.ir_cache`: the on-disk IR cache, keyed by weights digest, resolution,
  precision, layers (and calibration set), verified on every load;
- :mod:`model.runtime.openvino_runtime`: the :class:`~model.backbone.VisionRuntime` that runs a
  compiled IR, and :func:`~model.runtime.openvino_runtime.load_openvino_runtime`, which ties
  the three together.

Nothing here imports OpenVINO or NNCF at module import time: they are an optional extra
(``pip install 'genclip-inspect[openvino]'``), imported when a runtime is built.
"""

RUNTIMES = ("torch", "openvino")
PRECISIONS = ("fp32", "int8")
OPENVINO_EXTRA_HINT = "pip install 'genclip-inspect[openvino]'"
