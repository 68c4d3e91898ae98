"""Recipe states saved by fp8train 0.2.0 still load: every built-in recipe's
``canonical()`` (what a saved recipe state is checked against) is unchanged.

tests/data/recipe_canonical_0.2.0.json was written by 0.2.0 (before the FP4 recipes) from
``{name: Recipe.from_name(name).canonical() for name in RECIPE_NAMES}``. A new Recipe or
ScaleSpec field must leave these strings alone at its default (``_LATER_FIELDS``), or
every checkpoint saved before it is refused on resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fp8train.recipes import Recipe

SAVED = json.loads((Path(__file__).parent / "data" / "recipe_canonical_0.2.0.json").read_text())


@pytest.mark.parametrize("name", sorted(SAVED))
def test_canonical_of_built_in_recipes_is_what_0_2_0_saved(name: str) -> None:
    assert Recipe.from_name(name).canonical() == SAVED[name]
