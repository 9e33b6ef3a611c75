"""LightningModules: thin wrappers from a batch to the losses of rsa_pl.losses, with logging.

Validation numbers are means over the whole validation set, accumulated in torchmetrics
MeanMetric objects and logged as such: Lightning computes them once at the end of the
validation epoch, and torchmetrics sums their (sum, count) states over DDP ranks, so that the
number is the same whichever way the set is split over ranks and batches: val/loss of SFT is
the mean over every response token, the preference stages' val/* the means over pairs.
Lightning's own epoch mean (`self.log(value, batch_size=n)`) is exact on one process, but its
sync_dist averages the ranks' summed batch sizes in integer arithmetic (lightning 2.6: an odd
total of 7 pairs counts as 3 per rank instead of 3.5), which is wrong whenever the ranks' shares
differ. NaN is kept (nan_strategy disable: a diverged model must show), and no weights are
passed: torchmetrics 1.9 drops them under that strategy (torchmetrics#3434).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor
from torchmetrics.aggregation import MeanMetric
from transformers import PreTrainedModel

from rsa_pl.config import TrainParams
from rsa_pl.data.tokenize import IGNORE_INDEX
from rsa_pl.fast.chunked import ReferenceHead
from rsa_pl.losses import preference_loss, preference_loss_from_logits
from rsa_pl.models import only_adapters


def next_token_targets(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Align logits with the tokens they predict: the (N, T, V) logits as they are (slicing off
    the last position would copy them, and its gradient would be a zero-filled copy too), the
    (N, T) token each position predicts and the mask of positions that predict one (the last
    position and prompt or padding targets predict none)."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return logits, targets.clamp(min=0), targets != IGNORE_INDEX


def logits_window(labels: Tensor) -> int:
    """How many final positions' logits a loss over labels reads: from the position before the
    batch's earliest labelled token to the end (transformers' `logits_to_keep`). The LM head
    then skips prompt positions, which on long prompts and large vocabularies is most of its
    time and of the logits' memory. labels (N, T) -> K in [1, T]; all of T when none is labelled."""
    labelled = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero()  # columns t with a target at t + 1
    return labels.shape[1] - int(labelled[0]) if labelled.numel() else labels.shape[1]


# Architectures whose logits are exactly lm_head(last hidden state): no soft-capping or scaling
# after the head (Gemma 2's final_logit_softcapping, Cohere's logit_scale, Granite's
# logits_scaling would be skipped), so the reference's logits can be recomputed from its hidden
# states block by block. Others keep the plain path (the reference's whole logits).
PLAIN_HEAD_MODEL_TYPES = frozenset(
    {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gpt2", "phi3", "olmo", "olmo2"}
)


def plain_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The model's LM head when its logits are exactly head(last hidden state) and the head is a
    plain, frozen torch Linear (not a LoRA-wrapped, 4-bit or trainable one); else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    if head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
        return None
    return head


@contextmanager
def _without_head(model: torch.nn.Module, head: torch.nn.Linear) -> Iterator[None]:
    """The model's forward returns its last hidden states (at logits_to_keep) as its "logits"."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_output_embeddings(torch.nn.Identity())
    try:
        yield
    finally:
        base.set_output_embeddings(head)


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier: linear warmup to 1, then cosine decay to 0 at `total` steps."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient with train.nonfinite: stop."""


class _TrainingModule(L.LightningModule):
    """Optimiser, schedule, tokens/s and grad-norm logging, non-finite guards, RNG state in
    checkpoints: what the stages' modules share. `stage` names the stage in messages."""

    def __init__(self, model: PreTrainedModel, train: TrainParams, stage: str = "train") -> None:
        super().__init__()
        self.model, self.train_params, self.stage = model, train, stage
        self._step_started = 0.0
        self._rng_to_restore: dict[str, Any] | None = None
        self.skipped_batches = 0

    def _nonfinite(self, what: str, batch_idx: int) -> None:
        """Stop with one line, or count a skipped batch (train.nonfinite)."""
        where = f"{self.stage}: non-finite {what} at step {self.global_step}"
        where += f" (epoch {self.current_epoch}, batch {batch_idx})"
        if self.train_params.nonfinite == "stop":
            raise NonFiniteError(
                f"{where}; the last checkpoint is kept: rerun to resume from it, or set "
                f"{self.stage}.train.nonfinite: skip to skip such batches"
            )
        self.skipped_batches += 1
        self.log("train/skipped_batches", float(self.skipped_batches), on_step=True, on_epoch=False)

    def checked(self, loss: Tensor, batch_idx: int) -> Tensor | None:
        """The loss if finite; else stop, or None (Lightning then skips backward and the step)."""
        if torch.isfinite(loss.detach()).all():
            return loss
        self._nonfinite("loss", batch_idx)
        return None

    def configure_optimizers(self) -> Any:
        p = self.train_params
        decay = [w for n, w in self.model.named_parameters() if w.requires_grad and w.dim() >= 2]
        no_decay = [w for n, w in self.model.named_parameters() if w.requires_grad and w.dim() < 2]
        groups = [{"params": decay, "weight_decay": p.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=p.lr)
        total = int(self.trainer.estimated_stepping_batches)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, p.warmup_steps, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_fit_start(self) -> None:
        self.model.train()  # from_pretrained leaves models in eval mode

    def on_train_start(self) -> None:
        self.model.train()  # the sanity check may have run in between
        if self._rng_to_restore is not None:  # after the sanity check, right before the next step
            _set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning keeps no RNG state: without it a resumed run draws other dropout masks.
        checkpoint["rng_states"] = _rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = checkpoint.get("rng_states")

    def on_train_batch_start(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Tensor], batch_idx: int) -> None:
        seconds = time.perf_counter() - self._step_started
        tokens = float(batch["attention_mask"].sum())
        self.log("train/tokens_per_s", tokens / max(seconds, 1e-9), on_step=True, on_epoch=False)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # One fused pass over the gradients gives both the logged norm and the finiteness check
        # (a NaN or inf anywhere makes the total non-finite): one device sync per step.
        # Under FSDP each rank holds a shard of the gradient: the squares are summed over ranks
        # (every rank takes part, with or without gradients), so that the logged norm is the whole
        # gradient's and every rank takes the same non-finite decision (one stopping alone would
        # leave the others waiting).
        grads = [w.grad for w in self.model.parameters() if w.grad is not None]
        sharded = self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy)
        if grads or sharded:
            norms = (
                [n.float() for n in torch._foreach_norm(grads, 2.0)] if grads else [torch.zeros((), device=self.device)]
            )
            total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
            if sharded:
                squares = total.square()
                torch.distributed.all_reduce(squares)
                total = squares.sqrt()
            if not torch.isfinite(total):
                self._nonfinite("gradient", self.trainer.fit_loop.epoch_loop.batch_progress.current.ready - 1)
                for w in self.model.parameters():
                    w.grad = None  # AdamW leaves parameters without a gradient untouched: the update is skipped
                return
            self.log("train/grad_norm", total, on_step=True, on_epoch=False)
        self.log("train/lr", optimizer.param_groups[0]["lr"], on_step=True, on_epoch=False)


def _validation_mean() -> MeanMetric:
    """A mean over every value given to it in a validation epoch, on every rank (module docstring)."""
    return MeanMetric(nan_strategy="disable")


class SFTModule(_TrainingModule):
    """Next-token cross-entropy on response tokens (labels -100 on the prompt and padding).
    val/loss: the mean over every response token of the validation set."""

    def __init__(self, model: PreTrainedModel, train: TrainParams, stage: str = "train") -> None:
        super().__init__(model, train, stage)
        self.val_loss = _validation_mean()

    def _token_losses(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Cross-entropy at every position (N*T,) and the mask of response targets (N*T,)."""
        keep = logits_window(batch["labels"])
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        logits = self.model(**inputs, logits_to_keep=keep).logits
        logits, targets, mask = next_token_targets(logits, batch["labels"][:, -keep:])
        losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        return losses, mask.flatten()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        losses, mask = self._token_losses(batch)
        loss = (losses * mask).sum() / mask.sum().clamp(min=1)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(batch["labels"]))
        return self.checked(loss, batch_idx)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        losses, mask = self._token_losses(batch)
        self.val_loss.update(losses[mask])
        self.log("val/loss", self.val_loss, prog_bar=True, on_step=False, on_epoch=True)


class PreferenceModule(_TrainingModule):
    """The preference loss (docs/method.md) on concatenated [chosen; rejected] batches, both stages.

    The reference is the policy with its LoRA adapter disabled (reference=None: no second copy),
    the policy with only the frozen adapters named in reference_adapters active (a 4-bit stage 2:
    the stage-1 adapter under the new one), or a frozen full copy; its forward runs without
    gradient and in eval mode, so that at the first step policy and reference logits are equal.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        train: TrainParams,
        objective: dict[str, Any],
        reference: PreTrainedModel | None,
        reference_adapters: list[str] | None = None,
        stage: str = "train",
        reference_head: bool = False,
    ) -> None:
        super().__init__(model, train, stage)
        self.objective, self.reference, self.reference_adapters = objective, reference, reference_adapters
        self.use_reference_head = reference_head
        if reference is not None:
            reference.requires_grad_(False)
        # "loss" and preference_loss's metric names for this objective (risk/* only with a measure)
        one = torch.zeros(1)
        risk = one if objective["measure"] is not None else None
        _, names = preference_loss(one, one, one, one, risk, risk, beta=objective["beta"], alpha=objective["alpha"],
                                   variant=objective["variant"])  # fmt: skip
        # keys without "/" (a module name); torchmetrics objects must be attributes for Lightning to log them
        self.val_means = torch.nn.ModuleDict({_key(n): _validation_mean() for n in ("loss", *names)})

    @torch.inference_mode()
    def reference_logits(self, batch: dict[str, Tensor], keep: int = 0, head: torch.nn.Linear | None = None) -> Tensor:
        """The reference's logits at the last `keep` positions (0: all), without autograd; with
        `head` (its plain_head), its last hidden states there instead."""
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "logits_to_keep": keep}
        model = self.reference if self.reference is not None else self.model
        with _without_head(model, head) if head is not None else nullcontext():
            if self.reference is not None:
                self.reference.eval()
                return self.reference(**inputs).logits
            was_training = self.model.training
            self.model.eval()
            policy_off = only_adapters(self.model, self.reference_adapters) if self.reference_adapters else None
            with policy_off or self.model.disable_adapter():
                logits = self.model(**inputs).logits
            self.model.train(was_training)
        return logits

    def _reference_head(self) -> torch.nn.Linear | None:
        """The reference's plain head when its logits may be recomputed block by block from its
        hidden states: only when asked for (reference_head), and not under a sharded strategy
        (FSDP, DeepSpeed), whose parameters are only whole inside the model's own forward.

        Off by default: the block matmuls round differently from the policy's whole lm_head call,
        so where the policy equals its reference (a fresh adapter's first step) Z is rounding
        noise instead of exactly 0, and a CVaR's gradient there follows that noise instead of
        being KL's (tests/test_learning.py). It halves the step's peak memory at a 152k
        vocabulary (docs/benchmarks.md)."""
        if not self.use_reference_head:
            return None
        trainer = self._trainer
        if trainer is not None and type(trainer.strategy).__name__ not in ("SingleDeviceStrategy", "DDPStrategy"):
            return None
        return plain_head(self.reference if self.reference is not None else self.model)

    def losses(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-pair losses (B,) and per-pair metrics of one [chosen; rejected] batch. Both models
        compute logits only from the earliest response position on (logits_window). With a
        plain head (plain_head) the reference gives its hidden states, and the loss computes its
        logits block by block: no (2B, T, V) reference logits are held; in training the
        backward writes the gradient over the policy's logits (rsa_pl.fast.chunked)."""
        keep = logits_window(batch["labels"])
        head = self._reference_head()
        device = batch["input_ids"].device.type
        ref_head = None
        if head is not None:
            ref_head = ReferenceHead(head.weight.detach(), None if head.bias is None else head.bias.detach(),
                                     torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))  # fmt: skip
        ref_logits = self.reference_logits(batch, keep, head)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        logits = self.model(**inputs, logits_to_keep=keep).logits
        labels = batch["labels"][:, -keep:]
        logits, targets, mask = next_token_targets(logits, labels)
        ref_logits, _, _ = next_token_targets(ref_logits, labels)
        return preference_loss_from_logits(
            logits, ref_logits, targets, mask, ref_head=ref_head, consume_logits=logits.requires_grad, **self.objective
        )

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        losses, metrics = self.losses(batch)
        loss = losses.mean()
        pairs = len(losses)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=pairs)
        for name, values in metrics.items():
            self.log(f"train/{name}", values.mean(), on_step=True, on_epoch=True, batch_size=pairs)
        return self.checked(loss, batch_idx)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """val/loss and val/<metric>: means over every validation pair."""
        losses, metrics = self.losses(batch)
        for name, values in {"loss": losses.detach(), **metrics}.items():
            mean = self.val_means[_key(name)]
            mean.update(values)
            self.log(f"val/{name}", mean, prog_bar=name == "loss", on_step=False, on_epoch=True)


def _key(name: str) -> str:
    return name.replace("/", "_")
