"""SaptModel: a stock HuggingFace model whose target projections are wrapped by SaptLinear.

The wrapper owns the router and computes the routing weights once per forward (from the input token
embeddings) or once per `generate` (from the prompt), then lets the unmodified backbone run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch import nn

from .config import SaptConfig
from .layer import RoutingState, SaptLinear
from .router import IGNORE_INDEX, Router, pooled_positions, routing_logits, to_weights

__all__ = ["IGNORE_INDEX", "SaptModel", "target_linears", "task_generator"]  # IGNORE_INDEX: where labels are read


def task_generator(seed: int, position: int) -> torch.Generator:
    """The random stream that draws the new parameters of the task at `position` (0-based) of a run.

    Every task of a pipeline runs in its own process with the same seed, so the global stream stands
    at the same point whenever a task's key and block are drawn: they would start identical to the
    previous task's, and the router could not tell the tasks apart. A stream of its own per
    (seed, position) gives every task independent draws, and the same ones on every rerun."""
    digest = hashlib.sha256(f"sapt-task-init/{seed}/{position}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def target_linears(backbone: nn.Module, target_modules) -> list[tuple[str, nn.Linear]]:
    """(path, module) of every nn.Linear whose own name is one of `target_modules`: the projections
    that carry task blocks (also checked before loading, on a meta-device copy of the model)."""
    targets = set(target_modules)
    return [
        (name, module)
        for name, module in backbone.named_modules()
        if name.rsplit(".", 1)[-1] in targets and isinstance(module, nn.Linear)
    ]


def _wrap_projections(backbone: nn.Module, config: SaptConfig, routing: RoutingState) -> int:
    """Replace every nn.Linear named in config.target_modules with a SaptLinear; return how many."""
    matches = target_linears(backbone, config.target_modules)
    for name, module in matches:
        parent_name, _, child = name.rpartition(".")
        parent = backbone.get_submodule(parent_name) if parent_name else backbone
        setattr(parent, child, SaptLinear(module, config.r, config.alpha, config.dropout, routing))
    return len(matches)


class SaptModel(nn.Module):
    """Backbone + per-task LoRA blocks + router. `forward`/`generate` take the backbone's arguments."""

    # The backbone's loss is a plain per-batch mean (T5 ignores token counts); SaptTrainer rescales it
    # and scales the ARM term alike (the release scaled only CE; docs/differences.md).
    accepts_loss_kwargs = False
    main_input_name = "input_ids"

    def __init__(self, backbone: nn.Module, config: SaptConfig):
        super().__init__()
        self.base_model = backbone
        self.sapt_config = config
        self.routing = RoutingState()
        if _wrap_projections(backbone, config, self.routing) == 0:
            raise ValueError(
                f"no nn.Linear named {config.target_modules} in {type(backbone).__name__}; "
                "set target_modules to the names of its attention projections"
            )
        for param in backbone.parameters():  # after the check: a refused backbone is left as it was
            param.requires_grad_(False)
        # A plain list: the layers stay registered once, under the backbone.
        self._layers = [module for module in backbone.modules() if isinstance(module, SaptLinear)]
        self.router = None
        if config.routed:
            device = backbone.get_input_embeddings().weight.device
            self.router = Router(config.hidden_size, config.query_dim, config.temperature_value()).to(device)

    # ---- HF-facing attributes -------------------------------------------------------------------
    @property
    def config(self):
        return self.base_model.config

    @property
    def generation_config(self):
        return self.base_model.generation_config

    @property
    def device(self) -> torch.device:
        return self.base_model.get_input_embeddings().weight.device

    def get_input_embeddings(self) -> nn.Module:
        return self.base_model.get_input_embeddings()

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """Gradient (activation) checkpointing of the backbone's layers. Non-reentrant checkpointing lets
        the recomputed layers read the routing weights, and pass gradient to the router, without the
        weights being an explicit input of each layer."""
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        if kwargs["use_reentrant"]:
            raise ValueError("SAPT needs non-reentrant checkpointing (use_reentrant=False)")
        if hasattr(self.base_model, "activation_checkpointing_enable"):
            self.base_model.activation_checkpointing_enable(kwargs, every_n_layers=every_n_layers, offload=offload)
        else:  # transformers releases before the rename
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def activation_checkpointing_disable(self) -> None:
        if hasattr(self.base_model, "activation_checkpointing_disable"):
            self.base_model.activation_checkpointing_disable()
        else:
            self.base_model.gradient_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        if hasattr(type(self.base_model), "is_activation_checkpointing"):
            return self.base_model.is_activation_checkpointing
        return self.base_model.is_gradient_checkpointing

    # ---- blocks and tasks -----------------------------------------------------------------------
    def sapt_layers(self) -> Iterator[tuple[str, SaptLinear]]:
        for name, module in self.base_model.named_modules():
            if isinstance(module, SaptLinear):
                yield name, module

    @property
    def num_blocks(self) -> int:
        return self._layers[0].num_blocks

    @property
    def tasks(self) -> list[str]:
        return list(self.sapt_config.tasks)

    def add_task(self, *tasks: str, seed: int = 0) -> None:
        """Make the model ready to learn a task: a new trainable block (and key) for the methods with a
        block per task, else the one shared block made trainable again. Everything older stays frozen.
        Several tasks at once only for joint training (mtl). New parameters are drawn from
        `task_generator(seed, position)`, layers in module order, then the key."""
        learned = [t for t in tasks if t in self.sapt_config.tasks]
        if learned or len(set(tasks)) != len(tasks) or not tasks:
            raise ValueError(f"cannot learn {list(tasks)}: already learned or repeated: {learned or tasks}")
        if len(tasks) > 1 and self.sapt_config.block_per_task:
            raise ValueError(f"{self.sapt_config.method} learns one task per block")
        generator = task_generator(seed, len(self.sapt_config.tasks))
        new_block = self.sapt_config.block_per_task or self.num_blocks == 0
        for _, layer in self.sapt_layers():
            layer.add_block(generator) if new_block else layer.thaw_block()
        if self.router is not None:
            self.router.add_key(generator)
            self.router.query_net.requires_grad_(True)  # carried over from the last task, keeps training
        self.sapt_config.tasks.extend(tasks)

    def freeze_current_task(self) -> None:
        for _, layer in self.sapt_layers():
            layer.freeze_block()
        if self.router is not None:
            self.router.freeze_key()
            self.router.query_net.requires_grad_(False)

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    # ---- routing (computed by sapt.router; the model gives it the embeddings and the prompt) ---------
    def routing_logits(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) scores <k_j, q(x)> / tau, blocks oldest first, pooled over the prompt (sapt.router).
        Runs only embeddings -> router. Weights and log-weights are both taken from these."""
        if self.router is None:
            raise RuntimeError(f"{self.sapt_config.method} has no router")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        config = self.sapt_config
        mask = pooled_positions(
            attention_mask, labels, pool_padding=config.pool_padding, decoder_only=not config.is_encoder_decoder
        )
        return routing_logits(self.router, inputs_embeds, mask)

    def routing_weights(self, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None) -> torch.Tensor:
        """(B, T) routing distribution a(x) of routing_logits' inputs, blocks oldest first."""
        reference = input_ids if input_ids is not None else inputs_embeds
        if self.router is None or self.num_blocks == 1:
            # Summed blocks (or a one-entry softmax: a == 1, and the router gets no gradient).
            return torch.ones(reference.shape[0], self.num_blocks, device=reference.device)
        return to_weights(self.routing_logits(input_ids, attention_mask, labels, inputs_embeds))

    # ---- running --------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None, **kwargs):
        continuing = kwargs.get("past_key_values") is not None or kwargs.get("encoder_outputs") is not None
        if not continuing and (input_ids is not None or inputs_embeds is not None):
            self.routing.weights = self.routing_weights(input_ids, attention_mask, labels, inputs_embeds)
        return self.base_model(
            input_ids=input_ids, attention_mask=attention_mask, labels=labels, inputs_embeds=inputs_embeds, **kwargs
        )

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, routing_weights=None, **kwargs):
        """Route once from the prompt, then decode with the backbone's own `generate`.

        `routing_weights` (B, T), blocks oldest first, replaces the router's weights for each input. Only
        sapt.evaluate passes it (oracle, uniform, mean routing); the default path never does."""
        if routing_weights is None:
            routing_weights = self.routing_weights(input_ids, attention_mask, inputs_embeds=kwargs.get("inputs_embeds"))
        else:
            routing_weights = self._checked_routing(routing_weights, input_ids, kwargs.get("inputs_embeds"))
        self.routing.weights = routing_weights
        return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def _checked_routing(self, weights: torch.Tensor, input_ids, inputs_embeds) -> torch.Tensor:
        batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        if weights.shape != (batch, self.num_blocks):
            raise ValueError(
                f"routing weights of shape {tuple(weights.shape)} for {batch} inputs and {self.num_blocks} blocks"
            )
        return weights.to(device=self.device, dtype=torch.float32)
