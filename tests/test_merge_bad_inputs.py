"""`mergearena merge` given what a careless or hostile user gives it (issue 26, point 8).

Every bad input must end in exit code 2 with a message that names the problem, no traceback,
and nothing written: the whole directory tree the test works in (inputs, recipe, any previous
output) is byte-for-byte what it was, with no output and no temporary sibling left behind.
``--dry-run`` runs the same checks, so each case is tried with and without it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergearena.cli import app


@dataclass
class Inputs:
    """Tiny models in ``root``: a base, two fine-tunes of it, and a LoRA adapter on it."""

    root: Path
    base: Path
    a: Path
    b: Path
    adapter: Path


@dataclass
class Bad:
    """One bad input: the recipe (a dict, YAML text or raw bytes), the options, the output, and
    phrases the error must contain."""

    recipe: dict | str | bytes
    says: list[str]
    args: list[str] = field(default_factory=list)
    out: Path | str | None = None  # default: <root>/out
    recipe_at: Path | None = None  # default: <root>/recipe.yaml (a directory: not written)


@pytest.fixture
def inputs(make_checkpoint, make_lora, tmp_path) -> Inputs:
    base = make_checkpoint("llama", seed=0, name="base")
    a = make_checkpoint("llama", 1, base=base, name="a")
    b = make_checkpoint("llama", 2, base=base, name="b")
    return Inputs(tmp_path, base, a, b, make_lora(base, seed=3))


def linear(*models: Path | str, weight: object = 0.5, **extra: object) -> dict:
    entries = [{"model": str(m), "parameters": {"weight": weight}} for m in models]
    return {"merge_method": "linear", "models": entries, **extra}


def ties(base: Path, *models: Path, density: object = 0.5) -> dict:
    entries = [{"model": str(m), "parameters": {"weight": 0.5, "density": density}} for m in models]
    return {"merge_method": "ties", "base_model": str(base), "models": entries}


def tree(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (hidden ones included) with its SHA-256, link target or kind."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                found[key] = "-> " + os.readlink(path)
            elif path.is_dir():
                found[key] = "dir"
            else:
                found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def write_recipe(root: Path, recipe: dict | str | bytes, path: Path | None = None) -> Path:
    path = path or root / "recipe.yaml"
    if path.is_dir():
        return path
    if isinstance(recipe, dict):
        recipe = yaml.safe_dump(recipe, sort_keys=False)
    path.write_bytes(recipe if isinstance(recipe, bytes) else recipe.encode())
    return path


def assert_refused(result, says: list[str]) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    assert "error:" in result.output
    for phrase in says:
        assert phrase in result.output, (phrase, result.output)


CASES: dict[str, Callable[[Inputs], Bad]] = {}


def case(function: Callable[[Inputs], Bad]) -> Callable[[Inputs], Bad]:
    CASES[function.__name__.replace("_", "-")] = function
    return function


# --- an output that would destroy or mix with an input ------------------------------------------

OUTSIDE = "Choose an output directory outside every input"


@case
def out_is_a_model_with_force(m: Inputs) -> Bad:
    return Bad(linear(m.a, m.b), [f"is the input model {m.a}", OUTSIDE], ["--force"], m.a)


@case
def out_is_a_model_without_force(m: Inputs) -> Bad:
    return Bad(linear(m.a, m.b), [f"is the input model {m.a}", OUTSIDE], [], m.a)


@case
def out_is_the_base_with_force(m: Inputs) -> Bad:
    return Bad(ties(m.base, m.a, m.b), [f"is the input base_model {m.base}"], ["--force"], m.base)


@case
def out_is_a_model_spelled_with_dotdot(m: Inputs) -> Bad:
    return Bad(linear(m.a, m.b), ["is the input model"], ["--force"], f"{m.a}/../{m.a.name}")


@case
def out_is_a_symlink_to_a_model(m: Inputs) -> Bad:
    link = m.root / "link-to-a"
    link.symlink_to(m.a, target_is_directory=True)
    return Bad(linear(m.a, m.b), ["is the input model", str(m.a)], ["--force"], link)


@case
def out_lies_inside_a_model(m: Inputs) -> Bad:
    return Bad(linear(m.a, m.b), ["lies inside the input model"], [], m.a / "merged")


@case
def out_contains_every_model(m: Inputs) -> Bad:
    return Bad(linear(m.a, m.b), ["contains the input model"], ["--force"], m.root)


@case
def out_is_an_adapter(m: Inputs) -> Bad:
    return Bad(linear(m.adapter, m.a), ["(a LoRA adapter)", OUTSIDE], ["--force"], m.adapter)


@case
def out_is_an_adapters_base(m: Inputs) -> Bad:
    return Bad(linear(m.adapter, m.a), ["'s base model", OUTSIDE], ["--force"], m.base)


@case
def out_is_the_tokenizer_source(m: Inputs) -> Bad:
    recipe = linear(m.a, m.b, tokenizer_source=str(m.base))
    return Bad(recipe, ["is the input tokenizer_source"], ["--force"], m.base)


@case
def out_contains_the_recipe_file(m: Inputs) -> Bad:
    directory = m.root / "experiment"
    directory.mkdir()
    recipe = directory / "recipe.yaml"
    says = [f"the output {directory} contains the input recipe {recipe}"]
    return Bad(linear(m.a, m.b), says, ["--force"], directory, recipe)


# --- files and paths the system refuses ---------------------------------------------------------


@case
def utf16_recipe(m: Inputs) -> Bad:
    return Bad(yaml.safe_dump(linear(m.a, m.b)).encode("utf-16"), ["UTF-16", "save the recipe"])


@case
def latin1_recipe(m: Inputs) -> Bad:
    text = "# café au lait\n" + yaml.safe_dump(linear(m.a, m.b))
    return Bad(text.encode("latin-1"), ["is not UTF-8 text (byte 0xe9 at offset 5)"])


@case
def model_path_of_5000_characters(m: Inputs) -> Bad:
    return Bad(linear("x" * 5000, m.b), ["File name too long", "(5,000 characters)"])


@case
def out_path_of_5000_characters(m: Inputs) -> Bad:
    out = m.root / ("o" * 5000)
    return Bad(linear(m.a, m.b), ["File name too long", "(5,0"], [], out)


@case
def out_whose_parent_is_a_file(m: Inputs) -> Bad:
    (m.root / "a-file").write_text("not a directory")
    return Bad(linear(m.a, m.b), ["a-file is a file, not a directory"], [], m.root / "a-file/out")


@case
def recipe_over_a_megabyte(m: Inputs) -> Bad:
    return Bad(yaml.safe_dump(linear(m.a, m.b)) + "#" * 1_000_001 + "\n", ["a recipe is a few kB"])


@case
def recipe_is_a_directory(m: Inputs) -> Bad:
    return Bad(linear(m.a, m.b), ["is a directory; pass the recipe's YAML file"], recipe_at=m.a)


# --- options ------------------------------------------------------------------------------------


@case
def device_tpu(m: Inputs) -> Bad:
    return Bad(linear(m.a, m.b), ["device 'tpu'", "cpu, cuda or cuda:N"], ["--device", "tpu"])


@case
def device_empty(m: Inputs) -> Bad:
    return Bad(linear(m.a, m.b), ["device ''", "cpu, cuda or cuda:N"], ["--device", ""])


@case
def shard_size_infinite(m: Inputs) -> Bad:
    return Bad(
        linear(m.a, m.b), ["--shard-size 'inf': use a size like 5GB"], ["--shard-size", "inf"]
    )


@case
def threads_zero(m: Inputs) -> Bad:
    return Bad(linear(m.a, m.b), ["threads 0: use 1 or more"], ["--threads", "0"])


@case
def threads_negative(m: Inputs) -> Bad:
    return Bad(linear(m.a, m.b), ["threads -3: use 1 or more"], ["--threads", "-3"])


# --- text that looks like rich markup is printed as it is ---------------------------------------


@case
def markup_as_merge_method(m: Inputs) -> Bad:
    return Bad({**linear(m.a, m.b), "merge_method": "[/x]"}, ["unknown merge_method '[/x]'"])


@case
def markup_in_a_model_path(m: Inputs) -> Bad:
    return Bad(linear("[bold]nope[/bold]", m.b), ["'[bold]nope[/bold]': not a model reference"])


# --- YAML that means something else than it seems ----------------------------------------------


@case
def duplicate_merge_method(m: Inputs) -> Bad:
    text = "merge_method: linear\nmerge_method: ties\n" + yaml.safe_dump(
        {"models": linear(m.a, m.b)["models"]}
    )
    return Bad(text, ["duplicate key 'merge_method' on line 2 (first on line 1)"])


@case
def duplicate_models(m: Inputs) -> Bad:
    text = (
        f"merge_method: linear\nmodels:\n  - model: {m.a}\n    parameters: {{weight: 1}}\n"
        f"models:\n  - model: {m.b}\n    parameters: {{weight: 1}}\n"
    )
    return Bad(text, ["duplicate key 'models' on line 5 (first on line 2)"])


@case
def duplicate_weight(m: Inputs) -> Bad:
    text = (
        f"merge_method: linear\nmodels:\n  - model: {m.a}\n    parameters:\n"
        f"      weight: 1\n      weight: 0\n  - model: {m.b}\n    parameters: {{weight: 1}}\n"
    )
    return Bad(text, ["duplicate key 'weight' on line 6 (first on line 5)"])


def alias_bomb(levels: int = 9) -> str:
    """A valid-looking recipe of a few hundred bytes whose ``weight`` expands to 10**levels
    numbers: level k is a list of level k-1 (anchored) and nine aliases of it."""
    value = "&l0 [" + ", ".join(["1"] * 10) + "]"
    for level in range(1, levels):
        value = f"&l{level} [{value}, " + ", ".join([f"*l{level - 1}"] * 9) + "]"
    return (
        "merge_method: linear\nmodels:\n"
        f"  - {{model: a, parameters: {{weight: {value}}}}}\n"
        "  - {model: b, parameters: {weight: 1}}\n"
    )


@case
def alias_bomb_of_a_billion_weights(m: Inputs) -> Bad:
    return Bad(
        alias_bomb(), ["expands to more than 100,000 values", "a recipe needs a few hundred"]
    )


@case
def nesting_ten_thousand_deep(m: Inputs) -> Bad:
    return Bad("weight: " + "[" * 10_000 + "]" * 10_000 + "\n", ["nests deeper than 64 levels"])


# --- models that do not fit -------------------------------------------------------------------


def adapter_with_a_module_the_base_lacks(m: Inputs) -> Path:
    """``m.adapter`` with its layer-1 q_proj factors renamed to a layer 7 the base lacks."""
    weights_file = m.adapter / "adapter_model.safetensors"
    weights = load_file(weights_file)
    renamed = {
        k.replace("layers.1.self_attn.q_proj", "layers.7.self_attn.q_proj"): v
        for k, v in weights.items()
    }
    assert renamed != weights
    save_file(renamed, weights_file, metadata={"format": "pt"})
    return m.adapter


@case
def adapter_with_an_unknown_module_first(m: Inputs) -> Bad:
    adapter = adapter_with_a_module_the_base_lacks(m)
    return Bad(linear(adapter, m.a), ["targets model.layers.7.self_attn.q_proj.weight"])


@case
def adapter_with_an_unknown_module_second(m: Inputs) -> Bad:
    adapter = adapter_with_a_module_the_base_lacks(m)
    return Bad(linear(m.a, adapter), ["targets model.layers.7.self_attn.q_proj.weight"])


@case
def filter_that_is_not_text(m: Inputs) -> Bad:
    recipe = linear(m.a, m.b)
    recipe["models"][0]["parameters"]["weight"] = [{"filter": ["mlp"], "value": 1}]
    return Bad(recipe, ["a condition is {filter: SUBSTRING, value: V}"])


@case
def base_without_config(m: Inputs) -> Bad:
    (m.base / "config.json").unlink()
    return Bad(ties(m.base, m.a, m.b), ["has no config.json", "add the model's config.json"])


# --- parameter values that are not numbers ------------------------------------------------------


@case
def nan_density(m: Inputs) -> Bad:
    return Bad(ties(m.base, m.a, m.b, density=float("nan")), ["'density' of ties must be a finite"])


@case
def nan_t(m: Inputs) -> Bad:
    recipe = {
        "merge_method": "slerp",
        "base_model": str(m.base),
        "models": [{"model": str(m.base)}, {"model": str(m.a)}],
        "parameters": {"t": float("nan")},
    }
    return Bad(recipe, ["'t' of slerp must be a finite number, got nan"])


@case
def infinite_weight_on_the_first_model(m: Inputs) -> Bad:
    recipe = linear(m.a, m.b)
    recipe["models"][0]["parameters"]["weight"] = float("inf")
    return Bad(recipe, ["models[0]", "'weight' of linear must be a finite number, got inf"])


@case
def weight_of_400_digits(m: Inputs) -> Bad:
    return Bad(linear(m.a, m.b, weight=10**400), ["'weight' of linear must be a finite number"])


@pytest.mark.parametrize("dry_run", [False, True], ids=["merge", "dry-run"])
@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_input_is_refused_with_a_message_and_nothing_written(inputs, name, dry_run):
    bad = CASES[name](inputs)
    recipe = write_recipe(inputs.root, bad.recipe, bad.recipe_at)
    out = bad.out if bad.out is not None else inputs.root / "out"
    before = tree(inputs.root)
    args = ["merge", str(recipe), "--out", str(out), *bad.args, *(["--dry-run"] * dry_run)]
    result = CliRunner().invoke(app, args)
    assert_refused(result, bad.says)
    assert tree(inputs.root) == before


def test_an_alias_bomb_is_refused_within_a_second(inputs):
    recipe = write_recipe(inputs.root, alias_bomb(levels=12))  # 10**12 numbers if expanded
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["merge", str(recipe), "--out", str(inputs.root / "out")])
    assert time.perf_counter() - started < 1.0
    assert_refused(result, ["expands to more than 100,000 values"])


# --- failures while writing: a full disk, a race ------------------------------------------------


def test_a_full_disk_fails_cleanly_and_keeps_the_previous_output(inputs, monkeypatch):
    """Simulated: every write of tensor bytes fails with ENOSPC, as on a full disk (the real one,
    on a tiny tmpfs, is the next test)."""
    recipe = write_recipe(inputs.root, linear(inputs.a, inputs.b))
    out = inputs.root / "out"
    assert CliRunner().invoke(app, ["merge", str(recipe), "--out", str(out)]).exit_code == 0
    before = tree(inputs.root)

    def disk_full(descriptor, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("mergearena.checkpoints.writer._pwrite_all", disk_full)
    result = CliRunner().invoke(app, ["merge", str(recipe), "--out", str(out), "--force"])
    assert_refused(result, [f"{out}: the disk is full", "The previous output there is untouched"])
    assert tree(inputs.root) == before


def run_where_permissions_bind(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m mergearena ARGS`` where file permissions bind: as uid/gid 65534 when this is
    root (root passes every permission check, and the project's containers run tests as root),
    else as this user."""
    command = [sys.executable, "-m", "mergearena", *args]
    if os.geteuid() == 0:
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    environment = {
        **os.environ,
        "HOME": str(cwd),
        "PYTHONPATH": str(Path(__file__).parents[1] / "src"),
    }
    return subprocess.run(
        command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=120, check=False
    )


needs_permissions = pytest.mark.skipif(
    not hasattr(os, "geteuid") or (os.geteuid() == 0 and shutil.which("setpriv") is None),
    reason="needs POSIX permissions, and setpriv to drop root's",
)
needs_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="mounts a tmpfs in a private mount namespace: needs root and unshare",
)


@pytest.fixture
def shared_dir(inputs):
    """A copy of the inputs that uid 65534 may read (pytest's tmp dirs are private to root)."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="mergearena-bad-inputs-"))
    os.chmod(root, 0o755)
    for name in ("base", "a", "b"):
        shutil.copytree(getattr(inputs, name), root / name)
        for file in (root / name).iterdir():
            file.chmod(0o644)  # safetensors writes 0600
    outputs = root / "outputs"
    outputs.mkdir()
    outputs.chmod(0o777)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@needs_permissions
def test_an_unreadable_model_directory_is_named_not_a_traceback(shared_dir):
    """A real permission error: the model directory's mode is 000 while the command runs."""
    model = shared_dir / "a"
    recipe = write_recipe(shared_dir, linear(model, shared_dir / "b"))
    before = tree(shared_dir)
    model.chmod(0o000)
    try:
        out = str(shared_dir / "outputs" / "out")
        done = run_where_permissions_bind("merge", str(recipe), "--out", out, cwd=shared_dir)
    finally:
        model.chmod(0o755)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"model {model}: cannot read it (Permission denied" in done.stderr
    assert tree(shared_dir) == before


@needs_permissions
def test_an_output_in_a_directory_not_writable_is_refused(shared_dir):
    """A real read-only place: the output's parent directory's mode is 555."""
    outputs = shared_dir / "outputs"
    recipe = write_recipe(shared_dir, linear(shared_dir / "a", shared_dir / "b"))
    before = tree(shared_dir)
    outputs.chmod(0o555)
    try:
        out = str(outputs / "out")
        done = run_where_permissions_bind("merge", str(recipe), "--out", out, cwd=shared_dir)
    finally:
        outputs.chmod(0o777)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"{outputs} is not writable by this user" in done.stderr
    assert tree(shared_dir) == before


def test_a_merge_that_loses_a_race_for_its_output_fails_cleanly(inputs, monkeypatch):
    """Another merge finishes the same output while this one writes: it keeps its output, this
    one says so and leaves no temporary directory."""
    import mergearena.engine as engine

    recipe = write_recipe(inputs.root, linear(inputs.a, inputs.b))
    out = inputs.root / "out"
    write_support_files = engine._write_support_files

    def meanwhile_another_merge(plan, directory):
        monkeypatch.setattr(engine, "_write_support_files", write_support_files)
        assert CliRunner().invoke(app, ["merge", str(recipe), "--out", str(out)]).exit_code == 0
        write_support_files(plan, directory)

    monkeypatch.setattr(engine, "_write_support_files", meanwhile_another_merge)
    result = CliRunner().invoke(app, ["merge", str(recipe), "--out", str(out)])
    assert_refused(result, [f"{out}: appeared while this output was being written"])
    assert sorted(p.name for p in inputs.root.iterdir() if p.name.startswith(".")) == []
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_merges_racing_in_threads_leave_one_complete_output(inputs, force, monkeypatch):
    """Eight merges of one recipe to one output at once: with --force every one succeeds (each
    replaces the last), without it one succeeds and the others say the output appeared. Each
    rename waits 50 ms first, so that all of them check the output before any renames."""
    rename = os.rename

    def slow_rename(source, destination):
        time.sleep(0.05)
        rename(source, destination)

    monkeypatch.setattr("mergearena.checkpoints.writer.os.rename", slow_rename)
    recipe = write_recipe(inputs.root, linear(inputs.a, inputs.b))
    out = inputs.root / "out"
    results: list[int] = []
    barrier = threading.Barrier(8)

    def one() -> None:
        from mergearena.engine import merge
        from mergearena.errors import CheckpointError

        barrier.wait()
        try:
            merge(recipe, out, overwrite=force)
            results.append(0)
        except CheckpointError as error:
            # refused at the start if another had finished, else at the end
            assert "appeared while this output" in str(error) or "already exists" in str(error)
            results.append(2)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8
    assert results.count(0) == (8 if force else 1)
    assert sorted(p.name for p in inputs.root.iterdir() if p.name.startswith(".")) == []
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


# Run in a private mount namespace (``unshare --mount``): mounts a tmpfs of SIZE bytes on DISK,
# merges there once (it fits), hashes the result, merges again with --force (two copies do not
# fit), and prints what happened as JSON. The tmpfs vanishes with the namespace.
_FULL_DISK_DRIVER = """
import hashlib, json, os, subprocess, sys
size, disk, recipe = sys.argv[1:4]
subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", disk], check=True)
def tree():
    return {os.path.join(d, n): hashlib.sha256(open(os.path.join(d, n), "rb").read()).hexdigest()
            for d, _, names in os.walk(disk) for n in names}
def merge(*extra):
    command = [sys.executable, "-m", "mergearena", "merge", recipe, "--out", disk + "/out"]
    return subprocess.run([*command, *extra], capture_output=True, text=True)
first = merge()
before = tree()
second = merge("--force")
print(json.dumps({"first": first.returncode, "first_stderr": first.stderr, "before": before,
                  "second": second.returncode, "stderr": second.stderr, "after": tree(),
                  "entries": sorted(os.listdir(disk))}))
"""


@needs_root
def test_a_really_full_disk_fails_cleanly_and_keeps_the_previous_output(inputs, tmp_path):
    """On a real full tmpfs (root only): the --force merge that cannot fit beside the previous
    output says the disk is full, and the previous output is byte-for-byte what it was."""
    recipe = write_recipe(inputs.root, linear(inputs.a, inputs.b))
    probe = tmp_path / "probe"
    assert CliRunner().invoke(app, ["merge", str(recipe), "--out", str(probe)]).exit_code == 0
    pages = sum(-(-p.stat().st_size // 4096) for p in probe.iterdir())
    disk = tmp_path / "disk"
    disk.mkdir()
    driver = ["unshare", "--mount", "--propagation", "private", sys.executable, "-c"]
    size = str(4096 * (pages * 3 // 2 + 2))  # one output and a half
    done = subprocess.run(
        [*driver, _FULL_DISK_DRIVER, size, str(disk), str(recipe)],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")},
    )  # fmt: skip
    if done.returncode != 0 and "mount" in done.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()[-200:]}")
    report = json.loads(done.stdout)
    assert report["first"] == 0, report["first_stderr"]
    assert report["second"] == 2, report["stderr"]
    assert "Traceback" not in report["stderr"]
    assert f"{disk}/out: the disk is full (No space left on device" in report["stderr"]
    assert report["after"] == report["before"] and report["entries"] == ["out"]


def test_run_refuses_an_output_that_is_an_input_too(inputs):
    """``mergearena run`` writes OUT/model inside a temporary OUT: its check is on OUT itself."""
    recipe = write_recipe(inputs.root, linear(inputs.a, inputs.b))
    tasks = inputs.root / "mc.csv"
    tasks.write_text(
        "id,input,target,answer_choices,eval_type\nq1,he was,1,\"['yes', 'no']\",multiple_choice\n"
    )
    before = tree(inputs.root)
    argv = ["run", str(recipe), "--tasks", str(tasks), "--out", str(inputs.a), "--force", "-q"]
    result = CliRunner().invoke(app, argv)
    assert_refused(result, [f"is the input model {inputs.a}", OUTSIDE])
    assert tree(inputs.root) == before


@pytest.fixture
def adapter_method():
    """A merge method registered for one test that, like ``lora_concat``, writes an adapter."""
    from mergearena.methods import merge_method, registry

    @merge_method("test_adapter_sum", reference="a test", output="adapter")
    def adapter_sum(factors: list, *, weight: list[float] = 1.0):
        """Returns the first adapter's factors."""
        return factors[0]

    yield "test_adapter_sum"
    registry._REGISTRY.pop("test_adapter_sum", None)


@pytest.mark.parametrize("method", ["lora_svd", "test_adapter_sum"])
def test_run_refuses_any_method_that_writes_an_adapter(inputs, adapter_method, method):
    """``run`` evaluates the merge it writes, so a method whose spec writes an adapter (any such
    method, not only the built-in two) is refused before anything is merged or written."""
    recipe = {"merge_method": method, "models": [{"model": str(inputs.adapter)}]}
    if method == "lora_svd":
        recipe["parameters"] = {"rank": 2}
    path = write_recipe(inputs.root, recipe)
    tasks = inputs.root / "mc.csv"
    tasks.write_text(
        "id,input,target,answer_choices,eval_type\nq1,he was,1,\"['yes', 'no']\",multiple_choice\n"
    )
    out = inputs.root / "run"
    result = CliRunner().invoke(app, ["run", str(path), "--tasks", str(tasks), "--out", str(out)])
    assert_refused(result, [f"{method} writes an adapter", "--adapter OUT"])
    assert not out.exists()
