"""PEFT LoRA adapters: read their factors and full-weight deltas lazily, and write new adapters.

A LoRA module adds ``scale · B @ A`` to one base weight, with ``A`` = ``lora_A`` (rank × in),
``B`` = ``lora_B`` (out × rank) and ``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
rsLoRA; Hu et al. 2021, Kalajdzievski 2023). Everything here is keyed by the *base model's* tensor
name (``model.layers.0.self_attn.q_proj.weight``), so the merge engine can pair an adapter's delta
with the base tensor it streams. Deltas are computed per tensor, on request.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from mergearena.checkpoints.reader import Checkpoint
from mergearena.errors import CheckpointError, ShapeMismatchError
from mergearena.methods.registry import LoraFactors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

# "<module>.lora_A.weight" or "<module>.lora_A.<adapter name>.weight"; embeddings have no ".weight".
_LINEAR_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(\.(?P<adapter>[^.]+))?\.weight$")
_EMBEDDING_KEY = re.compile(
    r"^(?P<module>.+)\.lora_embedding_(?P<part>[AB])(\.(?P<adapter>[^.]+))?$"
)

# Adapter-config settings whose math a plain ``scale · B @ A`` delta does not capture.
_UNSUPPORTED_SETTINGS = {
    "use_dora": "DoRA (use_dora) rescales each weight column by a learned magnitude",
    "lora_bias": "lora_bias adds a trained bias to lora_B",
    "target_parameters": "target_parameters adapts raw nn.Parameters (e.g. MoE experts)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) applies only after "
    "an invocation sequence",
    "use_qalora": "QA-LoRA (use_qalora) pools inputs before lora_A",
    "trainable_token_indices": "trainable tokens replace individual embedding rows",
    "layer_replication": "layer_replication duplicates base layers",
    "velora_config": "VeLoRA changes the LoRA forward pass",
    "monteclora_config": "MonteCLoRA samples its factors",
    "arrow_config": "Arrow routes between several adapters",
    "kasa_config": "KaSA changes the LoRA forward pass",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) changes the factor layout",
    "megatron_config": "Megatron-parallel LoRA layers",
}
# Initialisations that also modify the base weights: the adapter only makes sense on that modified
# base unless it was converted back (PEFT's ``path_initial_model_for_weight_conversion``).
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def get_pattern_key(pattern_keys: list[str], module_name: str) -> str:
    """The first key of ``rank_pattern`` / ``alpha_pattern`` that matches ``module_name``.

    The same rule as PEFT's ``peft.utils.other.get_pattern_key``: a key is a regular expression that
    must match a dot-separated suffix of the module name; without a match the name itself is
    returned (so ``pattern.get(key, default)`` falls back to the default).
    """
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return module_name


@dataclass(frozen=True)
class LoraModule:
    """One adapted base weight: where its factors live in the adapter file and how to apply them."""

    weight_name: str  # base tensor, e.g. "model.layers.0.self_attn.q_proj.weight"
    down_key: str  # lora_A / lora_embedding_A key in the adapter file
    up_key: str  # lora_B / lora_embedding_B key
    rank: int
    alpha: float
    scale: float
    is_embedding: bool  # delta = (B @ A)ᵀ: nn.Embedding weights are (vocab × dim)
    fan_in_fan_out: bool  # GPT-2 Conv1D weights are (in × out): delta = (B @ A)ᵀ


def is_adapter_dir(path: str | Path) -> bool:
    """True if ``path`` is a directory holding a PEFT adapter (``adapter_config.json``)."""
    return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


def _module_weight_name(peft_module: str) -> str:
    module = peft_module.removeprefix(PEFT_PREFIX)
    return f"{module}.weight"


def _full_tensor_name(key: str) -> str:
    """Base tensor name of a full tensor saved in an adapter (modules_to_save, embeddings...)."""
    parts = key.removeprefix(PEFT_PREFIX).split(".")
    if "modules_to_save" in parts:
        index = parts.index("modules_to_save")
        # "lm_head.modules_to_save.default.weight" → "lm_head.weight" (the adapter name is optional)
        parts = parts[:index] + parts[-1:]
    return ".".join(part for part in parts if part not in ("base_layer", "original_module"))


class LoraAdapter:
    """A PEFT LoRA adapter directory, read lazily.

    ``modules`` maps each adapted base weight name to its ``LoraModule``; ``full_tensors`` maps base
    tensor names to full replacement tensors the adapter carries (``modules_to_save``, trained
    biases, resized embeddings). A merged weight is ``full_tensor(name)`` if present, else the base
    weight, plus ``delta(name, shape)``.
    """

    def __init__(
        self,
        path: Path,
        config: dict[str, Any],
        weights: Checkpoint,
        modules: dict[str, LoraModule],
        full_tensors: dict[str, str],
    ) -> None:
        self.path = path
        self.config = config
        self.modules = modules
        self.full_tensors = full_tensors
        self._weights = weights

    @classmethod
    def open(cls, path: str | Path) -> LoraAdapter:
        path = Path(path).expanduser()
        config_file = path / ADAPTER_CONFIG
        if not config_file.is_file():
            raise CheckpointError(
                f"{path}: not a PEFT adapter directory (no {ADAPTER_CONFIG}); pass the folder "
                "that adapter.save_pretrained() wrote."
            )
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{config_file}: cannot parse it as JSON ({error}).") from error
        _check_supported(config_file, config)
        for name in (ADAPTER_SAFETENSORS, ADAPTER_BIN):
            if (path / name).is_file():
                weights = Checkpoint.from_weight_files(path, [path / name], config)
                break
        else:
            raise CheckpointError(
                f"{path}: adapter has no weights; looked for {ADAPTER_SAFETENSORS} and "
                f"{ADAPTER_BIN}."
            )
        modules, full_tensors = _parse_modules(weights, config)
        return cls(path, config, weights, modules, full_tensors)

    @property
    def base_model_name_or_path(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def target_weight_names(self) -> set[str]:
        """Base tensor names this adapter adds a low-rank delta to."""
        return set(self.modules)

    def _module(self, weight_name: str) -> LoraModule:
        module = self.modules.get(weight_name)
        if module is None:
            raise CheckpointError(
                f"{self.path}: adapter has no LoRA module for base tensor {weight_name!r} "
                f"(it adapts {len(self.modules)} tensors; see target_weight_names())."
            )
        return module

    def is_embedding(self, weight_name: str) -> bool:
        """True if ``weight_name`` is adapted by embedding LoRA (``lora_embedding_A/B``).

        This is the flag ``write_adapter`` takes beside each module's factors.
        """
        return self._module(weight_name).is_embedding

    def factors(self, weight_name: str) -> LoraFactors:
        """The module's factors in PEFT orientation: ``delta_peft = scale · up @ down``."""
        module = self._module(weight_name)
        return LoraFactors(
            down=self._weights.get(module.down_key),
            up=self._weights.get(module.up_key),
            scale=module.scale,
        )

    def delta(self, weight_name: str, shape: tuple[int, ...] | torch.Size) -> torch.Tensor | None:
        """The float32 delta this adapter adds to base tensor ``weight_name`` (None if untouched).

        The delta is in the base tensor's orientation: transposed for embeddings and for GPT-2
        Conv1D (``fan_in_fan_out``) layers.
        """
        module = self.modules.get(weight_name)
        if module is None:
            return None
        delta = self.factors(weight_name).delta()
        shape = tuple(shape)
        transposed = module.is_embedding or module.fan_in_fan_out
        peft_shape = tuple(delta.shape)
        if not module.is_embedding and peft_shape[0] != peft_shape[1]:
            # PEFT picks fan_in_fan_out per layer type (Conv1D: in × out, Linear: out × in) whatever
            # the config says; for a non-square weight the shape tells the layer type apart.
            if peft_shape == shape:
                transposed = False
            elif peft_shape[::-1] == shape:
                transposed = True
        if transposed:
            delta = delta.T
        if tuple(delta.shape) != shape:
            raise ShapeMismatchError(
                f"{self.path}: LoRA delta for {weight_name!r} has shape {list(delta.shape)} but "
                f"the base tensor has shape {list(shape)}; is this adapter for a different base "
                f"model (it names {self.base_model_name_or_path!r})?"
            )
        return delta.contiguous()

    def full_tensor(self, weight_name: str) -> torch.Tensor | None:
        """A full replacement tensor the adapter carries for ``weight_name``, or None."""
        key = self.full_tensors.get(weight_name)
        return None if key is None else self._weights.get(key)

    def close(self) -> None:
        self._weights.close()

    def __enter__(self) -> LoraAdapter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LoraAdapter({str(self.path)!r}, {len(self.modules)} modules)"


def _check_supported(config_file: Path, config: dict[str, Any]) -> None:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise CheckpointError(
            f"{config_file}: peft_type is {peft_type}; mergearena reads only LoRA adapters. Merge "
            "it into its base with PEFT (merge_and_unload) and use the result as a full checkpoint."
        )
    for key, why in _UNSUPPORTED_SETTINGS.items():
        if config.get(key):
            raise CheckpointError(
                f"{config_file}: {key} is set, which mergearena does not support ({why}). Merge "
                "it into its base with PEFT (merge_and_unload) and use the result as a full "
                "checkpoint."
            )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        raise CheckpointError(
            f"{config_file}: init_lora_weights is {init!r}, which also modifies the base weights, "
            "so the adapter's delta is not relative to the original base. Save it converted to a "
            "plain LoRA (save_pretrained(path_initial_model_for_weight_conversion=...)) first."
        )


def _parse_modules(
    weights: Checkpoint, config: dict[str, Any]
) -> tuple[dict[str, LoraModule], dict[str, str]]:
    """Group an adapter file's keys into LoRA modules and full tensors, both by base tensor name."""
    source = next(iter(weights.tensors.values())).file if weights.tensors else weights.path
    parts: dict[tuple[str, bool], dict[str, str]] = {}  # (module, is_embedding) → {"A": key, ...}
    full_tensors: dict[str, str] = {}
    adapter_names: set[str] = set()
    for key in weights.tensors:
        match = _LINEAR_KEY.match(key) or _EMBEDDING_KEY.match(key)
        if match:
            is_embedding = "lora_embedding_" in key
            parts.setdefault((match["module"], is_embedding), {})[match["part"]] = key
            adapter_names.add(match["adapter"] or "")
        elif "lora_" in key or "trainable_tokens" in key:
            raise CheckpointError(
                f"{source}: tensor {key!r} is not a LoRA A/B factor (DoRA magnitude, LoRA bias or "
                "another adapter type?); mergearena reads plain LoRA adapters only."
            )
        else:
            full_tensors[_full_tensor_name(key)] = key
    if len(adapter_names) > 1:
        names = ", ".join(sorted(name or "(unnamed)" for name in adapter_names))
        raise CheckpointError(
            f"{source}: holds factors of several adapters ({names}); save each adapter separately."
        )

    rank_pattern: dict[str, int] = config.get("rank_pattern") or {}
    alpha_pattern: dict[str, float] = config.get("alpha_pattern") or {}
    default_rank = config.get("r", 8)
    default_alpha = config.get("lora_alpha", 8)
    use_rslora = bool(config.get("use_rslora", False))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    modules: dict[str, LoraModule] = {}
    for (peft_module, is_embedding), keys in parts.items():
        if set(keys) != {"A", "B"}:
            missing = "lora_B" if "A" in keys else "lora_A"
            raise CheckpointError(
                f"{source}: LoRA module {peft_module!r} has no {missing} tensor; the adapter file "
                "is incomplete, re-save it."
            )
        module_name = peft_module.removeprefix(PEFT_PREFIX)
        rank = weights.tensors[keys["A"]].shape[0]
        rank_key = get_pattern_key(list(rank_pattern), module_name)
        alpha_key = get_pattern_key(list(alpha_pattern), module_name)
        declared_rank = rank_pattern.get(rank_key, default_rank)
        alpha = alpha_pattern.get(alpha_key, default_alpha)
        up_shape = weights.tensors[keys["B"]].shape
        if declared_rank != rank or len(up_shape) != 2 or up_shape[1] != rank:
            raise ShapeMismatchError(
                f"{source}: LoRA module {module_name!r} has lora_A of shape "
                f"{list(weights.tensors[keys['A']].shape)} and lora_B of shape {list(up_shape)}, "
                f"but the config declares rank {declared_rank}; the adapter is inconsistent."
            )
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        weight_name = _module_weight_name(peft_module)
        modules[weight_name] = LoraModule(
            weight_name=weight_name,
            down_key=keys["A"],
            up_key=keys["B"],
            rank=rank,
            alpha=alpha,
            scale=scale,
            is_embedding=is_embedding,
            fan_in_fan_out=fan_in_fan_out and not is_embedding,
        )
    return modules, full_tensors


def _alpha_for_scale(scale: float, rank: int) -> float:
    """The alpha whose PEFT scale ``alpha / rank`` is ``scale``: exact when a float allows it.

    ``scale * rank / rank`` can miss ``scale`` by an ulp, so the neighbours of ``scale * rank`` are
    searched; when no float divides to ``scale`` exactly (e.g. 0.1 at rank 3) the nearest wins.
    """
    candidates = [scale * rank]
    for _ in range(4):
        candidates.insert(0, math.nextafter(candidates[0], -math.inf))
        candidates.append(math.nextafter(candidates[-1], math.inf))
    return min(candidates, key=lambda alpha: (abs(alpha / rank - scale), alpha != scale * rank))


def _most_common(values: list[Any]) -> Any:
    counts = Counter(values)
    return max(counts, key=lambda value: (counts[value], -values.index(value)))


def write_adapter(
    out_dir: str | Path,
    modules: dict[str, tuple[LoraFactors, bool]],
    base_model_name_or_path: str | None = None,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Write a PEFT-loadable LoRA adapter; ``modules``: base weight name → (factors, is_embedding).

    Each module's effective PEFT scale (``lora_alpha / r``, with per-module ``rank_pattern`` and
    ``alpha_pattern``) equals its ``LoraFactors.scale`` exactly; the factors are stored unchanged.
    ``target_modules`` lists full module names, so PEFT adapts exactly these modules.
    ``extra_config`` adds settings such as ``fan_in_fan_out`` or ``task_type``.
    """
    from mergearena.checkpoints.writer import save_safetensors

    out_dir = Path(out_dir)
    if not modules:
        raise CheckpointError(f"{out_dir}: refusing to write an adapter with no LoRA modules.")
    reserved = {"r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "target_modules"}
    clashing = sorted(reserved & set(extra_config or {}))
    if clashing:
        raise CheckpointError(
            f"write_adapter: extra_config may not set {', '.join(clashing)}; they are derived from "
            "the factors so every module keeps its scale."
        )
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for weight_name, (factors, is_embedding) in modules.items():
        if not weight_name.endswith(".weight"):
            raise CheckpointError(
                f"write_adapter: {weight_name!r} is not a weight tensor name (LoRA adapts "
                "'<module>.weight' tensors)."
            )
        if factors.down.ndim != 2 or factors.up.ndim != 2 or factors.up.shape[1] != factors.rank:
            raise ShapeMismatchError(
                f"write_adapter: factors for {weight_name!r} do not chain: down (lora_A) has shape "
                f"{list(factors.down.shape)} and up (lora_B) {list(factors.up.shape)}."
            )
        module = weight_name.removesuffix(".weight")
        prefix = f"{PEFT_PREFIX}{module}"
        down_key, up_key = (
            (f"{prefix}.lora_embedding_A", f"{prefix}.lora_embedding_B")
            if is_embedding
            else (f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight")
        )
        tensors[down_key] = factors.down.detach().cpu().contiguous()
        tensors[up_key] = factors.up.detach().cpu().contiguous()
        ranks[module] = factors.rank
        alphas[module] = _alpha_for_scale(float(factors.scale), factors.rank)

    rank = _most_common(list(ranks.values()))
    alpha = _most_common(list(alphas.values()))
    # Pattern keys are regular expressions matched against module names: escape the dots.
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "use_rslora": False,
        "target_modules": sorted(ranks),
        "rank_pattern": {re.escape(m): r for m, r in ranks.items() if r != rank},
        "alpha_pattern": {re.escape(m): a for m, a in alphas.items() if a != alpha},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    config.update(extra_config or {})
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, out_dir / ADAPTER_SAFETENSORS)
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out_dir
