"""`train.strategy: fsdp`: Lightning's FSDPStrategy (torch's FullyShardedDataParallel, FSDP1) as
the preference stages need it, on GPUs and on CPU processes alike.

What Lightning's own `strategy="fsdp"` lacks here, and this adds:
- one FSDP unit per decoder layer (transformers' GradientCheckpointingLayer: LlamaDecoderLayer,
  GPT2Block, ...) and one root unit for the rest (embeddings, final norm, head); the frozen
  reference of a full fine-tuning is sharded the same way (its units hold frozen weights only);
  use_orig_params=True, so that a LoRA layer's frozen base weight and trainable A, B can share
  a unit and the optimiser sees the model's own parameters;
- CPU processes (gloo): Lightning refuses FSDP without a CUDA accelerator (its accelerator
  connector checks `type(strategy) is FSDPStrategy` with accelerator cpu), and torch's FSDP
  asks for an accelerator unless device_id names the CPU (torch/distributed/fsdp/_init_utils.py,
  _init_device_handle); here device_id is the CPU there;
- gradient clipping by norm over the whole sharded gradient (FullyShardedDataParallel
  .clip_grad_norm_ on the root unit), where Lightning's FSDPPrecision refuses
  `gradient_clip_algorithm='norm'`;
- full checkpoints read with torch.load(weights_only=True), as every other checkpoint of the
  stages (Lightning reads them with a pickle.Unpickler that would run code in the file);
  gathered without offloading to the CPU when training on it (torch's offload_to_cpu frees the
  gathered weights it has just "moved" when they already are on the CPU: a segfault);
- the same wrapped model for trainer.validate after trainer.fit (Lightning would wrap the
  LightningModule again, around decoder layers already sharded);
- full_weights(): the whole trained model on rank 0, for saving it.

FSDP1 rather than FSDP2 (torch.distributed.fsdp.fully_shard, which also runs on CPU processes):
Lightning drives FSDP2 through ModelParallelStrategy, which needs the LightningModule to shard
itself in configure_model; and fully_shard's all-gather buffers, made while the reference runs
under torch.inference_mode, fail once training uses them ("Inplace update to inference tensor
outside InferenceMode is not allowed"), where FSDP1 runs PreferenceModule as it is.

Checkpoints are full (state_dict_type "full"): rank 0 gathers the model and optimiser state into
one last.ckpt, written like every other checkpoint (AtomicCheckpointIO), that every rank reads to
resume. That needs the whole model and optimiser state in rank 0's CPU memory while it saves.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.strategies.fsdp import _is_full_checkpoint
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision


def is_decoder_layer(module: torch.nn.Module) -> bool:
    """A transformers decoder layer (what FSDP gathers at a time)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return isinstance(module, GradientCheckpointingLayer)


def _wrap_decoder_layers(module: torch.nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP's auto_wrap_policy: descend everywhere, wrap each decoder layer."""
    return recurse or is_decoder_layer(module)


class ShardedPrecision(FSDPPrecision):
    """FSDPPrecision that clips the norm of the whole gradient, every rank's shard of it: the root
    unit's clip_grad_norm_ (torch.nn.utils.clip_grad_norm_ would see one shard)."""

    root: FullyShardedDataParallel | None = None

    @property
    def mixed_precision_config(self) -> MixedPrecision:
        """Lightning's (parameters gathered in the half type for the forward and backward), with
        the gradients reduced across ranks and the buffers (rotary inv_freq) kept in float32, as
        under ddp (Lightning puts both in the half type too)."""
        return replace(super().mixed_precision_config, reduce_dtype=torch.float32, buffer_dtype=torch.float32)

    def clip_grad_by_norm(self, optimizer: Any, clip_val: int | float) -> None:
        assert self.root is not None, "the model is wrapped before the first step"
        self.root.clip_grad_norm_(clip_val)


@contextmanager
def _full_state(module: FullyShardedDataParallel, rank0_only: bool) -> Iterator[None]:
    """The full (unsharded) state dict of module: offloaded to the CPU from a GPU only."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType

    offload = next(module.parameters()).device.type != "cpu"
    with FullyShardedDataParallel.state_dict_type(
        module,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
        FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
    ):
        yield


class ShardedStrategy(FSDPStrategy):
    """`train.strategy: fsdp` (module docstring)."""

    def __init__(self, precision: str) -> None:
        super().__init__(
            auto_wrap_policy=_wrap_decoder_layers,
            use_orig_params=True,
            state_dict_type="full",
            precision_plugin=ShardedPrecision(precision),  # type: ignore[arg-type]
        )
        self._wrapped: FullyShardedDataParallel | None = None

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self._wrapped is not None and self._wrapped.module is model:  # validate after fit
            return self._wrapped
        if self.root_device.type == "cpu":  # Lightning passes device_id=None there: torch refuses
            wrapped = FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=self.root_device,
                **self.kwargs,
            )
            kwargs, self.kwargs = self.kwargs, {k: v for k, v in self.kwargs.items() if k != "auto_wrap_policy"}
            try:  # wrapped already: Lightning adds what it does after wrapping (torchmetrics' device)
                model = super()._setup_model(wrapped)
            finally:
                self.kwargs = kwargs
        else:
            model = super()._setup_model(model)
        assert isinstance(model, FullyShardedDataParallel)
        self._wrapped = model
        self.precision_plugin.root = model  # type: ignore[attr-defined]
        return model

    def lightning_module_state_dict(self) -> dict[str, Any]:
        assert isinstance(self.model, FullyShardedDataParallel)
        with _full_state(self.model, rank0_only=True):
            return self.model.state_dict()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from torch.distributed.fsdp import OptimStateKeyType

        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer
        assert isinstance(self.model, FullyShardedDataParallel)
        with _full_state(self.model, rank0_only=True):
            state = FullyShardedDataParallel.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:  # the standard layout (parameter ids), as Lightning writes it
                state = FullyShardedDataParallel.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
            return state

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """A full checkpoint (what this strategy writes), read on every rank with
        torch.load(weights_only=True) whatever weights_only says: a file that carries code raises
        torch's UnpicklingError, nothing in it runs (errors.weights_only makes that one line)."""
        from torch.distributed.fsdp import OptimStateKeyType

        path = Path(self.broadcast(checkpoint_path))
        if not _is_full_checkpoint(path):  # a sharded one (a folder) was not written here
            raise ValueError(f"{path}: not a checkpoint file")
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        assert isinstance(self.model, FullyShardedDataParallel)
        assert self.lightning_module is not None
        with _full_state(self.model, rank0_only=False):
            self.model.load_state_dict(checkpoint.pop("state_dict"), strict=self.lightning_module.strict_loading)
        states = checkpoint.get("optimizer_states")
        if states is None or self.lightning_module.trainer.state.fn != TrainerFn.FITTING:
            return checkpoint
        if len(self.optimizers) != len(states):
            raise RuntimeError(f"{path}: {len(states)} optimizer states for {len(self.optimizers)} optimizers")
        with _full_state(self.model, rank0_only=False):
            for optimizer, state in zip(self.optimizers, states, strict=True):
                if state["state"] and isinstance(next(iter(state["state"])), int):
                    state = FullyShardedDataParallel.rekey_optim_state_dict(
                        state, OptimStateKeyType.PARAM_NAME, self.model
                    )
                optimizer.load_state_dict(
                    FullyShardedDataParallel.optim_state_dict_to_load(self.model, optimizer, state)
                )
        return checkpoint

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """Loaded in load_checkpoint already."""


@contextmanager
def _unwrapped(module: torch.nn.Module) -> Iterator[None]:
    """Each FSDP unit inside module replaced by the module it wraps, and put back on leaving: the
    plain module tree that peft's save_pretrained needs (it names an adapter's weights by the
    module names, which FSDP's units lengthen with `_fsdp_wrapped_module.`: it saved nothing)."""
    units = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
             if isinstance(child, FullyShardedDataParallel)]  # fmt: skip
    for parent, name, unit in units:
        setattr(parent, name, unit.module)
    try:
        yield
    finally:
        for parent, name, unit in reversed(units):
            setattr(parent, name, unit)


@contextmanager
def full_weights(trainer: L.Trainer) -> Iterator[None]:
    """Under fsdp, the whole trained model, in the LightningModule's own (unwrapped) modules, on
    rank 0 while inside; every rank must enter (gathering is collective), the others keep their
    shard. Any other strategy: nothing to do."""
    strategy = trainer.strategy
    if not isinstance(strategy, ShardedStrategy) or not isinstance(strategy.model, FullyShardedDataParallel):
        yield
        return
    offload = strategy.root_device.type != "cpu"
    with (
        FullyShardedDataParallel.summon_full_params(
            strategy.model, writeback=False, rank0_only=True, offload_to_cpu=offload
        ),
        _unwrapped(strategy.model.module),
    ):
        yield
