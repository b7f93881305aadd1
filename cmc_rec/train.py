"""Accelerate-based trainer: early stopping on a validation split, atomic checkpoints, resume.

``accelerate launch`` runs the same code on several GPUs: each process takes a strided shard of
every mini-batch of ratings (the graph is small next to the embeddings and is replicated), and
gradients are all-reduced by the wrapped model.  Every random choice -- the shuffle, the edge
dropout and the variational noise -- comes from seeded ``torch.Generator`` objects whose states
are checkpointed, so an interrupted run resumed from its checkpoint ends bit-identical to an
uninterrupted one.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .metrics import rmse
from .model import ContrastiveMatrixModel, LossConfig


@dataclass
class TrainConfig:
    epochs: int = 300  # upper bound; early stopping usually ends sooner (~60-90 epochs on ML-100K)
    batch_size: int = 131_072  # ratings per optimiser step (all processes); full batch on ML-100K, as GC-MC
    lr: float = 0.02  # Adam
    val_fraction: float = 0.05  # share of the TRAINING ratings held out for early stopping
    patience: int = 10  # epochs without a better validation RMSE before stopping
    view_nodes: int = 1024  # nodes sampled per step for the view-vs-view InfoNCE
    seed: int = 0  # model init, validation split, shuffling, dropout and variational noise
    checkpoint_dir: str | None = None  # where last.pt goes; None = no checkpoints
    resume: bool = True  # continue from checkpoint_dir/last.pt when it exists
    progress: bool = False  # tqdm bar over epochs
    cpu: bool = False  # force CPU even when accelerate sees a GPU

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.patience < 1 or self.view_nodes < 0:
            raise ValueError(f"bad TrainConfig: {self}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass
class TrainResult:
    best_epoch: int  # 1-based epoch whose weights were kept (0 = initial weights)
    best_val_rmse: float
    epochs_run: int
    history: list[dict] = field(default_factory=list)


def atomic_save(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same folder, then ``os.replace``: never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Trainer:
    """Train a :class:`ContrastiveMatrixModel` (with its graph attached) on index triples."""

    def __init__(self, config: TrainConfig, loss: LossConfig) -> None:
        self.config, self.loss = config, loss

    def fit(self, model: ContrastiveMatrixModel, train: tuple[np.ndarray, np.ndarray, np.ndarray],
            val: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
            callback: Callable[[int, dict], None] | None = None,
            clip: tuple[float, float] | None = None) -> TrainResult:
        """train / val: (users, items, ratings) contiguous-index arrays.  Returns the history.

        ``callback(epoch, record)`` runs after each epoch's checkpoint (it may raise to stop);
        ``clip`` bounds the validation predictions (the rating range).
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
                 "best_model": copy.deepcopy(model.state_dict())}
        ckpt = Path(c.checkpoint_dir) / "last.pt" if c.checkpoint_dir else None
        if ckpt is not None and c.resume and ckpt.is_file():
            saved = torch.load(ckpt, map_location="cpu", weights_only=False)
            if saved["config"] != asdict(c) or saved["loss"] != asdict(self.loss):
                raise ValueError(f"{ckpt} was written with another config; delete it or set resume=False")
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            g_shuffle.set_state(saved["g_shuffle"])
            g_noise.set_state(saved["g_noise"])
            state = saved["state"]
        model, opt = acc.prepare(model, opt)
        core = acc.unwrap_model(model)
        n = len(r)
        n_nodes = core.num_users + core.num_items
        bar = tqdm(range(state["epoch"], c.epochs), disable=not (c.progress and acc.is_main_process),
                   desc="cmc", initial=state["epoch"], total=c.epochs)
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
            bar.set_postfix(mse=f"{record['mse']:.3f}", val=f"{record['val_rmse']:.4f}")
            if ckpt is not None and acc.is_main_process:
                atomic_save({"model": core.state_dict(), "optimizer": opt.state_dict(), "state": state,
                             "g_shuffle": g_shuffle.get_state(), "g_noise": g_noise.get_state(),
                             "config": asdict(c), "loss": asdict(self.loss)}, ckpt)
            if callback is not None:
                callback(epoch + 1, record)
            if state["bad"] >= c.patience:
                break
        core.load_state_dict(state["best_model"])
        return TrainResult(best_epoch=state["best_epoch"], best_val_rmse=state["best_val"],
                           epochs_run=state["epoch"], history=state["history"])


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
