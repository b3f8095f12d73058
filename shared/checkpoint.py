"""Checkpoints: atomic writes, plain tensors and dicts only (`torch.load(weights_only=True)` works),
and export of the backbone alone in its library's key names (torchvision for ResNets)."""
from __future__ import annotations

import fcntl
import io
import os
import pickle
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from shared.errors import UserError, first_line

LAST = "last.pt"
PREV = "prev.pt"       # the checkpoint before last.pt, kept as a fallback
LOCK = ".lock"         # held (flock) by the run that writes into the folder
BACKBONE = "backbone.pt"
FORMAT = "ssl-reference/1"


def save_json(obj: Any, path: str | Path) -> Path:
    """`obj` as indented JSON at `path`, written atomically (`save_atomic`)."""
    import json
    return save_atomic(json.dumps(obj, indent=2) + "\n", path, write=lambda text, f: f.write(text.encode()))


def _discard(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def _keep_as(path: Path, backup: Path) -> None:
    """Make `backup` the current `path` atomically (a hard link renamed into place; a copy where the
    file system has no links): at every moment `backup` is either its old or its new content."""
    fd, tmp = tempfile.mkstemp(prefix=f".{backup.name}.", suffix=".tmp", dir=backup.parent)
    os.close(fd)
    try:
        os.unlink(tmp)
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
        os.replace(tmp, backup)
    except BaseException:
        _discard(tmp)
        raise


def save_atomic(obj: Any, path: str | Path, write: Optional[Callable[[Any, Any], Any]] = None,
                backup: Optional[str | Path] = None) -> Path:
    """`write(obj, file)` (default `torch.save`, looked up at call time) to a temporary file in the
    same folder, fsync, then rename over `path`: a crash at any point leaves either the old file or
    the new one, never a truncated one. With `backup`, the file `path` held until now becomes
    `backup` once the new one is fully written (the previous checkpoint, kept as a fallback)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            (write or torch.save)(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if backup is not None and path.is_file():
            _keep_as(path, Path(backup))
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def load(path: str | Path, map_location: str | torch.device = "cpu") -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise UserError(f"cannot load checkpoint {path}: the file is empty")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated file, a pickle with arbitrary objects, ...
        raise UserError(f"cannot load checkpoint {path}: {first_line(exc)}") from None


def nonfinite(tensors: Iterable[Tuple[str, Any]]) -> List[str]:
    """The names of the floating-point tensors that hold an inf or a NaN: one multi-tensor max-abs
    reduction and one host sync for all of them (max |x| cannot overflow, as a norm could)."""
    items = [(n, t.detach()) for n, t in tensors if torch.is_tensor(t) and t.is_floating_point() and t.numel()]
    if not items:
        return []
    groups: Dict[Tuple[torch.device, torch.dtype], List[int]] = {}
    for i, (_, t) in enumerate(items):
        groups.setdefault((t.device, t.dtype), []).append(i)
    finite = torch.empty(len(items), dtype=torch.bool)
    for idx in groups.values():
        peaks = torch._foreach_norm([items[i][1] for i in idx], ord=float("inf"))
        finite[idx] = torch.isfinite(torch.stack(peaks)).cpu()
    if bool(finite.all()):
        return []
    return [items[i][0] for i in range(len(items)) if not finite[i]]


def state_tensors(state: Any, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    """(dotted name, tensor) for every tensor in a nested dict/list (a checkpoint, a state dict)."""
    if torch.is_tensor(state):
        yield prefix.rstrip("."), state
    elif isinstance(state, dict):
        for k, v in state.items():
            yield from state_tensors(v, f"{prefix}{k}.")
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            yield from state_tensors(v, f"{prefix}{i}.")


def load_for_resume(out_dir: Path, say: Callable[[str], None] = print) -> Tuple[Optional[Dict[str, Any]], Optional[Path]]:
    """The newest checkpoint of a run folder that loads and holds only finite values: `last.pt`, else
    (with one warning line through `say`) the previous one, `prev.pt`; (None, None) if there is none.
    One error line naming both when neither loads."""
    tried = []
    for name in (LAST, PREV):
        path = out_dir / name
        if not path.is_file():
            continue
        try:
            state = load(path)
            if not isinstance(state, dict) or "model" not in state or "step" not in state:
                raise UserError(f"{path}: not a training checkpoint (no model/step)")
            bad = nonfinite(state_tensors({"model": state["model"], "optimizer": state.get("optimizer")}))
            if bad:
                raise UserError(f"{path}: {len(bad)} tensors hold inf/NaN (e.g. {', '.join(bad[:3])})")
        except UserError as exc:
            tried.append(str(exc))
            continue
        if tried:
            say(f"warning: {tried[0]}; resuming from the previous checkpoint {path} instead")
        return state, path
    if tried:
        raise UserError(f"no checkpoint in {out_dir} can be resumed from: {'; '.join(tried)}; use another "
                        f"train.out_dir or train.resume=false")
    return None, None


def remove_stale_temporaries(folder: Path) -> List[Path]:
    """Delete the temporary files that a write killed half-way left in `folder` (`save_atomic`'s
    `.<name>.<random>.tmp`). Only safe while holding the folder's lock."""
    gone = []
    for p in folder.glob(".*.tmp"):
        try:
            p.unlink()
            gone.append(p)
        except FileNotFoundError:
            pass
    return gone


_HELD: Dict[str, List[Any]] = {}   # resolved folder -> [open lock file, depth]: re-entrant within a process


@contextmanager
def folder_lock(folder: str | Path, enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive OS lock (flock) on `folder/.lock` while the block runs; the kernel drops it
    when the process dies, however it dies, so a requeued job never waits on a stale lock. A second
    process that wants the folder stops at once with one line naming the holder (host, pid, start)."""
    if not enabled:
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    f = open(folder / LOCK, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"output folder {folder} is in use by another run ({holder}); wait for it to end, stop "
                        f"it, or choose another train.out_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"host {socket.gethostname()}, pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
    f.flush()
    _HELD[key] = [f, 1]
    try:
        yield
    finally:
        del _HELD[key]
        f.close()         # releases the lock


# What a detectron2 weights pickle holds besides builtins (dicts, lists, strings, numbers): numpy arrays and
# their dtypes and scalars, under the module names of NumPy 1.x and 2.x, and OrderedDict.
PICKLE_GLOBALS = frozenset({
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
})


class RefusedGlobal(pickle.UnpicklingError):
    pass


class _DataUnpickler(pickle.Unpickler):
    """Resolves only the globals in `PICKLE_GLOBALS` (and NumPy's dtype classes such as
    `numpy.dtypes.Float32DType`): a pickle that names anything else (os.system, builtins.eval, a
    class whose __reduce__ runs code) is refused before any of it is called."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in PICKLE_GLOBALS or (module == "numpy.dtypes" and name.endswith("DType")):
            return super().find_class(module, name)
        raise RefusedGlobal(f"{module}.{name}")


def load_pickle(path: str | Path, what: str = "pickle", kind: str = "readable pickle", hint: str = "") -> Any:
    """A plain-data pickle (detectron2 weights: dicts of numpy arrays) read without running any code from
    it; one error line naming the file and the refused global otherwise (`hint` ends the other errors)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path}: file not found")
    data = path.read_bytes()
    try:
        return _DataUnpickler(io.BytesIO(data)).load()
    except RefusedGlobal as exc:
        raise UserError(f"{what} {path}: refused to load: it names {exc}, which a weights file has no use "
                        f"for (only dicts, lists, strings, numbers and numpy arrays are read)") from None
    except Exception as exc:  # a torch zip file, a truncated pickle, ...
        first = first_line(exc)
        raise UserError(f"{what} {path}: not a {kind} ({type(exc).__name__}: {first})"
                        + (f"; {hint}" if hint else "")) from None


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Optional[torch.amp.GradScaler],
                   step: int, epoch: int, config: Dict[str, Any], method: str) -> Dict[str, Any]:
    return {"format": FORMAT, "method": method, "step": step, "epoch": epoch, "config": config,
            "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None}


def backbone_state_dict(model_state: Dict[str, torch.Tensor], prefix: str = "backbone.") -> Dict[str, torch.Tensor]:
    """The backbone's own keys from a method's state dict (methods keep their encoder at `.backbone`)."""
    out = {k[len(prefix):]: v for k, v in model_state.items() if k.startswith(prefix)}
    if not out:
        raise UserError(f"no '{prefix}*' keys in this checkpoint's model state")
    return out


def export_backbone(model: nn.Module, path: str | Path) -> Path:
    """Save `model.backbone.state_dict()` as a plain dict: for a ResNet, `torchvision.models.resnet50()`
    loads it with `strict=False` missing only `fc.weight` and `fc.bias`."""
    sd = {k: v.detach().cpu().clone() for k, v in unwrap(model).backbone.state_dict().items()}
    return save_atomic(sd, path)


def load_trained_model(path: str | Path, config_cls, build: Callable, overrides=(), method: str = "model"):
    """(config, model in eval mode) from one of our training checkpoints (`last.pt`: model + config),
    the config read back as `config_cls` with `key=value` overrides; one error line otherwise."""
    from shared.config import from_dict
    state = load(path)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"{path}: not a training checkpoint of ours (no model/config); pass a last.pt")
    cfg = from_dict(config_cls, state["config"], list(overrides))
    model = build(cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise UserError(f"{path}: not a {method} checkpoint ({first_line(exc)})") from None
    return cfg, model.eval()
