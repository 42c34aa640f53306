import torch
from torch import nn

from common.errors import UserError
from lora.layer import LoRALinear

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _logical_numel(module: nn.Module) -> int:
    """Parameter count of a module as if unquantized (4-bit weights are packed two to a byte)."""
    total = 0
    for m in module.modules():
        for p in m.parameters(recurse=False):
            total += m.in_features * m.out_features if p.dtype == torch.uint8 else p.numel()
    return total


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
               targets: tuple[str, ...] = ALL_PROJECTIONS, layers: list[int] | None = None,
               verbose: bool = True) -> nn.Module:
    """Wraps the named projections of every block (or of the blocks numbered in `layers`, peft's
    layers_to_transform) in `LoRALinear` and freezes every other parameter. Adapting only the top blocks
    also shortens the backward pass, which stops below the lowest adapted block."""
    if rank <= 0:
        raise UserError(f"--rank must be a positive integer, got {rank}")
    if alpha <= 0:
        raise UserError(f"--alpha must be positive, got {alpha}")
    if not 0 <= dropout < 1:
        raise UserError(f"--lora-dropout must be in [0, 1), got {dropout}")
    unknown = sorted(set(targets) - set(ALL_PROJECTIONS))
    if unknown:
        raise UserError(f"LoRA targets {unknown} are not projections of a Llama block ({', '.join(ALL_PROJECTIONS)})")
    n_blocks = len(model.model.layers)
    if layers is not None and not all(0 <= i < n_blocks for i in layers):
        raise UserError(f"LoRA layers {sorted(layers)} are not all blocks of this {n_blocks}-block model")
    if lora_layers(model):
        raise UserError("the model already has LoRA layers")
    model.requires_grad_(False)
    for index, block in enumerate(model.model.layers):
        if layers is not None and index not in layers:
            continue
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if name in targets:
                    setattr(parent, name, LoRALinear(child, rank, alpha, dropout))
    model.lora_config = {"r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": list(targets),
                         "layers_to_transform": sorted(layers) if layers is not None else None}
    if verbose:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"LoRA r={rank} alpha={alpha}: {trainable:,} trainable of {_logical_numel(model):,} parameters")
    return model
