"""Integrations of the self-play loss with training frameworks.

Each integration lives in its own submodule and is imported explicitly, never by
``import iris_kernels`` (the frameworks are optional dependencies):

* ``iris_kernels.integrations.trl``: ``SelfPlayConfig`` / ``SelfPlayTrainer`` on TRL's DPO
  machinery (``pip install "iris-kernels[trl]"``).
"""

__all__: list = []
