"""A routed model at inference: the base with its experts loaded beside it by PEFT, routed.

Per token (``arrow``): PEFT's ``create_arrow_model`` loads the experts and adds its
``arrow_router`` adapter, which in every LoRA layer mixes the ``top_k`` experts nearest each token.
A token's mix depends on that token's input to the layer alone, so scoring from a KV cache (the
prompt run once, each choice continuing from it) gives what a pass over prompt + choice gives.

Per prompt (``prompt``): the experts are PEFT adapters of one ``PeftModel`` and every row of a batch
names its own through PEFT's mixed-batch ``adapter_names``. A pass that starts a sequence (no cache,
or an empty one) is routed by the prompt's embedding (``prompt_embeddings``) and the choice is
recorded on the KV cache it returns; a pass that continues from a cache (a multiple-choice
example's choices, generated tokens) reads each row's expert from there, so a whole example runs on
one expert however its rows are batched. The scorer's shared prompt cache (``evaluation.scoring``)
hands row r the prompt ``owner[r]`` of its batch; its fallback selects rows with
``batch_select_indices``, which ``RoutedCache`` follows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import DynamicCache

from mergearena.checkpoints.refs import resolve_model_ref
from mergearena.checkpoints.routed import ArrowRouter, Manifest, read_manifest
from mergearena.errors import CheckpointError, EvaluationError
from mergearena.models.kv_cache import cache_keyword
from mergearena.models.loading import (
    load_model,
    load_tokenizer,
    parse_device,
    parse_dtype,
    quiet_transformers,
)


def prompt_embeddings(
    backbone: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Unit vectors (rows × hidden, float32): the mean of ``backbone``'s last hidden state over
    each row's unmasked tokens. Positions count unmasked tokens, so padding changes nothing."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False
    ).last_hidden_state.float()
    weights = attention_mask.unsqueeze(-1).float()
    mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(mean, dim=-1)


class RoutedCache(DynamicCache):
    """A KV cache that also holds each row's expert (``routed_experts``) and keeps it aligned when
    rows are selected."""

    routed_experts: torch.Tensor

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.routed_experts = self.routed_experts[indices.to(self.routed_experts.device)]


class RoutedModel(torch.nn.Module):
    """``forward`` and ``generate`` of a PEFT model with K experts, routed (module docstring).

    ``centroids`` (K × hidden, unit rows) and ``names`` (the experts' adapter names, in the same
    order) route per prompt; without them the model routes itself (Arrow).
    """

    centroids: torch.Tensor | None  # a buffer, registered in __init__

    def __init__(
        self, peft_model: Any, names: list[str] | None = None, centroids: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.peft_model = peft_model
        self.config = peft_model.get_base_model().config
        self.names = names
        self.register_buffer("centroids", centroids, persistent=False)

    def get_output_embeddings(self) -> Any:
        return self.peft_model.get_output_embeddings()

    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Each row's expert index: the centroid nearest its embedding under the base alone."""
        with self.peft_model.disable_adapter():
            backbone = self.peft_model.get_base_model().base_model
            embedding = prompt_embeddings(backbone, input_ids, attention_mask)
        if self.centroids is None:
            raise EvaluationError(
                "this routed model routes itself (Arrow) and has no centroids to route prompts by"
            )
        return (embedding @ self.centroids.float().T).argmax(-1)

    def _adapter_names(self, experts: torch.Tensor) -> list[str]:
        assert self.names is not None
        return [self.names[k] for k in experts.tolist()]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        past_key_values: Any = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> Any:
        cache = cache if cache is not None else past_key_values
        if self.centroids is not None:
            if input_ids is None:
                raise EvaluationError("a prompt-routed model needs input_ids to route by")
            if cache is not None and cache.get_seq_length() > 0:
                experts = _continued_experts(cache, input_ids.shape[0])
            else:
                experts = self.route(input_ids, attention_mask)
                if cache is None and use_cache is not False:
                    cache = RoutedCache(config=self.config)
                if cache is not None:
                    cache.routed_experts = experts
            kwargs["adapter_names"] = self._adapter_names(experts)
        if cache is not None:
            base_class = type(self.peft_model.get_base_model())
            # mypy holds classes unhashable for functools.cache (python/mypy#11470)
            kwargs[cache_keyword(base_class)] = cache  # type: ignore[arg-type]
        return self.peft_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        if self.centroids is not None:
            if input_ids is None:
                raise EvaluationError("a prompt-routed model needs input_ids to route by")
            kwargs["adapter_names"] = self._adapter_names(self.route(input_ids, attention_mask))
        return self.peft_model.generate(
            input_ids=input_ids, attention_mask=attention_mask, **kwargs
        )


def _continued_experts(cache: Any, rows: int) -> torch.Tensor:
    """The expert of each row continuing from ``cache`` (see the module docstring)."""
    experts = getattr(cache, "routed_experts", None)
    if experts is None:
        raise EvaluationError(
            "a prompt-routed model was given a KV cache it did not make, so it cannot tell which "
            "expert each row's prompt used; run the prompt through the model first"
        )
    owner = getattr(cache.layers[0], "owner", None)  # the scorer's shared prompt cache
    if owner is not None:
        experts = experts[owner.to(experts.device)]
    if len(experts) != rows:
        raise EvaluationError(
            f"a prompt-routed model continued {rows} rows from a cache of {len(experts)} prompts; "
            "select the cache's rows with batch_select_indices first"
        )
    return experts


def load_routed(
    directory: Path,
    *,
    device: str = "cpu",
    dtype: str = "auto",
    allow_download: bool = False,
) -> tuple[RoutedModel, Any]:
    """The routed model in ``directory`` (see ``checkpoints.routed``) on ``device``, and its base's
    tokenizer: what ``LanguageModel.load`` wraps."""
    manifest = read_manifest(directory)
    base_dir = resolve_model_ref(manifest.base, allow_download=allow_download)
    torch_device, torch_dtype = parse_device(device), parse_dtype(dtype, device)
    base = load_model(base_dir, torch_dtype)
    if getattr(base.config, "is_encoder_decoder", False):
        raise CheckpointError(f"{directory}: routed models need a decoder-only base model")
    with quiet_transformers():
        peft_model = _with_experts(base, directory, manifest)
    centroids = None
    if not isinstance(manifest.router, ArrowRouter):
        centroids = load_file(directory / manifest.router.centroids)["centroids"]
    names = [expert.name for expert in manifest.experts]
    model = RoutedModel(peft_model, names, centroids)
    return model.to(torch_device), load_tokenizer(base_dir)


def _with_experts(base: Any, directory: Path, manifest: Manifest) -> Any:
    """``base`` as a ``PeftModel`` holding every expert (and Arrow's router)."""
    from peft import PeftModel, create_arrow_model  # slow to import: only when loading experts
    from peft.tuners.lora import ArrowConfig

    paths = [str(directory / expert.adapter) for expert in manifest.experts]
    router = manifest.router
    try:
        if isinstance(router, ArrowRouter):
            config = ArrowConfig(
                top_k=router.top_k,
                router_temperature=router.temperature,
                use_gks=bool(router.general),
                rng_seed=router.rng_seed,
            )
            general = [str(directory / path) for path in router.general] or None
            return create_arrow_model(base, paths, config, general_adapter_paths=general)
        names = [expert.name for expert in manifest.experts]
        model = PeftModel.from_pretrained(base, paths[0], adapter_name=names[0])
        for name, path in zip(names[1:], paths[1:], strict=True):
            model.load_adapter(path, adapter_name=name)
        return model
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as error:
        raise CheckpointError(
            f"{directory}: cannot load the experts on {manifest.base}: {error}"
        ) from None
