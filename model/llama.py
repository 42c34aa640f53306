"""The Llama-3.1 decoder. Module names follow the Hugging Face checkpoint, so weights load by name.

Rows come right-padded, [B, T], or packed end to end into one line, [1, T], with a `Packing` that says where each
row starts; then positions restart at each row and attention stays within it."""
import contextlib
import math
from itertools import pairwise
from typing import NamedTuple

import torch
import torch._functorch.config
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from model.config import LlamaConfig

try:  # variable-length flash attention (torch >= 2.9)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None


class Packing(NamedTuple):
    """Where the rows of a packed line [1, T] lie: sequence s is positions cu_seqlens[s]:cu_seqlens[s + 1] (the
    rows, then the padding, then empty sequences so that every line has the same number); `doc` [T] is each
    position's sequence, `positions` [T] its position within it. No sequence is longer than `max_seqlen`.

    With `kv_index`, sequence s reads the keys at kv_index[cu_seqlens_k[s]:cu_seqlens_k[s + 1]] (`kv_doc`: each key's
    sequence), which may begin with another sequence's: a shared prefix, computed once for the rows that follow it.
    Its queries are the last of its keys, so each sees the keys up to itself. `flash`: attention runs flash
    attention's variable-length kernel (set by Llama.hidden_states where the line's device has it)."""
    cu_seqlens: Tensor  # int32 [S + 1]
    doc: Tensor  # int64 [T]
    positions: Tensor  # int64 [T]
    max_seqlen: int
    kv_index: Tensor | None = None  # int64 [K]
    kv_doc: Tensor | None = None  # int64 [K]
    cu_seqlens_k: Tensor | None = None  # int32 [S + 1]
    flash: bool = False


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


def repeat_kv(x: Tensor, n_heads: int, dim: int) -> Tensor:
    """Key or value heads (along `dim`) repeated to one per query head: for the masked attentions, in place of
    enable_gqa, whose FLOP count fails in the partitioner of a block compiled under an activation memory budget
    (torch 2.11)."""
    return x.repeat_interleave(n_heads // x.shape[dim], dim)


BACKENDS_WITHOUT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def masked_attention(q: Tensor, k: Tensor, v: Tensor, visible: Tensor) -> Tensor:
    """scaled_dot_product_attention of [B, H, Tq, hd] queries where `visible` (broadcast to [B, H, Tq, Tk]) is True.
    Where gradients flow, cuDNN's kernel is left out: its backward of a masked attention returns NaN for a query whose
    logsumexp is below about -88.7 (pytorch#196678, torch 2.11 on H100/H200). Scoring keeps it: only the forward."""
    with sdpa_kernel(BACKENDS_WITHOUT_CUDNN) if torch.is_grad_enabled() else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible)


def flash_varlen_available(device: torch.device) -> bool:
    """Whether flash attention's variable-length kernel runs on `device`: torch >= 2.9 and an Ampere or newer GPU
    (a T4 has none)."""
    return varlen_attn is not None and device.type == "cuda" and torch.cuda.get_device_properties(device).major >= 8


def packed_causal_attention(q: Tensor, k: Tensor, v: Tensor, packing: Packing) -> Tensor:
    """Causal attention within each sequence of a packed line (and its shared prefix, with `packing.kv_index`):
    q [T, H, hd], k and v [T, KV, hd] → [T, H, hd]. Flash attention's variable-length kernel where `packing.flash`
    (in bf16 or fp16), whose causal mask ends at the sequence's last key; elsewhere one scaled_dot_product_attention
    per sequence."""
    n_heads = q.shape[1]
    cu_q, cu_k = packing.cu_seqlens, packing.cu_seqlens
    if packing.kv_index is not None:
        k, v, cu_k = k[packing.kv_index], v[packing.kv_index], packing.cu_seqlens_k
    k, v = repeat_kv(k, n_heads, 1), repeat_kv(v, n_heads, 1)
    if packing.flash and q.dtype in (torch.bfloat16, torch.float16):
        return varlen_attn(q, k, v, cu_q, cu_k, packing.max_seqlen, packing.max_seqlen, window_size=(-1, 0))
    pieces = []
    for (qa, qb), (ka, kb) in zip(pairwise(cu_q.tolist()), pairwise(cu_k.tolist())):
        if qb > qa:
            before = (kb - ka) - (qb - qa)  # keys ahead of the first query: a shared prefix
            sees = torch.ones(qb - qa, kb - ka, dtype=torch.bool, device=q.device).tril(before) if before else None
            pieces.append(F.scaled_dot_product_attention(q[qa:qb].transpose(0, 1), k[ka:kb].transpose(0, 1),
                                                         v[ka:kb].transpose(0, 1), attn_mask=sees,
                                                         is_causal=not before).transpose(0, 1))
    return torch.cat(pieces)


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

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, last: Tensor | None = None,
                packing: Packing | None = None) -> Tensor:
        """[B, T, D] for every position, or [B, 1, D] for the position `last` [B] of each row only. Packed
        ([1, T, D] with `packing`): [1, T, D], or [1, R, D] for the positions `last` [R]."""
        if packing is not None:
            return self._packed(x[0], cos, sin, last, packing).unsqueeze(0)
        batch, seq_len, _ = x.shape
        k = self.k_proj(x).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        k = apply_rope(k, cos, sin)
        if last is None:
            q = self.q_proj(x).view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)
            # Rows are right-padded, so plain causal attention is exact for every real token.
            y = F.scaled_dot_product_attention(apply_rope(q, cos, sin), k, v, is_causal=True,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
        else:
            q = self.q_proj(x[torch.arange(batch, device=x.device), last]).view(batch, self.n_heads, 1, self.head_dim)
            q = apply_rope(q, cos[last].unsqueeze(1).unsqueeze(1), sin[last].unsqueeze(1).unsqueeze(1))
            visible = torch.arange(seq_len, device=x.device) <= last.unsqueeze(1)  # [B, T]: up to `last`
            y = masked_attention(q, repeat_kv(k, self.n_heads, 1), repeat_kv(v, self.n_heads, 1),
                                 visible[:, None, None, :])
            seq_len = 1
        return self.o_proj(y.transpose(1, 2).reshape(batch, seq_len, self.n_heads * self.head_dim))

    def _packed(self, x: Tensor, cos: Tensor, sin: Tensor, last: Tensor | None, packing: Packing) -> Tensor:
        """x [T, D], cos and sin [T, hd] at each token's own position → [T, D], or [R, D] at `last`."""
        seq_len = x.shape[0]
        k = apply_rope(self.k_proj(x).view(seq_len, self.n_kv_heads, self.head_dim), cos[:, None], sin[:, None])
        v = self.v_proj(x).view(seq_len, self.n_kv_heads, self.head_dim)
        if last is None:
            q = apply_rope(self.q_proj(x).view(seq_len, self.n_heads, self.head_dim), cos[:, None], sin[:, None])
            y = packed_causal_attention(q, k, v, packing)
        else:  # one query per row, seeing its own row up to itself
            q = apply_rope(self.q_proj(x[last]).view(len(last), self.n_heads, self.head_dim),
                           cos[last, None], sin[last, None])
            if packing.kv_index is None:
                visible = ((packing.doc == packing.doc[last, None])
                           & (torch.arange(seq_len, device=x.device) <= last[:, None]))  # [R, T]
            else:  # a row's last token sees all its sequence's keys
                k, v = k[packing.kv_index], v[packing.kv_index]
                visible = packing.kv_doc == packing.doc[last, None]  # [R, K]
            # As [1, H, R, hd]: torch's fused kernels take only 4-D inputs, and the math path that 3-D ones take
            # materializes [H, R, K] scores, gigabytes for a scoring line's hundreds of rows over thousands of keys
            k, v = repeat_kv(k, self.n_heads, 1), repeat_kv(v, self.n_heads, 1)
            q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
            y = masked_attention(q, k, v, visible[None, None])[0].transpose(0, 1)
        return self.o_proj(y.reshape(y.shape[0], self.n_heads * self.head_dim))


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

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, last: Tensor | None = None,
                packing: Packing | None = None) -> Tensor:
        """[B, T, D], or [B, 1, D] at the position `last` [B] of each row (keys and values still span all);
        packed, [1, T, D] or [1, R, D] at the positions `last` [R]."""
        if last is None:
            residual = x
        elif packing is None:
            residual = x[torch.arange(x.shape[0], device=x.device), last].unsqueeze(1)
        else:
            residual = x[:, last]
        x = residual + self.self_attn(self.input_layernorm(x), cos, sin, last, packing)
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
        self.head_rows: tuple[int, ...] | None = None  # the vocabulary rows lm_head keeps, when not all
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.grad_checkpoint: bool | int = False  # True: recompute every block in backward; N: the first N
        self.recompute_in_graph = False  # compiled blocks recompute by their memory budget, none under checkpoint()
        self.any_length = False  # compiled blocks take packed lines of any length (compile_blocks)

    def compile_blocks(self, activation_memory_budget: float = 1.0, recompute_in_graph: bool = False,
                       any_length: bool = False) -> None:
        """torch.compile every block but the final one (one graph serves them all); fuses norms, RoPE and SwiGLU on
        the GPU, and joins the projections of one input into one GEMM (model.fusion). The final block, reading out
        only the rows' last positions, stays eager: it would be a graph of its own, whose compilation cost more of a
        run's first step than its fusions saved (9 s of the 8B's; recomputing no block, it keeps its activations: the
        8B seed-best run's peak stayed at 8.86 GB). The blocks compile for the first input's length, and again for
        any length when another comes; with `any_length`, packed lines compile for any length at once (their length
        and sequence count symbolic, all else static).

        Below 1, `activation_memory_budget` lets the partitioner recompute cheap results in the backward pass rather
        than keep them (torch._functorch.config's, process-wide, read whenever a block compiles, as is the fusion
        pass). With `recompute_in_graph` that is all the recomputation there is: no block runs under checkpoint(),
        whatever grad_checkpoint says (for blocks that compile to one graph, train.fastpath.blocks_compile_whole)."""
        from model.fusion import FuseSharedInputLinears  # imports inductor (2 s), which eager runs do without

        torch._functorch.config.activation_memory_budget = activation_memory_budget
        torch._inductor.config.pre_grad_custom_pass = FuseSharedInputLinears()
        # Process-wide, as the two above: a reduction over up to 16,384 columns (an FP8 row scale over the 8B's 14,336)
        # also gets a persistent kernel, one read of each row, timed at a graph's first call against the looped one,
        # whose second pass reads the row again; the faster one serves every later call
        torch._inductor.config.triton.multi_kernel = 1
        self.recompute_in_graph, self.any_length = recompute_in_graph, any_length
        for block in self.model.layers[:-1]:
            block.compile()

    def uncompile_blocks(self) -> None:
        for block in self.model.layers:
            block._compiled_call_impl = None  # what nn.Module.compile set
        self.recompute_in_graph = self.any_length = False

    def hidden_states(self, tokens: Tensor, last: Tensor | None = None, packing: Packing | None = None) -> Tensor:
        """Final-norm hidden states [B, T, D] for right-padded token ids [B, T]; with `last` [B], only those
        at each row's position `last`, [B, D]: then the final block skips every other position's query,
        attention output and MLP, which nothing downstream reads. Packed rows ([1, T] with `packing`): [1, T, D],
        or [R, D] at the positions `last` [R] of the line."""
        x = self.model.embed_tokens(tokens)
        if packing is None:
            cos, sin = rope_cos_sin(self.inv_freq, tokens.shape[1], x.dtype)
        else:
            cos, sin = rope_cos_sin(self.inv_freq, packing.max_seqlen, x.dtype)
            cos, sin = cos[packing.positions], sin[packing.positions]
            packing = packing._replace(flash=flash_varlen_available(tokens.device))  # decided here, not in a graph
            if self.any_length:
                for tensor, dim in ((x, 1), (cos, 0), (sin, 0), *((t, 0) for t in packing[:3])):
                    torch._dynamo.maybe_mark_dynamic(tensor, dim)
        n_recomputed = (0 if self.recompute_in_graph else
                        len(self.model.layers) if self.grad_checkpoint is True else int(self.grad_checkpoint))
        final = len(self.model.layers) - 1
        for i, block in enumerate(self.model.layers):
            args = (x, cos, sin, last if i == final else None, packing)
            if i < n_recomputed and torch.is_grad_enabled():
                x = checkpoint(block, *args, use_reentrant=False)
            else:
                x = block(*args)
        x = self.model.norm(x)
        if last is None:
            return x
        return x.squeeze(1) if packing is None else x.squeeze(0)

    def head_weight(self, token_ids: Tensor) -> Tensor:
        """The lm_head rows [n, D] of `token_ids`. A head loaded with only some rows (load_llama's head_rows) is
        those rows, and `token_ids` must be the same tokens in the same order."""
        return self.lm_head.weight if self.head_rows is not None else self.lm_head.weight[token_ids]

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits [B, T, V] (over head_rows only, when loaded with them)."""
        return self.lm_head(self.hidden_states(tokens))
