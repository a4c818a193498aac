"""The competition winners' recipes in recipes/winners/, on the embedded zoo: each merges to a
finite model, and each keeps the restriction its header promises."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergearena.engine import iter_output_tensors, merge_to_state_dict
from mergearena.recipe import parse_recipe
from mergearena.search import parse_space

pytestmark = pytest.mark.zoo
WINNERS = Path(__file__).resolve().parents[1] / "recipes" / "winners"
RECIPES = sorted(p for p in WINNERS.glob("*.yaml") if not p.name.startswith("search-"))


@pytest.fixture(scope="module")
def zoo_weights():
    from mergearena.checkpoints.refs import model_ref_exists, resolve_model_ref

    if not model_ref_exists("zoo:smollm2-135m"):
        pytest.skip("the zoo is not prepared: run `mergearena zoo prepare`")

    def weights(ref: str) -> dict[str, torch.Tensor]:
        return dict(iter_output_tensors(resolve_model_ref(ref)))

    return weights


def test_every_winner_has_a_recipe_and_the_3rd_place_a_search_space():
    names = {p.stem for p in RECIPES}
    assert names == {
        "geometric-median-qv",
        "geometric-median-all",
        "slerp-2nd-place",
        "dare-ties-efficiency",
    }
    space = parse_space(WINNERS / "search-3rd-place.yaml")
    kinds = sorted({d.name.split(".", 1)[1] for d in space.dimensions})
    assert kinds == ["density", "include", "weight"] and len(space.dimensions) == 15


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_winners_recipe_merges_to_a_finite_model_that_moved(zoo_weights, path):
    recipe = parse_recipe(path)
    merged = merge_to_state_dict(recipe)  # the engine refuses NaN or Inf in any tensor
    base = zoo_weights(recipe.base_model)
    assert merged.keys() == base.keys()
    moved = [name for name in base if not torch.equal(merged[name], base[name])]
    assert moved, f"{path.name} left every tensor as the base's"
    if path.stem == "geometric-median-qv":  # the paper's restriction: q and v only
        assert moved and all("q_proj" in name or "v_proj" in name for name in moved)


@pytest.mark.slow
def test_the_2nd_places_gradients_take_attention_and_mlp_from_opposite_ends(zoo_weights):
    merged = merge_to_state_dict(parse_recipe(WINNERS / "slerp-2nd-place.yaml"))
    first, second = zoo_weights("zoo:question_type"), zoo_weights("zoo:sentiment")
    layer0, last = "model.layers.0.", "model.layers.29."
    # t = 0 is the base (question_type), t = 1 the other model; bf16 output of float32 math.
    assert torch.equal(
        merged[layer0 + "self_attn.q_proj.weight"], first[layer0 + "self_attn.q_proj.weight"]
    )
    assert torch.equal(merged[layer0 + "mlp.up_proj.weight"], second[layer0 + "mlp.up_proj.weight"])
    assert torch.equal(
        merged[last + "self_attn.q_proj.weight"], second[last + "self_attn.q_proj.weight"]
    )
    assert torch.equal(merged[last + "mlp.up_proj.weight"], first[last + "mlp.up_proj.weight"])
