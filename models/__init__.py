"""oodflow.models: normalizing-flow maths, backbones and the artifact schema.

Pure library code: nothing here imports `training` or `service`.
"""

__all__: list[str] = []
