"""Choosing the acceleration method of a request from recorded performance history (see learner.py).

- methods.py: ``Method`` / ``METHODS``: the methods (codecs, weight quantization, client-side blocks, chunked
  prefill, pushes) and ``configure``, which gives one request's session a method's settings
- features.py: ``TaskFeatures`` and ``task_features``: model, hardware, request and network, measured by
  ``probe_link`` / ``probe_chain``
- history.py: ``History`` (an SQLite table of ``Record``: features, method, ``Outcome``) and the JSONL dataset
  (``load_dataset`` / ``save_dataset``)
- learner.py: ``Learner``: every method's predicted outcome (k-nearest tasks or boosted trees), a calibrated
  confidence, novelty; ``expert_rule`` when the history knows nothing like the task
- selector.py: ``Selector``: per ``generate`` call, measure the features, choose a method, apply it, record the outcome
- summaries.py: servers' history summaries in the DHT (``publish`` / ``fetch``), so new clients learn from the swarm
- evaluation.py: held-out evaluation by task: ``cross_validate`` (regret, accuracy), calibration error,
  ``novelty_detection``
"""

from swarm.acceleration.features import TaskFeatures, probe_chain, probe_link, task_features
from swarm.acceleration.history import History, Outcome, Record, load_dataset, save_dataset
from swarm.acceleration.methods import METHODS, Method, configure, get_method

__all__ = ["METHODS", "History", "Method", "Outcome", "Record", "TaskFeatures", "configure", "get_method",
           "load_dataset", "probe_chain", "probe_link", "save_dataset", "task_features"]
