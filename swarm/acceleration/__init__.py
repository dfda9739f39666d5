"""Choosing the acceleration method of a request from recorded performance history (see learner.py)."""

from swarm.acceleration.features import TaskFeatures, probe_chain, probe_link, task_features
from swarm.acceleration.history import History, Outcome, Record, load_dataset, save_dataset
from swarm.acceleration.methods import METHODS, Method, configure, get_method

__all__ = ["METHODS", "History", "Method", "Outcome", "Record", "TaskFeatures", "configure", "get_method",
           "load_dataset", "probe_chain", "probe_link", "save_dataset", "task_features"]
