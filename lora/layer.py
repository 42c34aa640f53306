import math

import torch
from torch import Tensor, nn


class LoRALinear(nn.Module):
    """A frozen base projection plus a trainable low-rank update: y = base(x) + (alpha/rank) · B(A(dropout(x))).

    The base may be an `nn.Linear` or a bitsandbytes 4-bit linear. A starts kaiming-uniform and B at zero (as in
    peft), so a freshly wrapped layer computes exactly what its base does."""

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        device = base_layer.weight.device
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False, device=device)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False, device=device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}

    def delta_weight(self) -> Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        if x.dtype != self.lora_A.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.weight.dtype)  # under autocast the matmuls cast x themselves
        update = self.lora_B(self.lora_A(self.dropout(x))) * self.scaling
        return out + update.to(out.dtype)
