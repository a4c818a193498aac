"""mergearena: merge large language models and run merging competitions.

Python API::

    import mergearena
    mergearena.merge("recipe.yaml", "out/")                       # a Hugging Face checkpoint
    mergearena.methods.ties([t1, t2], base=b, weight=[1, 1], density=[0.5, 0.5])
"""

from mergearena import methods
from mergearena.engine import MergeResult, merge
from mergearena.errors import CheckpointError, MergeArenaError, RecipeError, ShapeMismatchError
from mergearena.recipe import Recipe, parse_recipe

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "MergeArenaError",
    "MergeResult",
    "Recipe",
    "RecipeError",
    "ShapeMismatchError",
    "merge",
    "methods",
    "parse_recipe",
]
