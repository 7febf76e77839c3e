"""oodflow.training: data, training loops, calibration, evaluation, export and experiments.

May import `models`; nothing in `models` or `service` imports this package.
"""

__all__: list[str] = []
