"""Numeric precision of a run (`--precision {bf16,fp16,fp32}`) and dynamic loss scaling for fp16.

bf16 keeps float32's exponent range, so its gradients neither overflow nor underflow; fp16 has five exponent bits
(largest 65504, smallest subnormal 6e-8), so a backward pass in fp16 loses small gradients to zero unless the loss
is multiplied first. `LossScaler` does that with torch.amp.GradScaler's policy: start at 2^16, halve and skip the
step when a gradient overflows, double after 2000 finite steps in a row."""
import contextlib
import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor

from common.errors import UserError

PRECISIONS = ("bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Precision:
    """`compute_dtype` is the dtype of the frozen base weights and of autocast. `resolve_precision` gives bf16 and fp16
    only on CUDA; built by hand with device_type "cpu" (the tests do), fp16 runs under CPU autocast."""
    name: str  # "bf16" | "fp16" | "fp32"
    compute_dtype: torch.dtype
    device_type: str  # "cuda" or "cpu"

    @property
    def loss_scaling(self) -> bool:
        return self.name == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to `compute_dtype` for bf16 and fp16; nothing for fp32 (float32 throughout)."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.compute_dtype)

    def scaler(self, **kwargs) -> "LossScaler":
        """A dynamic loss scaler for fp16; a disabled one (scale 1, never skips) otherwise."""
        return LossScaler(**kwargs) if self.loss_scaling else LossScaler.disabled()

    def describe(self) -> str:
        """For the run's manifest."""
        if self.name == "fp32":
            return "fp32 (float32 weights, no autocast)"
        scaling = ", dynamic loss scaling" if self.loss_scaling else ""
        return f"{self.name} ({self.name} frozen weights, {self.name} autocast, float32 LoRA weights{scaling})"


def cuda_has_bf16(device: torch.device) -> bool:
    """Native bf16 (compute capability 8.0 or later, or ROCm). Not `torch.cuda.is_bf16_supported()` as called
    plainly: that counts emulation and says True on a T4 (compute capability 7.5), where bf16 matmuls are slow."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def _gpu_name(device: torch.device) -> str:
    try:
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    except Exception:  # only words for the message
        return str(device)


def resolve_precision(flag: str | None, device: torch.device) -> Precision:
    """The precision `--precision flag` means on `device`. None: bf16 on a GPU with bf16, fp16 on one without,
    fp32 on the CPU. A precision the device cannot run is one UserError line naming --precision."""
    if flag is not None and flag not in PRECISIONS:
        raise UserError(f"--precision {flag}: unknown precision (choose from {', '.join(PRECISIONS)})")
    if device.type != "cuda":
        if flag not in (None, "fp32"):
            raise UserError(f"--precision {flag}: not available on the {device.type.upper()}, which trains in fp32 "
                            f"(leave --precision out or pass fp32)")
        return Precision("fp32", torch.float32, device.type)
    if flag is None:
        flag = "bf16" if cuda_has_bf16(device) else "fp16"
    elif flag == "bf16" and not cuda_has_bf16(device):
        raise UserError(f"--precision bf16: {_gpu_name(device)} has no native bf16 (use --precision fp16, "
                        f"or leave --precision out)")
    return Precision(flag, _DTYPES[flag], device.type)


class LossScaler:
    """Dynamic loss scaling for fp16 training.

    Per optimizer step: multiply each micro-batch's loss by `scale` before its backward pass; `unscale_` the summed
    gradients (or `unscale_and_check` them); step the optimizer only if they are finite; then `update(finite)`.
    A non-finite step halves the scale and counts in `skipped`; `growth_interval` finite steps in a row double it.
    `exhausted` (scale below `min_scale`) means no scale helps any more: stop with an error.

    A disabled scaler (`LossScaler.disabled()`, for bf16 and fp32) has scale 1, leaves gradients untouched and
    never skips or changes."""

    def __init__(self, enabled: bool = True, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000, min_scale: float = 1e-4):
        if not (init_scale > 0 and math.isfinite(init_scale)):
            raise ValueError(f"LossScaler: init_scale must be finite and > 0, got {init_scale}")
        if not growth_factor > 1 or not 0 < backoff_factor < 1 or growth_interval < 1:
            raise ValueError("LossScaler: need growth_factor > 1, 0 < backoff_factor < 1, growth_interval >= 1")
        self.enabled = enabled
        self.scale = float(init_scale) if enabled else 1.0
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval, self.min_scale = growth_interval, min_scale
        self.good_steps = 0  # finite steps since the scale last changed
        self.skipped = 0  # steps skipped for non-finite gradients, over the whole run

    @classmethod
    def disabled(cls) -> "LossScaler":
        return cls(enabled=False)

    def scaled(self, factor: float) -> float:
        """`factor` (what a micro-batch's summed loss is multiplied by, e.g. 1 / rows per step) times the scale."""
        return factor * self.scale

    @property
    def exhausted(self) -> bool:
        """The scale has fallen so low that gradients overflow at any scale: training cannot go on in fp16."""
        return self.enabled and self.scale < self.min_scale

    @torch.no_grad()
    def unscale_(self, params: Iterable[Tensor]) -> None:
        """Divides every gradient by the scale, in place; no device sync. Nothing to do when disabled."""
        if not self.enabled or self.scale == 1.0:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)  # exact: the scale is a power of two

    @torch.no_grad()
    def unscale_and_check(self, params: Iterable[Tensor]) -> tuple[float, bool]:
        """`unscale_`, then (L2 norm of all gradients, whether it is finite) with one device sync. An inf or NaN
        anywhere makes the norm inf or NaN; so does a finite norm past float32's range (~3e38)."""
        params = list(params)
        self.unscale_(params)
        norm = gradient_norm(params)
        value = norm.item() if isinstance(norm, Tensor) else norm
        return value, math.isfinite(value)

    def update(self, finite: bool) -> None:
        """After each optimizer step (taken or skipped): back off on a non-finite step, grow after
        `growth_interval` finite ones."""
        if not self.enabled:
            return
        if finite:
            self.good_steps += 1
            if self.good_steps >= self.growth_interval:
                self.scale *= self.growth_factor
                self.good_steps = 0
        else:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            self.skipped += 1

    def state_dict(self) -> dict:
        """Plain JSON values, for a checkpoint's JSON."""
        return {"enabled": self.enabled, "scale": self.scale, "good_steps": self.good_steps, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        """Restores `state_dict()`; a malformed state is a UserError (a corrupt checkpoint)."""
        try:
            scale, good_steps, skipped = float(state["scale"]), state["good_steps"], state["skipped"]
            enabled = state.get("enabled", True)
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise UserError(f"loss scaler state {state!r}: malformed ({err!r})") from None
        if not (scale > 0 and math.isfinite(scale)) or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (good_steps, skipped)):
            raise UserError(f"loss scaler state {state!r}: scale must be finite and > 0, counts whole and >= 0")
        if enabled != self.enabled:
            raise UserError(f"loss scaler state {state!r}: saved {'with' if enabled else 'without'} loss scaling, "
                            f"loaded {'with' if self.enabled else 'without'} (was --precision changed?)")
        self.scale = scale if self.enabled else 1.0
        self.good_steps, self.skipped = good_steps, skipped


def gradient_norm(params: Iterable[Tensor]) -> Tensor | float:
    """L2 norm of all gradients, computed in float32 (fp16 gradients would overflow the sum of squares), as a
    0-d tensor on the first gradient's device; 0.0 when there are none. No device sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
    device = grads[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
