"""Accelerate-based trainer: early stopping on a validation split, atomic checkpoints, resume.

``accelerate launch`` runs the same code on several GPUs: each process takes a strided shard of
every mini-batch of ratings (the graph is small next to the embeddings and is replicated), and
gradients are all-reduced by the wrapped model.  Every random choice -- the shuffle, the edge
dropout and the variational noise -- comes from seeded ``torch.Generator`` objects whose states
are checkpointed, so an interrupted run resumed from its checkpoint ends bit-identical to an
uninterrupted one.

Checkpoints (``checkpoint_dir``): ``last.pt`` after every epoch and ``previous.pt``, the epoch
before it, each written atomically, so a torn or corrupt ``last.pt`` falls back to
``previous.pt`` (with a warning) and never leaves nothing.  Each is bound to what it was made
from: the :class:`TrainConfig` (less ``progress`` / ``resume`` / ``checkpoint_dir``), the
:class:`LossConfig`, a SHA-256 fingerprint of the training and validation triples, and one of
the model's initial weights and ``context`` (e.g. the caller's model config).  A folder written for
other data or another model is refused with a message naming it; it is never resumed silently.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ._util import atomic_write, check_number, show_progress
from .metrics import rmse
from .model import ContrastiveMatrixModel, LossConfig

logger = logging.getLogger(__name__)
CHECKPOINT, PREVIOUS = "last.pt", "previous.pt"
_NOT_BOUND = ("progress", "resume", "checkpoint_dir")  # how a run is watched or stored, not what it computes


@dataclass
class TrainConfig:
    epochs: int = 300  # upper bound; early stopping usually ends sooner (~60-90 epochs on ML-100K)
    batch_size: int = 131_072  # ratings per optimiser step (all processes); full batch on ML-100K, as GC-MC
    lr: float = 0.02  # Adam
    val_fraction: float = 0.05  # share of the TRAINING ratings held out for early stopping
    patience: int = 10  # epochs without a better validation RMSE before stopping
    view_nodes: int = 1024  # nodes sampled per step for the view-vs-view InfoNCE
    seed: int = 0  # model init, validation split, shuffling, dropout and variational noise
    checkpoint_dir: str | None = None  # where last.pt / previous.pt go; None = no checkpoints
    resume: bool = True  # continue from checkpoint_dir/last.pt when it exists
    progress: bool | None = None  # tqdm bar over epochs; None: when stderr is a terminal
    cpu: bool = False  # force CPU even when accelerate sees a GPU

    def __post_init__(self) -> None:
        for name, low in (("epochs", 0), ("batch_size", 1), ("patience", 1), ("view_nodes", 0)):
            check_number(f"TrainConfig.{name}", getattr(self, name), low=low, integer=True)
        check_number("TrainConfig.seed", self.seed, integer=True)
        check_number("TrainConfig.lr", self.lr, low=0.0, low_open=True)
        check_number("TrainConfig.val_fraction", self.val_fraction, low=0.0, high=1.0, high_open=True)


@dataclass
class TrainResult:
    best_epoch: int  # 1-based epoch whose weights were kept (0 = initial weights)
    best_val_rmse: float
    epochs_run: int
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False  # True when `patience` epochs without improvement ended the run
    resumed_at: int = 0  # the epoch a checkpoint resumed from (0: a fresh run)

    def __str__(self) -> str:
        how = f"early stopping after {self.epochs_run} epochs" if self.stopped_early else f"{self.epochs_run} epochs"
        lines = [f"trained {how}" + (f" (resumed at epoch {self.resumed_at})" if self.resumed_at else "")
                 + f"; kept epoch {self.best_epoch}, validation RMSE {self.best_val_rmse:.4f}", "",
                 "| epoch | loss | mse | val RMSE |", "|---|---|---|---|"]
        lines += [f"| {h['epoch']} | {h['loss']:.4f} | {h['mse']:.4f} | {h['val_rmse']:.4f} |" for h in self.history]
        return "\n".join(lines)


def atomic_save(obj: object, path: str | os.PathLike, previous: str | os.PathLike | None = None) -> None:
    """``torch.save`` to a temp file in the same folder, then ``os.replace``: never a torn file
    (with ``previous``, the old file is kept there)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp), previous)


def fingerprint(*arrays) -> str:
    """SHA-256 over the dtype, shape and bytes of each array / tensor (order matters)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _bound_config(c: TrainConfig) -> dict:
    return {k: v for k, v in asdict(c).items() if k not in _NOT_BOUND}


def load_checkpoint(folder: Path) -> dict | None:
    """The newest readable checkpoint of ``folder`` (``last.pt``, else ``previous.pt`` with a
    warning), None when there is none; a folder with only unreadable ones raises naming them."""
    errors = []
    for name in (CHECKPOINT, PREVIOUS):
        path = folder / name
        if not path.is_file():
            continue
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            missing = {"model", "optimizer", "state", "config", "loss", "data", "model_fingerprint"} - set(saved)
            if missing:
                raise ValueError(f"not a cmc_rec checkpoint of this version (lacks {sorted(missing)})")
        except Exception as err:  # torch raises several types for torn / foreign files
            first = (str(err).strip().splitlines() or [""])[0][:120]
            errors.append(f"{path}: {type(err).__name__}: {first}")
            continue
        if errors:
            warnings.warn(f"{errors[0]} is unreadable; resuming from {path} (epoch {saved['state']['epoch']})",
                          stacklevel=3)
        return saved
    if errors:
        raise ValueError(f"{folder}: no readable checkpoint, the files are truncated, corrupt or foreign "
                         f"({'; '.join(errors)}); delete the folder or set resume=False")
    return None


class Trainer:
    """Train a :class:`ContrastiveMatrixModel` (with its graph attached) on index triples."""

    def __init__(self, config: TrainConfig, loss: LossConfig) -> None:
        self.config, self.loss = config, loss

    def fit(self, model: ContrastiveMatrixModel, train: tuple[np.ndarray, np.ndarray, np.ndarray],
            val: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
            callback: Callable[[int, dict], None] | None = None,
            clip: tuple[float, float] | None = None, context: dict | None = None) -> TrainResult:
        """train / val: (users, items, ratings) contiguous-index arrays.  Returns the history.

        ``callback(epoch, record)`` runs after each epoch's checkpoint (it may raise to stop);
        ``clip`` bounds the validation predictions (the rating range); ``context`` is anything
        else the run depends on, bound into the checkpoint (``repr``-ed).
        The model ends holding the weights of the best validation epoch (the last one if no val).
        """
        from accelerate import (  # lazy: importing cmc_rec stays light
            Accelerator,
            DistributedDataParallelKwargs,
        )
        from tqdm.auto import tqdm

        c = self.config
        # graph buffers are identical on every rank (no broadcast); a zero-weighted loss term leaves
        # parameters unused, which DDP must be told about
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False)
        acc = Accelerator(cpu=c.cpu, kwargs_handlers=[ddp])
        device = acc.device
        opt = torch.optim.Adam(model.parameters(), lr=c.lr)
        g_shuffle = torch.Generator().manual_seed(c.seed + 1)
        g_noise = torch.Generator(device=device).manual_seed(c.seed + 2 + acc.process_index)
        u, i, r = (torch.as_tensor(a) for a in train)
        u, i, r = u.long(), i.long(), r.float()
        state = {"epoch": 0, "best_val": float("inf"), "best_epoch": 0, "bad": 0, "history": [],
                 "best_model": copy.deepcopy(model.state_dict()), "stopped": False}
        folder = Path(c.checkpoint_dir) if c.checkpoint_dir else None
        data_fp = fingerprint(*train, *(val if val is not None else ()))
        model_fp = fingerprint(*model.state_dict().values(), np.frombuffer(repr(context).encode(), np.uint8))
        saved = load_checkpoint(folder) if folder is not None and c.resume else None
        resumed_at = 0
        if saved is not None:
            if saved["config"] != _bound_config(c) or saved["loss"] != asdict(self.loss):
                raise ValueError(f"{folder}: its checkpoint was written with another config; use another "
                                 f"checkpoint_dir, delete it, or set resume=False")
            if saved["data"] != data_fp:
                raise ValueError(f"{folder}: its checkpoint was written for other data (fingerprint "
                                 f"{saved['data'][:12]} != {data_fp[:12]} of these ratings); use another "
                                 f"checkpoint_dir, delete it, or set resume=False")
            if saved["model_fingerprint"] != model_fp:
                raise ValueError(f"{folder}: its checkpoint was written for another model (initial weights or "
                                 f"model config differ); use another checkpoint_dir, delete it, or set resume=False")
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            g_shuffle.set_state(saved["g_shuffle"])
            g_noise.set_state(saved["g_noise"])
            state = saved["state"]
            resumed_at = state["epoch"]
        model, opt = acc.prepare(model, opt)
        core = acc.unwrap_model(model)
        n = len(r)
        n_nodes = core.num_users + core.num_items
        last = state["epoch"] if state["stopped"] else c.epochs  # a run that stopped early stays stopped
        bar = tqdm(range(state["epoch"], last), disable=not (show_progress(c.progress) and acc.is_main_process),
                   desc="cmc graph", initial=state["epoch"], total=c.epochs)
        for epoch in bar:
            model.train()
            perm = torch.randperm(n, generator=g_shuffle)
            sums = {"loss": 0.0, "mse": 0.0, "view": 0.0, "pref": 0.0, "kl": 0.0}
            steps = 0
            for start in range(0, n, c.batch_size):
                b = perm[start : start + c.batch_size][acc.process_index :: acc.num_processes]  # this process's shard
                nodes = torch.randperm(n_nodes, generator=g_shuffle)[: c.view_nodes].to(device)
                out = model(u[b].to(device), i[b].to(device), r[b].to(device), self.loss, nodes, g_noise)
                opt.zero_grad(set_to_none=True)
                acc.backward(out["loss"])
                opt.step()
                steps += 1
                for key in sums:
                    sums[key] += float(out[key].detach())
            record = {key: v / max(steps, 1) for key, v in sums.items()}
            record["epoch"] = epoch + 1
            if val is not None and len(val[0]):
                record["val_rmse"] = evaluate_rmse(core, *val, clip=clip)
                better = record["val_rmse"] < state["best_val"] - 1e-5
            else:
                record["val_rmse"] = float("nan")
                better = True
            if better:
                state.update(best_val=record["val_rmse"], best_epoch=epoch + 1, bad=0,
                             best_model=copy.deepcopy(core.state_dict()))
            else:
                state["bad"] += 1
            state["epoch"] = epoch + 1
            state["history"].append(record)
            state["stopped"] = state["bad"] >= c.patience
            bar.set_postfix(mse=f"{record['mse']:.3f}", val=f"{record['val_rmse']:.4f}",
                            **({"stopped": f"early, best epoch {state['best_epoch']}"} if state["stopped"] else {}))
            if folder is not None and acc.is_main_process:
                atomic_save({"model": core.state_dict(), "optimizer": opt.state_dict(), "state": state,
                             "g_shuffle": g_shuffle.get_state(), "g_noise": g_noise.get_state(),
                             "config": _bound_config(c), "loss": asdict(self.loss), "data": data_fp,
                             "model_fingerprint": model_fp}, folder / CHECKPOINT, folder / PREVIOUS)
            if callback is not None:
                callback(epoch + 1, record)
            if state["stopped"]:
                logger.info("graph model: early stopping at epoch %d (no better validation RMSE for %d epochs); "
                            "keeping epoch %d (RMSE %.4f)", epoch + 1, c.patience, state["best_epoch"],
                            state["best_val"])
                break
        bar.close()
        core.load_state_dict(state["best_model"])
        return TrainResult(best_epoch=state["best_epoch"], best_val_rmse=state["best_val"],
                           epochs_run=state["epoch"], history=state["history"], stopped_early=state["stopped"],
                           resumed_at=resumed_at)


@torch.no_grad()
def evaluate_rmse(model: ContrastiveMatrixModel, users: np.ndarray, items: np.ndarray, ratings: np.ndarray,
                  clip: tuple[float, float] | None = None) -> float:
    """RMSE of the rating head on index triples (eval mode, optionally clipped)."""
    device = model.user_emb.weight.device
    z = model.embeddings()
    pred = model.rating(z, torch.as_tensor(users, device=device).long(), torch.as_tensor(items, device=device).long())
    if clip is not None:
        pred = pred.clamp(*clip)
    return rmse(np.asarray(ratings), pred.cpu().numpy())
