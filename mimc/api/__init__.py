"""The verbs: one typed function per command, each returning a report with ``to_dict()``.

Every CLI command is: parse options -> call one verb -> render its report. Model verbs (``prune``,
``width``, ``tokens``, ``sparsify``, ``distill``) run one stage through the pipeline's executor;
graph verbs (``export``, ``quantize``, ``build``, ``profile``) write or measure graphs; ``evaluate``
and ``inspect`` measure; ``embed`` writes a model's features on a data source; ``run`` executes a
recipe and ``search`` finds the fastest faithful one.
"""
from __future__ import annotations

from mimc.api._embed import EmbedReport, embed
from mimc.api._eval import EvalReport, InspectReport, evaluate, inspect
from mimc.api._graph import BuildReport, ProfileReport, build, export, profile, quantize
from mimc.api._model import distill, prune, sparsify, tokens, width
from mimc.api._run import RunReport, SearchReport, profiles, recipe, run, search
from mimc.api.reports import GraphReport, StageReport
from mimc.data import ImageSource
from mimc.errors import ConfigError, MimcError
from mimc.pipeline.search_space import SearchSpace

VERBS = ("prune", "width", "tokens", "sparsify", "distill", "export", "quantize", "build", "profile", "evaluate",
         "embed", "inspect", "run", "recipe", "search", "profiles")

__all__ = ["prune", "width", "tokens", "sparsify", "distill", "export", "quantize", "build", "profile", "evaluate",
           "embed", "inspect", "run", "recipe", "search", "profiles", "StageReport", "GraphReport", "ProfileReport", "BuildReport",
           "EvalReport", "EmbedReport", "InspectReport", "RunReport", "SearchReport", "SearchSpace", "ImageSource", "MimcError",
           "ConfigError", "VERBS"]
