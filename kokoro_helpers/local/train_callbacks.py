"""TRL's SFTTrainer, with what this project's runs report around it.

- :class:`KokoroSFTTrainer`: SFTTrainer whose held-out loss is the mean cross-entropy per
  labelled (assistant) token over the whole split — summed over every process without the
  duplicated samples an evenly-sharded loader adds — computed with TRL's fused LM head (the full
  logits are never built); with the adapter on or off. It also counts, across processes, the
  batch positions (with padding) and labelled tokens of each step, and the time inside training
  steps; the counts go into the Trainer's log history, so they survive a resume.
- callbacks: a progress bar with loss, learning rate, tokens/s and the resource monitor (CPU,
  RAM, disk, GPU memory; a line warns at 90%), a step timer, a per-epoch valid-loss line, and a
  stop after ``max_steps`` optimizer steps that saves a checkpoint (the schedule still spans all
  epochs, so a later run resumes on the same curve).
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

import torch
from torch.utils.data import Sampler
from transformers import TrainerCallback
from trl import SFTTrainer

IGNORE_INDEX = -100
COUNTERS = ("positions_seen", "label_tokens_seen", "train_time_s")


def score_labelled_positions_only() -> None:
    """TRL's fused LM head projects only the labelled positions on CUDA/XPU, but every position
    elsewhere (so that Neuron compiles one tile shape). On a CPU that doubles the head's work and
    memory for chat data, where fewer than half of the tokens are the assistant's: score only the
    labelled positions there too. (Patches the name ``trl.trainer.utils`` looks up; the kernel's
    own choice of Triton or torch tiles is untouched.)"""
    from trl.trainer import utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if original is None or getattr(original, "_kokoro", False):
        return

    def compact(device) -> bool:
        return bool(original(device)) or device.type == "cpu"

    compact._kokoro = True
    trl_utils._use_triton = compact


class EpochLengthGroupedSampler(Sampler):
    """Batches of similar length over the whole split, in a shuffled order, the longest first
    (a short remainder batch last).

    The Trainer's LengthGroupedSampler sorts only within mega-batches of at most 50 batches (2
    batches on the embedded default), and draws from the global RNG, so a resumed epoch is
    ordered differently from the interrupted one. This one sorts the whole split (ties broken
    at random), shuffles the batch order with a generator seeded by (seed, epoch) — the Trainer
    calls ``set_epoch`` — so every epoch differs, and a resumed epoch is the same epoch.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), int(batch_size), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        noise = torch.rand(len(self.lengths), generator=g).tolist()
        order = sorted(range(len(self.lengths)), key=lambda i: (-self.lengths[i], noise[i]))
        batches = [order[k:k + self.batch_size] for k in range(0, len(order), self.batch_size)]
        # the loader re-cuts this flat order into batch_size pieces: a short last batch must stay last
        tail = [batches.pop()] if batches and len(batches[-1]) < self.batch_size else []
        if len(batches) > 1:
            rest = [batches[1:][i] for i in torch.randperm(len(batches) - 1, generator=g).tolist()]
            batches = [batches[0], *rest]
        return iter([i for b in batches + tail for i in b])


class KokoroSFTTrainer(SFTTrainer):
    """SFTTrainer + per-token held-out loss and persistent token / time counters."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or dataset is None or "seq_lengths" in \
                dataset.column_names:
            return super()._get_train_sampler(train_dataset)
        return EpochLengthGroupedSampler([len(x) for x in dataset["input_ids"]], self.args.per_device_train_batch_size,
                                         self.args.data_seed if self.args.data_seed is not None else self.args.seed)

    def __init__(self, *args: Any, **kwargs: Any):
        score_labelled_positions_only()
        super().__init__(*args, **kwargs)
        self.counters: dict[str, float] = {k: 0 for k in COUNTERS}
        self._step_time: float | None = None

    # ----------------------------------------------------------------- the loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Length-grouped batches are right-padded: a causal model's real tokens then only ever
        attend to earlier real tokens, so the padding mask changes nothing that is trained and is
        left out (attention runs its plain causal kernel; padded positions carry label -100).
        Position ids stand in for it (0..n-1 per row, as the mask would give). The fixed-padding
        baseline (``batching: max_length``) keeps the mask, as the seeds' pipeline did."""
        if self.args.train_sampling_strategy == "group_by_length" and "attention_mask" in inputs \
                and not self.padding_free:
            ids = inputs["input_ids"]
            inputs = {k: v for k, v in inputs.items() if k != "attention_mask"}
            inputs["position_ids"] = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    # ----------------------------------------------------------------- counting
    def _track_num_input_tokens(self, inputs):
        super()._track_num_input_tokens(inputs)
        labels = inputs["labels"]
        n = torch.tensor([inputs["input_ids"].numel(), int((labels[:, 1:] != IGNORE_INDEX).sum())],
                         dtype=torch.int64, device=labels.device)
        if self.accelerator.num_processes > 1:
            n = self.accelerator.reduce(n, reduction="sum")
        self.counters["positions_seen"] += int(n[0])
        self.counters["label_tokens_seen"] += int(n[1])

    def restore_counters(self) -> None:
        """After a resume: the counters as of the checkpoint's last training log."""
        for entry in reversed(self.state.log_history):
            if "train_time_s" in entry:
                for k in COUNTERS:
                    self.counters[k] = entry.get(k, 0)
                return

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:                       # a training step's log (logging_steps=1)
            logs.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.counters.items()})
            if self._step_time is not None:
                logs["step_time_s"] = round(self._step_time, 4)
        super().log(logs, start_time)

    # ----------------------------------------------------------------- held-out loss
    def heldout_loss(self, dataset=None, adapter: bool = True) -> float | None:
        """Mean cross-entropy per labelled token over ``dataset`` (default: the eval split)."""
        dataset = self.eval_dataset if dataset is None else dataset
        if dataset is None or len(dataset) == 0:
            return None
        acc = self.accelerator
        model = acc.unwrap_model(self.model)
        lengths = [len(x) for x in dataset["input_ids"]]
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])     # little padding
        bs = self.args.per_device_eval_batch_size
        batches = [order[k:k + bs] for k in range(0, len(order), bs)][acc.process_index::acc.num_processes]
        sums = torch.zeros(2, dtype=torch.float64, device=self.args.device)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), (nullcontext() if adapter else model.disable_adapter()), \
                    self.compute_loss_context_manager():
                for idx in batches:
                    inputs = self._prepare_inputs(self.data_collator([dataset[i] for i in idx]))
                    out = model(**inputs, fused_lm_head=True, use_cache=False)
                    sums[0] -= out.log_probs.double().sum()
                    sums[1] += out.label_mask.sum()
        finally:
            model.train(was_training)
        if acc.num_processes > 1:
            sums = acc.reduce(sums, reduction="sum")
        return float(sums[0] / sums[1]) if float(sums[1]) > 0 else None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        loss = self.heldout_loss(eval_dataset if eval_dataset is not None and not isinstance(eval_dataset, str)
                                 else None)
        metrics = {f"{metric_key_prefix}_loss": loss} if loss is not None else {}
        if metrics:
            self.log(dict(metrics))
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


class StepTimer(TrainerCallback):
    """Seconds inside each optimizer step (forward, backward, optimizer; no eval, no checkpoint)."""

    def __init__(self, trainer_ref: dict):
        self.ref = trainer_ref          # {"trainer": KokoroSFTTrainer}, filled once it exists
        self.t0 = 0.0

    def on_train_begin(self, args, state, control, **kw):
        self.ref["trainer"].restore_counters()

    def on_step_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if torch.cuda.is_available() and args.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - self.t0
        trainer = self.ref["trainer"]
        trainer._step_time = dt
        trainer.counters["train_time_s"] += dt


class StopAfter(TrainerCallback):
    """Stop after ``max_steps`` optimizer steps, saving a checkpoint a later run resumes from."""

    def __init__(self, max_steps: int | None, save: bool = True):
        self.max_steps, self.save = max_steps, save

    def on_step_end(self, args, state, control, **kw):
        if self.max_steps and state.global_step >= self.max_steps and state.global_step < state.max_steps:
            control.should_training_stop = True
            control.should_save = self.save
        return control


class ProgressCallback(TrainerCallback):
    """One tqdm bar: loss, lr, tokens/s and resource use; 90% alerts as lines (main process only)."""

    def __init__(self, name: str, monitor, show: bool = True, log=print, base_loss_ref: dict | None = None):
        self.name, self.monitor, self.show, self.log = name, monitor, show, log
        self.bar = None
        self.base_ref = base_loss_ref if base_loss_ref is not None else {}

    def on_train_begin(self, args, state, control, **kw):
        if self.show and state.is_world_process_zero:
            from kokoro_helpers.progress import tqdm
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=f"LoRA {self.name}",
                            unit="step", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
        if state.is_world_process_zero:
            for line in self.monitor.check():
                self.log(line)

    def on_log(self, args, state, control, logs=None, **kw):
        if self.bar is None or not logs or "loss" not in logs:
            return
        t = logs.get("train_time_s") or 0
        tps = state.num_input_tokens_seen / t if t else 0.0
        self.bar.set_postfix({"loss": f"{logs['loss']:.3f}", "lr": f"{logs.get('learning_rate', 0):.1e}",
                              "tok/s": f"{tps:,.0f}", **self.monitor.postfix()}, refresh=False)

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        if state.is_world_process_zero and metrics and "eval_loss" in metrics:
            base = self.base_ref.get("base_valid_loss")
            epoch = round(state.epoch or 0)
            self.log(f"epoch {epoch}/{round(args.num_train_epochs)}: valid loss {metrics['eval_loss']:.4f}"
                     + (f" (base {base:.4f})" if base is not None else ""))

    def on_train_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
