"""Resumable training state: adapter, optimizer, step, data position and RNG, written atomically."""
import os
from pathlib import Path

import torch
from torch import nn

from data.errors import UserError
from lora import lora_layers

STATE_FILE = "state.pt"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, progress: dict) -> None:
    """`progress` holds step, data position and the best score so far; RNG states are added here."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "adapter": trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "progress": progress,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    tmp = folder / f".{STATE_FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, folder / STATE_FILE)


def load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restores model adapters, optimizer and RNG from `folder`; returns the saved progress."""
    file = folder / STATE_FILE
    if not file.is_file():
        raise UserError(f"{folder}: no {STATE_FILE} to resume from")
    state = torch.load(file, map_location="cpu", weights_only=False)
    params = dict(model.named_parameters())
    if set(state["adapter"]) != {n for n, p in params.items() if p.requires_grad} or not lora_layers(model):
        raise UserError(f"{file}: the checkpoint's adapter does not match the run's LoRA configuration")
    with torch.no_grad():
        for name, value in state["adapter"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return state["progress"]
