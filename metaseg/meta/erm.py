"""ERM, the control: plain joint training on the mix, same model, same budget, same evaluation.

Every table of a meta-learning paper needs it: does meta-learning beat simply training on
all the data and fine-tuning on the few held-out shots?

Budget, per outer step: ERM draws the same ``meta_batch`` tasks from the same sampler
stream as MAML and makes the same passes over them: K plain updates on the support
batches, then one on the query batches (each update: the mean loss over the meta_batch
batches, one forward and one backward pass each, then an Adam step at beta). That is
meta_batch * (K + 1) forward and as many backward passes, MAML's count (K support passes
and one query pass per task), on the same images; MAML's outer backward through the
unrolled steps costs more, which the cost table of docs/algorithms.md measures. Batches stay per
dataset, so BatchNorm sees the same batch statistics as in MAML's tasks.

Evaluation is the shared protocol unchanged: zero-shot, then few-shot fine-tuning on the
held-out support images through ``adapt`` (K SGD steps at alpha) and scoring the rest.
"""

from __future__ import annotations

from typing import Optional

import torch

from metaseg.meta.base import TaskOutcome, tasks_of_step
from metaseg.meta.learner import Batch, MetaLearner


class ERM(MetaLearner):
    name = "erm"
    has_meta_gradient = False
    first_order_only = True  # no gradient through any inner loop, by construction

    def outer_loss(self, support: Batch, query: Batch, *, step: Optional[int] = None) -> torch.Tensor:
        """The plain loss at theta, mean of the support and query batches (no adaptation)."""
        self.model.train()
        theta = self.inner.theta()
        s, q = self.inner.loss_at(theta, *support), self.inner.loss_at(theta, *query)
        self.last_stats = {"support_loss_before": float(s.detach()), "query_loss_after": float(q.detach())}
        return 0.5 * (s + q)

    def meta_step(self, sampler, optimizer, scaler, step: int, *, device=None, log: bool = False) -> dict:
        self.step, self.logging = step, log
        self.model.train()
        tasks = list(tasks_of_step(sampler, self.outer.meta_batch))  # this process's share
        tasks = [t.to(device) for t in tasks] if device is not None else tasks
        before = [self.query_loss_before(t) for t in tasks] if log else []
        passes, skipped, stats = [], 0.0, {}
        for u in range(self.inner_steps + 1):
            key = "support" if u < self.inner_steps else "query"
            lr = self.begin_step(optimizer, scaler, step)
            outcomes = []
            for task in tasks:
                loss = self.inner.loss_at(self.inner.theta(), *getattr(task, key))
                value = float(loss.detach())
                if not self.guard.finite(value):
                    self.guard.skip(step, f"{key} loss")
                    outcomes.append(TaskOutcome(False))
                    continue
                self.guard.ok()
                scaler.scale(loss / self.outer.meta_batch).backward()
                outcomes.append(TaskOutcome(True, {"loss": value}))
            stats = self.finish_step(optimizer, scaler, outcomes)
            skipped += stats.pop("tasks_skipped")
            passes.append(stats.pop("loss", float("nan")))
        if self.inner_steps:
            stats["support_loss_before"], stats["support_loss_after"] = passes[0], passes[-2]
        stats.update(outer_loss=passes[-1], query_loss_after=passes[-1], tasks_skipped=skipped, outer_lr=lr)
        if before:  # this process's tasks only
            stats["query_loss_before"] = sum(before) / len(before)
        return stats
