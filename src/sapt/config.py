"""The typed configuration of a SAPT model, saved beside every task's artifacts."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .methods.registry import METHOD_NAMES, get_method
from .utils import rules

# Which projections carry the task blocks, per backbone family (docs/methods.md: q and v of every attention).
# Any decoder-only family whose attention names its projections q_proj/v_proj works with the default.
TARGET_MODULES = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "llama": ["q_proj", "v_proj"],
}
DEFAULT_DECODER_TARGET_MODULES = ["q_proj", "v_proj"]

CONFIG_NAME = "sapt_config.json"

# How a task's new parameters (key, block A matrices) are drawn. 1: from the process's global random
# stream, so every task of a one-process-per-task pipeline started from the same draws (a defect);
# 2: from a generator seeded by (seed, task position), so every task draws its own. Folders written
# before the field existed hold scheme 1.
INIT_SCHEME = 2
LEGACY_INIT_SCHEME = 1


def default_target_modules(model_type: str) -> list[str]:
    return list(TARGET_MODULES.get(model_type, DEFAULT_DECODER_TARGET_MODULES))


def release_temperature(attn_temperature: float, is_encoder_decoder: bool) -> str:
    """Map the release's `attn_temperature` flag to a named temperature (docs/methods.md, sapt).

    T5 scripts: 1 -> sqrt(d), anything else -> sqrt(2d). LLaMA scripts: 1 -> sqrt(d),
    2 -> sqrt(d/2), anything else -> 1.
    """
    if attn_temperature == 1:
        return "sqrt_d"
    if is_encoder_decoder:
        return "sqrt_2d"
    return "sqrt_half_d" if attn_temperature == 2 else "one"


_NAMED_TEMPERATURES = {
    "sqrt_d": lambda d: math.sqrt(d),
    "sqrt_2d": lambda d: math.sqrt(2 * d),
    "sqrt_half_d": lambda d: math.sqrt(d / 2),
    "one": lambda d: 1.0,
}


@dataclass
class SaptConfig:
    """Everything needed to rebuild a SAPT model on top of its backbone."""

    base_model_name_or_path: str = field(metadata={"help": "Backbone the blocks were trained on."})
    model_type: str = field(metadata={"help": "HF model_type of the backbone (t5, llama, ...)."})
    is_encoder_decoder: bool = field(metadata={"help": "True for T5-like backbones."})
    hidden_size: int = field(metadata={"help": "Width d of the input embeddings (router width)."})
    target_modules: list[str] = field(default_factory=list, metadata={"help": "Projection names wrapped."})
    r: int = field(default=4, metadata={"help": "LoRA rank of every task block."})
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha; blocks are scaled by alpha / r."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the block input."})
    query_dim: int = field(default=100, metadata={"help": "Bottleneck width of the router's query network."})
    temperature: str | float = field(
        default="sqrt_d", metadata={"help": "Router temperature: sqrt_d, sqrt_2d, sqrt_half_d, one, or a number."}
    )
    pool_padding: bool = field(
        default=False,
        metadata={"help": "Max-pool over padding positions too (the release's behaviour; batch-dependent)."},
    )
    method: str = field(default="sapt", metadata={"help": f"Continual-learning method: {', '.join(METHOD_NAMES)} (sapt.methods.registry)."})
    tasks: list[str] = field(default_factory=list, metadata={"help": "Tasks learned so far, oldest first."})
    init_scheme: int = field(
        default=INIT_SCHEME,
        metadata={"help": "Oldest scheme any block of the run was initialised with (1: shared draws, a defect; 2: per task)."},
    )

    def __post_init__(self):
        if not self.target_modules:
            self.target_modules = default_target_modules(self.model_type)
        problem = rules.first_problem({f.name: getattr(self, f.name) for f in fields(self)}, _FIELD_RULES)
        if problem:
            raise ValueError(problem)
        get_method(self.method)  # an unknown name fails here, listing the methods
        self.temperature_value()  # validate early

    def temperature_value(self) -> float:
        if isinstance(self.temperature, (int, float)) and not isinstance(self.temperature, bool):
            if self.temperature <= 0:
                raise ValueError(f"temperature must be positive, got {self.temperature}")
            return float(self.temperature)
        try:
            return _NAMED_TEMPERATURES[self.temperature](self.hidden_size)
        except KeyError:
            raise ValueError(
                f"unknown temperature {self.temperature!r}; use one of {sorted(_NAMED_TEMPERATURES)} or a number"
            ) from None

    @property
    def routed(self) -> bool:
        """Blocks mixed by a learned router (SAPT) rather than summed."""
        return get_method(self.method).routed

    @property
    def block_per_task(self) -> bool:
        return get_method(self.method).block_per_task

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SaptConfig:
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, found {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown SAPT config keys: {sorted(unknown)}")
        data = {"init_scheme": LEGACY_INIT_SCHEME, **data}  # written before schemes were recorded
        return cls(**data)  # __post_init__ checks every field against _FIELD_RULES

    @classmethod
    def for_backbone(cls, backbone, name_or_path: str, **overrides) -> SaptConfig:
        """Fill the backbone-dependent fields from a loaded HF model."""
        hf = backbone.config
        hidden = backbone.get_input_embeddings().embedding_dim
        return cls(
            base_model_name_or_path=name_or_path,
            model_type=hf.model_type,
            is_encoder_decoder=bool(hf.is_encoder_decoder),
            hidden_size=hidden,
            **overrides,
        )

    def save(self, directory: str | Path) -> None:
        from .utils.fileio import write_json_atomic

        write_json_atomic(Path(directory) / CONFIG_NAME, self.to_dict())

    @classmethod
    def load(cls, directory: str | Path) -> SaptConfig:
        path = Path(directory) / CONFIG_NAME
        try:
            data = json.loads(path.read_text())
            return cls.from_dict(data)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no SAPT config here") from None
        except (json.JSONDecodeError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: invalid SAPT config ({err})") from None


# What each field of a stored config may hold (a hand-edited or damaged file fails here, by name).
_FIELD_RULES = {
    "base_model_name_or_path": rules.text(),
    "model_type": rules.text(non_empty=True),
    "is_encoder_decoder": rules.flag(),
    "hidden_size": rules.integer(at_least=1),
    "target_modules": rules.texts(non_empty=True),
    "r": rules.integer(at_least=1),
    "alpha": rules.number(),
    "dropout": rules.interval(0, 1, "[)"),
    "query_dim": rules.integer(at_least=1),
    "temperature": rules.either(rules.text(), rules.number()),
    "pool_padding": rules.flag(),
    "method": rules.text(),
    "tasks": rules.texts(),
    "init_scheme": rules.integer(at_least=1, at_most=INIT_SCHEME),
}
