"""Models and tokenizers in Hugging Face format: building tiny ones from configs, loading, saving."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rsa_pl.config import LoraParams, ModelParams


def _llama(p: ModelParams, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads,
        num_key_value_heads=p.num_heads,
        max_position_embeddings=p.max_positions,
        tie_word_embeddings=True,
    )


def _gpt2(p: ModelParams, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    return GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=p.hidden_size,
        n_inner=p.intermediate_size,
        n_layer=p.num_layers,
        n_head=p.num_heads,
        n_positions=p.max_positions,
        resid_pdrop=0.0,  # no dropout: the reference forward must equal the policy's at the start
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )


ARCHITECTURES: dict[str, Callable[[ModelParams, PreTrainedTokenizerBase], PretrainedConfig]] = {
    "llama": _llama,
    "gpt2": _gpt2,
}


def build_scratch_model(params: ModelParams, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A randomly initialised causal LM of the named architecture, sized by params, in float32."""
    config = ARCHITECTURES[params.architecture](params, tokenizer)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def load_causal_lm(path: str | Path) -> PreTrainedModel:
    """A causal LM saved with save_pretrained (or a hub id), in float32."""
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def attach_lora(model: PreTrainedModel, lora: LoraParams) -> PeftModel:
    """A trainable LoRA adapter on a frozen model; with the adapter disabled it is the model itself."""
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def load_aligned_policy(base: str | Path, stage: str | Path) -> PreTrainedModel:
    """A stage's policy as plain weights: its LoRA adapter folded into the base, or its full weights."""
    stage = Path(stage)
    if (stage / "adapter_config.json").exists():
        return PeftModel.from_pretrained(load_causal_lm(base), str(stage)).merge_and_unload()
    return load_causal_lm(stage)
