"""rrcompile: make trained ONNX networks survive RRAM weight variation.

``rrcompile.compile(model, x, y, rrcompile.CompileOptions(device))`` runs the whole compiler
(``rrcompile.pipeline``); the passes are in ``rrcompile.passes``.
"""

_PIPELINE_NAMES = ("compile", "CompileOptions", "CompileResult")


def __getattr__(name: str):
    # torch loads with the pipeline: only when the compiler itself is asked for
    if name in _PIPELINE_NAMES:
        from rrcompile import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'rrcompile' has no attribute {name!r}")
