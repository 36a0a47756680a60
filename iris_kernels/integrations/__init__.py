"""Integrations of the self-play loss with training frameworks.

Each integration lives in its own submodule and is imported explicitly, never by
``import iris_kernels`` (the frameworks are optional dependencies):

* ``iris_kernels.integrations.trl``: ``SelfPlayConfig`` / ``SelfPlayTrainer`` on TRL's DPO
  machinery (``pip install "iris-kernels[trl]"``).
* ``iris_kernels.integrations.hf``: the dataset row format, ``render_pair``, ``score_pairs`` and
  ``PairCollator`` for ``SelfPlayLoss`` in a Hugging Face ``Trainer`` (torch only at import).
"""

__all__: list = []
