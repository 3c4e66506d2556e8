"""The programs metaseg runs, one package each, over the shared pieces they all need.

* :mod:`metaseg.engine.training`: ``metaseg-train``'s outer loop, stages, budget and best
  checkpoint;
* :mod:`metaseg.engine.evaluation`: the held-out protocol (``metaseg-eval`` and the evaluation at
  the end of training), tuning on validation tasks, reports;
* :mod:`metaseg.engine.prediction`: ``metaseg-predict``, adapt on a few images and segment a folder.

Shared by all three: checkpoints (``checkpoint``, ``state``), torchrun (``distributed``), a
held-out label space (``heads``); the algorithm a config describes is built in
:mod:`metaseg.meta.from_config`.
Dependencies point one way: ``prediction`` and ``training`` use ``evaluation``, never back.
"""
