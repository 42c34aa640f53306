"""The Llama-3.1 decoder. Module names follow the Hugging Face checkpoint, so weights load by name."""
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from model.config import LlamaConfig


def rope_inv_freq(config: LlamaConfig, device: torch.device | str | None = None) -> Tensor:
    """Inverse frequencies of the rotary embedding, with Llama-3 long-context scaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim)
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are stretched by `factor`, short ones kept, those between interpolated smoothly.
    smooth = (original_context / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > original_context / low, inv_freq / factor, inv_freq)
    is_medium = (wavelen >= original_context / high) & (wavelen <= original_context / low)
    return torch.where(is_medium, interpolated, scaled)


def rope_cos_sin(inv_freq: Tensor, seq_len: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    positions = torch.arange(seq_len, device=inv_freq.device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat((angles, angles), dim=-1)  # rotate-half layout: pairs (i, i + head_dim/2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, last: Tensor | None = None) -> Tensor:
        """[B, T, D] for every position, or [B, 1, D] for the position `last` [B] of each row only."""
        batch, seq_len, _ = x.shape
        k = self.k_proj(x).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        k = apply_rope(k, cos, sin)
        gqa = self.n_kv_heads != self.n_heads
        if last is None:
            q = self.q_proj(x).view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)
            # Rows are right-padded, so plain causal attention is exact for every real token.
            y = F.scaled_dot_product_attention(apply_rope(q, cos, sin), k, v, is_causal=True, enable_gqa=gqa)
        else:
            q = self.q_proj(x[torch.arange(batch, device=x.device), last]).view(batch, self.n_heads, 1, self.head_dim)
            q = apply_rope(q, cos[last].unsqueeze(1).unsqueeze(1), sin[last].unsqueeze(1).unsqueeze(1))
            visible = torch.arange(seq_len, device=x.device) <= last.unsqueeze(1)  # [B, T]: up to `last`
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None, None, :], enable_gqa=gqa)
            seq_len = 1
        return self.o_proj(y.transpose(1, 2).reshape(batch, seq_len, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = FeedForward(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, last: Tensor | None = None) -> Tensor:
        """[B, T, D], or [B, 1, D] at the position `last` [B] of each row (keys and values still span all)."""
        residual = x if last is None else x[torch.arange(x.shape[0], device=x.device), last].unsqueeze(1)
        x = residual + self.self_attn(self.input_layernorm(x), cos, sin, last)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.grad_checkpoint: bool | int = False  # True: recompute every block in backward; N: the first N

    def compile_blocks(self) -> None:
        """torch.compile each block (one graph serves them all); fuses norms, RoPE and SwiGLU on the GPU."""
        for block in self.model.layers:
            block.compile()

    def hidden_states(self, tokens: Tensor, last: Tensor | None = None) -> Tensor:
        """Final-norm hidden states [B, T, D] for right-padded token ids [B, T]; with `last` [B], only those
        at each row's position `last`, [B, D]: then the final block skips every other position's query,
        attention output and MLP, which nothing downstream reads."""
        x = self.model.embed_tokens(tokens)
        cos, sin = rope_cos_sin(self.inv_freq, tokens.shape[1], x.dtype)
        n_recomputed = len(self.model.layers) if self.grad_checkpoint is True else int(self.grad_checkpoint)
        final = len(self.model.layers) - 1
        for i, block in enumerate(self.model.layers):
            args = (x, cos, sin, last) if i == final and last is not None else (x, cos, sin)
            if i < n_recomputed and torch.is_grad_enabled():
                x = checkpoint(block, *args, use_reentrant=False)
            else:
                x = block(*args)
        x = self.model.norm(x)
        return x if last is None else x.squeeze(1)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits [B, T, V]."""
        return self.lm_head(self.hidden_states(tokens))
