from dataclasses import asdict, dataclass, fields
from pathlib import Path

from data.errors import UserError
from model.files import read_json

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_ROPE_TYPES = ("default", "llama3")


@dataclass
class LlamaConfig:
    """The fields of a Hugging Face Llama `config.json` that the decoder uses, under the same names."""

    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None
    vocab_size: int = 128256
    max_position_embeddings: int = 131072
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 128000
    eos_token_id: int | list[int] | None = 128001

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"config: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise UserError(f"config: rope_scaling.rope_type={rope_type!r} is not supported "
                                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "LlamaConfig":
        architectures = raw.get("architectures") or ["LlamaForCausalLM"]
        if architectures[0] not in SUPPORTED_ARCHITECTURES:
            raise UserError(f"{source}: architectures={architectures!r} is not supported (expected LlamaForCausalLM)")
        if raw.get("model_type", "llama") != "llama":
            raise UserError(f"{source}: model_type={raw['model_type']!r} is not supported (expected 'llama')")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        if raw.get("rope_parameters"):  # transformers >= 5 writes theta and scaling under one key
            rope = dict(raw["rope_parameters"])
            values["rope_theta"] = rope.pop("rope_theta", values.get("rope_theta", cls.rope_theta))
            values["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> "LlamaConfig":
        path = Path(path)
        return cls.from_dict(read_json(path, f"{path}: no config.json"), source=str(path))

    def to_dict(self) -> dict:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **asdict(self)}


LLAMA_3_1_8B = LlamaConfig(
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
)
