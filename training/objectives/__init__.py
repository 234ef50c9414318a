"""Objectives: the loss of each zoo family, one named step at a time.

An objective never calls ``backward()``; :class:`training.trainer.Trainer` does, for every
model (see :mod:`training.objectives.base` for the contract). Objectives are registered by
name; a :class:`anomaly.registry.ModelSpec` names the objective that trains it.
"""
from __future__ import annotations

from training.objectives.base import Batch, Objective, Step, create_objective, list_objectives, register_objective

__all__ = ["Batch", "Objective", "Step", "create_objective", "list_objectives", "register_objective"]
