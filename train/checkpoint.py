"""Resumable training state: adapter, optimizer, step, data position and RNG, as safetensors + JSON (no pickle, so
a checkpoint from elsewhere cannot run code), replaced as a whole folder."""
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from common.errors import UserError
from common.files import atomic_folder, read_json

TENSORS_FILE = "state.safetensors"
PROGRESS_FILE = "progress.json"


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def has_checkpoint(folder: Path) -> bool:
    return (folder / TENSORS_FILE).is_file() and (folder / PROGRESS_FILE).is_file()


def rng_state() -> dict[str, torch.Tensor]:
    """This process's random state: the CPU generator's and the current GPU's (asking for every GPU's would start a
    CUDA context on each, from every rank)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, progress: dict,
                    rng_states: list[dict[str, torch.Tensor]] | None = None) -> None:
    """`progress` holds step, data position and the best score so far; the optimizer's step counts and
    hyperparameters are added here, and the random states of every rank (`rng_states`, one per rank; default:
    this process's)."""
    params = trainable_parameters(model)
    tensors = {f"adapter.{name}": p.detach().cpu().contiguous() for name, p in params.items()}
    steps = {}
    for name, p in params.items():
        state = optimizer.state.get(p)
        if state:
            tensors[f"exp_avg.{name}"] = state["exp_avg"].cpu().contiguous()
            tensors[f"exp_avg_sq.{name}"] = state["exp_avg_sq"].cpu().contiguous()
            steps[name] = int(state["step"])
    rng_states = rng_states or [rng_state()]
    tensors.update({f"rng.{rank}.{kind}": value for rank, state in enumerate(rng_states) for kind, value in state.items()})
    groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    record = {"progress": progress, "optimizer_steps": steps, "param_groups": groups, "rng_ranks": len(rng_states)}
    with atomic_folder(folder) as tmp:
        save_file(tensors, tmp / TENSORS_FILE)
        (tmp / PROGRESS_FILE).write_text(json.dumps(record, indent=2))


def saved_progress(folder: Path) -> dict:
    """The progress a checkpoint holds (step, data position, ...), read without its tensors."""
    return _checked_progress(read_json(folder / PROGRESS_FILE, f"{folder}: no {PROGRESS_FILE}").get("progress"),
                             folder / PROGRESS_FILE)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _checked_progress(progress: object, file: Path) -> dict:
    """`progress` if each value is of its kind (a corrupt one would fail deep inside the loop), else one UserError."""
    if not isinstance(progress, dict):
        raise UserError(f"{file}: corrupt checkpoint (no 'progress' object)")
    kinds = {key: (_is_count, "a count") for key in ("step", "epoch", "index", "stale_evals")}
    kinds.update(wall_s=(lambda v: _is_real(v) and v >= 0, "a number of seconds"),
                 best_step=(lambda v: v is None or _is_count(v), "a step or null"),
                 best_score=(lambda v: v is None or _is_real(v), "a number or null"))
    for key, (valid, words) in kinds.items():
        if key not in progress or not valid(progress[key]):
            raise UserError(f"{file}: corrupt checkpoint (progress {key!r} is {progress.get(key)!r}, not {words})")
    return progress


def _checked_param_groups(groups: object, file: Path) -> list[dict]:
    for group in groups if isinstance(groups, list) else [None]:
        betas = group.get("betas") if isinstance(group, dict) else None
        if not (isinstance(betas, list) and len(betas) == 2 and all(map(_is_real, betas))
                and all(_is_real(group.get(key)) for key in ("lr", "eps", "weight_decay"))):
            raise UserError(f"{file}: corrupt checkpoint (an optimizer group is {group!r}, not lr, betas [b1, b2], "
                            f"eps and weight_decay as numbers)")
    return groups


def load_checkpoint(folder: Path, model: nn.Module,
                    optimizer: torch.optim.Optimizer) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    """Restores the adapter and the optimizer from `folder`; returns the saved progress and the random states of
    the ranks that saved it (one per rank), for `set_rng_state`."""
    try:
        return _load_checkpoint(folder, model, optimizer)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as err:
        raise UserError(f"{folder}: corrupt checkpoint ({type(err).__name__}: {err})") from None


def _load_checkpoint(folder: Path, model: nn.Module,
                     optimizer: torch.optim.Optimizer) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    if not has_checkpoint(folder):
        raise UserError(f"{folder}: no checkpoint to resume from ({TENSORS_FILE} and {PROGRESS_FILE})")
    file = folder / TENSORS_FILE
    try:
        tensors = load_file(file)
    except (SafetensorError, OSError) as err:
        raise UserError(f"{file}: corrupt or truncated checkpoint ({err})") from None
    record = read_json(folder / PROGRESS_FILE, f"{folder}: no {PROGRESS_FILE}")
    params = trainable_parameters(model)
    saved = {key.removeprefix("adapter."): value for key, value in tensors.items() if key.startswith("adapter.")}
    if saved.keys() != params.keys():
        extra = sorted(saved.keys() - params.keys()) or sorted(params.keys() - saved.keys())
        raise UserError(f"{file}: the checkpoint's adapter does not match the run's LoRA layers (e.g. {extra[0]})")
    for name, p in params.items():
        for key in (f"adapter.{name}", f"exp_avg.{name}", f"exp_avg_sq.{name}"):
            if key in tensors and tensors[key].shape != p.shape:
                raise UserError(f"{file}: tensor {key} has shape {list(tensors[key].shape)}, the run's "
                                f"parameter has {list(p.shape)}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"adapter.{name}"])
    progress = _checked_progress(record.get("progress"), folder / PROGRESS_FILE)
    for group, saved_group in zip(optimizer.param_groups, _checked_param_groups(record.get("param_groups"),
                                                                                folder / PROGRESS_FILE)):
        group.update(saved_group)
    for name, step in record["optimizer_steps"].items():
        p = params[name]
        optimizer.state[p] = {"step": step,
                              "exp_avg": tensors[f"exp_avg.{name}"].to(p.device, torch.float32),
                              "exp_avg_sq": tensors[f"exp_avg_sq.{name}"].to(p.device, torch.float32)}
    if "rng.cpu" in tensors:  # written before rng states were kept per rank: one process's
        rng_states = [{"cpu": tensors["rng.cpu"], **({"cuda": tensors["rng.cuda.0"]} if "rng.cuda.0" in tensors else {})}]
    else:
        rng_states = [{kind: tensors[f"rng.{rank}.{kind}"] for kind in ("cpu", "cuda") if f"rng.{rank}.{kind}" in tensors}
                      for rank in range(record["rng_ranks"])]
    for state in rng_states:
        if "cpu" not in state:
            raise UserError(f"{file}: corrupt checkpoint (a rank's cpu random state is missing)")
        for kind, value in state.items():
            if value.dtype != torch.uint8 or value.dim() != 1:
                raise UserError(f"{file}: corrupt checkpoint (a {kind} random state is {value.dtype} of shape "
                                f"{list(value.shape)}, not a row of bytes)")
        torch.Generator().set_state(state["cpu"])  # checks its size, as set_rng_state would later
    return progress, rng_states
