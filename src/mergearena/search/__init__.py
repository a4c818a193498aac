"""Merge search: tune a recipe's values with Optuna, trials merged in memory, on Ray or here.

    from mergearena.search import SearchSettings, run_search
    report = run_search(SearchSettings(Path("space.yaml"), ["sentiment", "spam"], Path("out")))

See ``space`` (what can be searched, checked before any trial) and ``study`` (the study, its
workers and its outputs).
"""

from mergearena.search.space import Dimension, SearchSpace, parse_space
from mergearena.search.study import SAMPLERS, SearchReport, SearchSettings, run_search

__all__ = [
    "SAMPLERS",
    "Dimension",
    "SearchReport",
    "SearchSettings",
    "SearchSpace",
    "parse_space",
    "run_search",
]
