"""The optimisation loop that SAM training (:mod:`segany.training.trainer`) and text-head training
(:mod:`segany.training.text_train`) share.

A step: draw a batch, forward (a dict of scalar tensors holding ``loss``), backward, optional gradient
clipping, optimizer and scheduler step. The step outputs are summed on the device and read back once
every ``log_every`` steps (the loop's only host synchronisation); periodic actions (validation,
checkpoints) run after their steps. What to draw, compute, log and save is the caller's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Every:
    """``action(step)`` after every ``every``-th step (0: never), except the run's last step, which the
    caller's finish handles. ``restarts_clock``: its time is left out of the next log window's
    throughput (a validation, unlike a checkpoint, is not training time)."""

    every: int
    action: Callable[[int], Any]
    restarts_clock: bool = False


@dataclass
class LogWindow:
    """The steps since the last log record, handed to ``on_log``."""

    step: int  #: steps done
    means: dict[str, float]  #: mean of each step output over the window
    last: dict[str, torch.Tensor]  #: the window's last step outputs (detached)
    lr: float  #: the largest lr of the last step
    steps: int  #: steps in the window
    seconds: float  #: wall time of the window
    data_wait: float  #: of which waiting for the next batch


@dataclass
class TrainLoop:
    """Runs steps ``start_step + 1 .. max_steps``; see the module docstring.

    ``next_batch(step)`` and ``forward(batch, step)`` get the 0-based index of the step they make;
    ``params`` are what ``grad_clip > 0`` clips (the norm joins the outputs as ``grad_norm``);
    ``on_log(window)`` runs every ``log_every`` steps and after the last one and may return a dict for
    the progress ``bar`` (any tqdm-like object; closed when the loop ends); ``after_step()`` runs after
    every optimizer step (a weight average's update).
    """

    next_batch: Callable[[int], Any]
    forward: Callable[[Any, int], dict[str, torch.Tensor]]
    optimizer: torch.optim.Optimizer
    scheduler: Any  #: anything with ``step()``, stepped after each optimizer step
    params: Sequence[torch.Tensor]
    max_steps: int
    log_every: int
    on_log: Callable[[LogWindow], dict[str, Any] | None]
    grad_clip: float = 0.0
    actions: Sequence[Every] = ()
    bar: Any = None
    after_step: Callable[[], None] | None = None

    def run(self, start_step: int) -> int:
        """Train up to ``max_steps``; returns the step reached."""
        acc: dict[str, torch.Tensor] = {}
        acc_n = 0
        data_wait = 0.0  # host seconds spent waiting for a batch since the last log
        t_log = time.perf_counter()
        step = start_step
        try:
            while step < self.max_steps:
                t_wait = time.perf_counter()
                batch = self.next_batch(step)
                data_wait += time.perf_counter() - t_wait
                out = self.forward(batch, step)
                lr_now = max(g["lr"] for g in self.optimizer.param_groups)  # the lr this step uses
                out["loss"].backward()
                if self.grad_clip > 0:
                    out["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.after_step is not None:
                    self.after_step()
                step += 1
                for k, v in out.items():
                    acc[k] = acc[k] + v.detach().float() if k in acc else v.detach().float()
                acc_n += 1
                if self.bar is not None:
                    self.bar.update(1)
                if step % self.log_every == 0 or step == self.max_steps:
                    keys = sorted(acc)
                    vals = torch.stack([acc[k] for k in keys]).cpu().tolist()  # the one sync per log interval
                    window = LogWindow(
                        step=step,
                        means={k: v / acc_n for k, v in zip(keys, vals)},
                        last={k: v.detach() for k, v in out.items()},
                        lr=lr_now,
                        steps=acc_n,
                        seconds=time.perf_counter() - t_log,
                        data_wait=data_wait,
                    )
                    postfix = self.on_log(window)
                    if postfix and self.bar is not None:
                        self.bar.set_postfix(**postfix)
                    acc, acc_n, data_wait, t_log = {}, 0, 0.0, time.perf_counter()
                for a in self.actions:
                    if a.every > 0 and step % a.every == 0 and step < self.max_steps:
                        a.action(step)
                        if a.restarts_clock:
                            data_wait, t_log = 0.0, time.perf_counter()
        finally:
            if self.bar is not None:
                self.bar.close()
        return step
