from dataclasses import InitVar, asdict, dataclass, fields
from pathlib import Path

from common.errors import UserError
from common.files import read_json

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_ROPE_TYPES = ("default", "llama3")
POSITIVE_INTS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "vocab_size", "max_position_embeddings")
POSITIVE_NUMBERS = ("rope_theta", "rms_norm_eps")
BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias")
LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def _check_rope_scaling(scaling, source: str, name: str) -> None:
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise UserError(f"{source}: {name}={scaling!r} is not an object")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UserError(f"{source}: {name}.rope_type={rope_type!r} is not supported "
                        f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if rope_type != "llama3":
        return
    for key in LLAMA3_SCALING_KEYS:
        if not _is_positive_number(scaling.get(key)):
            wanted = "is not a positive number" if key in scaling else "is missing"
            raise UserError(f"{source}: {name}.{key}={scaling.get(key)!r} {wanted}")
    if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise UserError(f"{source}: {name}.high_freq_factor={scaling['high_freq_factor']!r} is not above "
                        f"low_freq_factor={scaling['low_freq_factor']!r}")


@dataclass
class LlamaConfig:
    """The fields of a Hugging Face Llama `config.json` that the decoder uses, under the same names. Every value is
    checked on construction; errors name `source` (the file) and the key."""

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
    source: InitVar[str] = "config"

    def __post_init__(self, source: str) -> None:
        def check(ok: bool, key: str, value, wanted: str) -> None:
            if not ok:
                raise UserError(f"{source}: {key}={value!r} {wanted}")

        for key in POSITIVE_INTS:
            value = getattr(self, key)
            check(_is_int(value) and value > 0, key, value, "is not a positive integer")
        for key in POSITIVE_NUMBERS:
            check(_is_positive_number(getattr(self, key)), key, getattr(self, key), "is not a positive number")
        for key in BOOLS:
            check(isinstance(getattr(self, key), bool), key, getattr(self, key), "is not true or false")
        for key in ("bos_token_id", "eos_token_id"):
            value = getattr(self, key)
            ids = value if isinstance(value, list) and key == "eos_token_id" else [value]
            check(value is None or all(_is_int(i) and i >= 0 for i in ids), key, value, "is not a token id")
        if self.head_dim is None:
            check(self.hidden_size % self.num_attention_heads == 0, "hidden_size", self.hidden_size,
                  f"is not a multiple of num_attention_heads={self.num_attention_heads}")
            self.head_dim = self.hidden_size // self.num_attention_heads
        # RoPE rotates the two halves of each head against each other.
        check(_is_int(self.head_dim) and self.head_dim > 0 and self.head_dim % 2 == 0, "head_dim", self.head_dim,
              "is not a positive even integer")
        check(self.num_attention_heads % self.num_key_value_heads == 0, "num_attention_heads",
              self.num_attention_heads, f"is not a multiple of num_key_value_heads={self.num_key_value_heads}")
        _check_rope_scaling(self.rope_scaling, source, "rope_scaling")

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "LlamaConfig":
        if not isinstance(raw, dict):
            raise UserError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        architectures = raw.get("architectures") or ["LlamaForCausalLM"]
        if not isinstance(architectures, list) or architectures[0] not in SUPPORTED_ARCHITECTURES:
            raise UserError(f"{source}: architectures={architectures!r} is not supported (expected LlamaForCausalLM)")
        if raw.get("model_type", "llama") != "llama":
            raise UserError(f"{source}: model_type={raw['model_type']!r} is not supported (expected 'llama')")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        if raw.get("rope_parameters"):  # transformers >= 5 writes theta and scaling under one key
            rope = raw["rope_parameters"]
            _check_rope_scaling(rope, source, "rope_parameters")
            rope = dict(rope)
            values["rope_theta"] = rope.pop("rope_theta", values.get("rope_theta", cls.rope_theta))
            if not _is_positive_number(values["rope_theta"]):
                raise UserError(f"{source}: rope_parameters.rope_theta={values['rope_theta']!r} "
                                "is not a positive number")
            values["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
        return cls(**values, source=source)

    @classmethod
    def from_json(cls, path: str | Path) -> "LlamaConfig":
        path = Path(path)
        return cls.from_dict(read_json(path, f"{path}: no config.json"), source=str(path))

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each projection of a block, by its module path within the block (as the checkpoint names
        it: `model.layers.<i>.<path>.weight`)."""
        hidden, heads = self.hidden_size, self.num_attention_heads * self.head_dim
        kv, mlp = self.num_key_value_heads * self.head_dim, self.intermediate_size
        return {"self_attn.q_proj": (heads, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
                "self_attn.o_proj": (hidden, heads), "mlp.gate_proj": (mlp, hidden), "mlp.up_proj": (mlp, hidden),
                "mlp.down_proj": (hidden, mlp)}

    def to_dict(self) -> dict:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **asdict(self)}


LLAMA_3_1_8B = LlamaConfig(
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
)
