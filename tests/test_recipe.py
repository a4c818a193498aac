"""Recipe parsing and validation: every mistake is caught before a tensor is read, with a fix."""

import codecs
import time

import pytest

from mergearena.errors import RecipeError
from mergearena.recipe import evaluate_setting, load_yaml, parse_recipe


def ties_recipe(**overrides):
    recipe = {
        "merge_method": "ties",
        "base_model": "base",
        "models": [
            {"model": "base"},
            {"model": "a", "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": "b", "parameters": {"weight": 0.5, "density": [0.2, 0.8]}},
        ],
        "parameters": {"normalize": True},
        "dtype": "bfloat16",
    }
    recipe.update(overrides)
    return recipe


def test_mergekit_ties_recipe_is_accepted_and_base_is_not_an_input():
    recipe = parse_recipe(ties_recipe())
    assert [entry.model for entry in recipe.inputs()] == ["a", "b"]


def test_recipe_from_yaml_file(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n"
        "  - model: b\n    parameters: {weight: 2}\n"
    )
    assert parse_recipe(path).merge_method == "linear"
    assert parse_recipe(str(path)).merge_method == "linear"


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (ties_recipe(merge_method="tie"), "unknown merge_method 'tie'. Did you mean 'ties'?"),
        (ties_recipe(parameters={"normalise": True}), "Did you mean 'normalize'?"),
        (ties_recipe(base_model=None), "needs a base model"),
        (ties_recipe(dtype="float8"), "dtype 'float8' is not supported"),
        (ties_recipe(modles=[]), "unknown key 'modles'. Did you mean 'models'?"),
        (
            ties_recipe(models=[{"model": "a", "parameters": {"density": 0.5}}]),
            "needs per-model parameter 'weight'",
        ),
        (
            ties_recipe(models=[{"model": "a", "parameters": {"weight": 1, "density": 1.5}}]),
            "'density' of ties must be in [0, 1], got 1.5",
        ),
        (
            ties_recipe(models=[{"model": "a", "parameters": {"weight": 1, "normalize": False}}]),
            "'normalize' is a global parameter",
        ),
        (
            ties_recipe(parameters={"normalize": "yes"}),
            "'normalize' of ties must be true or false",
        ),
        (
            {
                "merge_method": "slerp",
                "base_model": "a",
                "models": [{"model": "a"}],
                "parameters": {"t": 0.5},
            },
            "needs at least 1 model(s) besides the base model",
        ),
        (
            {
                "merge_method": "slerp",
                "base_model": "a",
                "parameters": {"t": 0.5},
                "models": [{"model": "a"}, {"model": "b"}, {"model": "c"}],
            },
            "takes at most 1 model(s) besides the base model, the recipe gives 2",
        ),
        (
            {
                "merge_method": "slerp",
                "base_model": "a",
                "models": [{"model": "a"}, {"model": "b"}],
            },
            "needs parameter 't'",
        ),
        ({"models": []}, "missing required key 'merge_method'"),
        ("merge_method: [", "not valid YAML"),
    ],
)
def test_bad_recipes_name_the_problem_and_the_fix(recipe, message):
    with pytest.raises(RecipeError) as error:
        parse_recipe(recipe)
    assert message in str(error.value)


def test_filter_conditions_are_validated_and_resolved_first_match_wins():
    setting = [
        {"filter": "self_attn", "value": 0.1},
        {"filter": "mlp", "value": 0.2},
        {"value": 0.3},
    ]
    parse_recipe(ties_recipe(parameters={"normalize": True, "density": setting}))
    assert evaluate_setting(setting, "model.layers.0.self_attn.q_proj.weight", 0) == 0.1
    assert evaluate_setting(setting, "model.layers.0.mlp.up_proj.weight", 0) == 0.2
    assert evaluate_setting(setting, "model.norm.weight", 0) == 0.3
    with pytest.raises(RecipeError, match="filter: SUBSTRING, value: V"):
        parse_recipe(ties_recipe(parameters={"density": [{"filter": "mlp", "valeu": 1}]}))


def test_gradients_interpolate_over_layers_like_mergekit():
    assert evaluate_setting([0.0, 1.0], "x", 0.25) == pytest.approx(0.25)
    assert evaluate_setting([0.0, 1.0, 0.0], "x", 0.75) == pytest.approx(0.5)
    assert evaluate_setting([0.2, 0.4], "x", 1.0) == pytest.approx(0.4)
    assert evaluate_setting(["1e-3", "2e-3"], "x", 0.0) == pytest.approx(1e-3)


def test_single_full_range_slice_is_read_as_models():
    recipe = parse_recipe(
        {
            "merge_method": "slerp",
            "base_model": "a",
            "slices": [
                {
                    "sources": [
                        {"model": "a", "layer_range": [0, 2]},
                        {"model": "b", "layer_range": [0, 2]},
                    ]
                }
            ],
            "parameters": {"t": [0, 1]},
        }
    )
    assert [entry.model for entry in recipe.inputs()] == ["b"]
    assert recipe.layer_range == (0, 2)


def test_layer_stacking_slices_are_refused_clearly():
    with pytest.raises(RecipeError, match="layer stacking"):
        parse_recipe(
            {
                "merge_method": "passthrough",
                "slices": [
                    {"sources": [{"model": "a", "layer_range": [0, 2]}]},
                    {"sources": [{"model": "a", "layer_range": [1, 2]}]},
                ],
            }
        )


def test_mergekit_options_we_do_not_implement_are_named_not_called_unknown():
    with pytest.raises(RecipeError, match="mergekit's 'chat_template' option is not supported"):
        parse_recipe(ties_recipe(chat_template="chatml"))


# --- reading YAML: one bounded loader for files, strings and the arena's uploads -----------------


def test_anchors_and_merge_keys_within_the_limits_still_work():
    text = (
        "merge_method: ties\nbase_model: base\n"
        "models:\n  - model: a\n    parameters: &defaults {weight: 0.5, density: 0.5}\n"
        "  - model: b\n    parameters: {<<: *defaults, weight: 0.7}\n"
    )
    recipe = parse_recipe(text)
    assert recipe.models[1].parameters == {"weight": 0.7, "density": 0.5}


def test_a_duplicate_key_is_refused_in_recipe_text_too():
    text = "merge_method: linear\nmodels:\n  - {model: a, parameters: {weight: 1, weight: 2}}\n"
    with pytest.raises(RecipeError, match=r"duplicate key 'weight' on line 3 \(first on line 3\)"):
        parse_recipe(text)


def test_an_alias_bomb_in_recipe_text_is_refused_before_it_is_built():
    levels = "&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"
    for level in range(1, 12):
        levels = f"&a{level} [{levels}, " + ", ".join([f"*a{level - 1}"] * 9) + "]"
    text = f"merge_method: linear\nmodels:\n  - {{model: a, parameters: {{weight: {levels}}}}}\n"
    started = time.perf_counter()
    with pytest.raises(RecipeError, match=r"recipe, line 3: the YAML expands to more than 100,000"):
        parse_recipe(text)
    assert time.perf_counter() - started < 1.0


def test_recipe_bytes_are_utf8_with_or_without_a_byte_order_mark():
    assert load_yaml(codecs.BOM_UTF8 + "merge_method: linéaire\n".encode()) == {
        "merge_method": "linéaire"
    }
    with pytest.raises(RecipeError, match=r"upload.yaml: is UTF-16 or UTF-32 text"):
        load_yaml("merge_method: linear\n".encode("utf-16"), "upload.yaml")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), "nan", 10**400])
def test_a_parameter_that_is_not_a_finite_number_is_refused_by_name(value):
    models = [{"model": "a", "parameters": {"weight": 1, "density": value}}]
    with pytest.raises(RecipeError, match=r"'density' of ties must be a finite number"):
        parse_recipe(ties_recipe(models=models))
