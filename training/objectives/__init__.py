"""Objectives: the loss of each zoo family, one named step at a time.

An objective never calls ``backward()``; :class:`anomaly.training.trainer.Trainer` does, for every
model (see :mod:`anomaly.training.objectives.base` for the contract). Objectives are registered by
name; a :class:`anomaly.registry.ModelSpec` names the objective that trains it.
"""
from __future__ import annotations

from anomaly.training.objectives.base import Batch, Objective, Step, create_objective, list_objectives, register_objective

__all__ = ["Batch", "Objective", "Step", "create_objective", "list_objectives", "register_objective"]
