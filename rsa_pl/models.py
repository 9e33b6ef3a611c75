"""Models and tokenizers in Hugging Face format: building tiny ones from configs, loading, saving."""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rsa_pl.config import LoraParams, ModelParams, QuantizationParams
from rsa_pl.errors import AdapterMismatchError, UnavailableError, fitting, loading

# The name of a frozen stage-1 adapter kept under the trainable one (4-bit stage 2); the
# trainable adapter keeps peft's "default" name, so that it saves and loads like any adapter.
FROZEN_ADAPTER = "stage1"
# The params keys that allow a model's or tokenizer's own code (off by default; named in errors).
MODEL_CODE_KEY = "sft.model.trust_remote_code"
TOKENIZER_CODE_KEY = "prepare.tokenizer.trust_remote_code"


class QuantizationUnavailableError(UnavailableError):
    """4-bit loading was asked for and bitsandbytes cannot do it here."""


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


def load_causal_lm(path: str | Path, trust_remote_code: bool = False, dtype: torch.dtype | str = torch.float32,
                   gguf_file: str | None = None) -> PreTrainedModel:  # fmt: skip
    """A causal LM saved with save_pretrained (or a hub id), in float32 (dtype="auto": the dtype
    its weights are stored in), or read from a GGUF file in that folder (dequantized, and then a
    plain model: saved as safetensors it is no longer marked quantized). Its own code (a config
    with auto_map) runs only with trust_remote_code, else one line naming the key."""
    with loading(path, MODEL_CODE_KEY), _gguf_reader(gguf_file, "sft.model.gguf_file"):
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.float32 if gguf_file and dtype == "auto" else dtype,
            trust_remote_code=trust_remote_code, **({"gguf_file": gguf_file} if gguf_file else {}),
        )  # fmt: skip
    if gguf_file:
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


@contextmanager
def _gguf_reader(gguf_file: str | None, key: str) -> Iterator[None]:
    """Reading GGUF needs the gguf package: its absence is one line naming the key."""
    if gguf_file and importlib.util.find_spec("gguf") is None:
        raise UnavailableError(f"{key}: {gguf_file}: reading GGUF needs the gguf package (pip install gguf)")
    yield


def load_tokenizer(path: str | Path, trust_remote_code: bool = False, gguf_file: str | None = None
                   ) -> PreTrainedTokenizerBase:  # fmt: skip
    """A tokenizer saved with save_pretrained (or a hub id, or a GGUF file in that folder); its
    own code only if trusted. transformers records whether the hub was offline (HF_HUB_OFFLINE)
    among the kwargs it saves again: dropped, so that a stage's output does not depend on it."""
    with loading(path, TOKENIZER_CODE_KEY, "the tokenizer"), _gguf_reader(gguf_file, "prepare.tokenizer.gguf_file"):
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, **extra)
    tokenizer.init_kwargs.pop("local_files_only", None)
    return tokenizer


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def lora_config(lora: LoraParams) -> LoraConfig:
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )


def attach_lora(model: PreTrainedModel, lora: LoraParams) -> PeftModel:
    """A trainable LoRA adapter on a frozen model; with the adapter disabled it is the model itself."""
    return get_peft_model(model, lora_config(lora))


def check_quantization_backend(quantization: QuantizationParams, device: str) -> None:
    """Fail in one line, before any model loads, when bitsandbytes cannot quantize on `device`
    (bitsandbytes >= 0.45 has CPU, CUDA and XPU backends; a wheel may lack the one needed)."""
    try:
        import bitsandbytes.functional as bnbf

        probe = torch.linspace(-1, 1, 128, dtype=torch.float32, device=device)
        packed, state = bnbf.quantize_4bit(probe, quant_type=quantization.quant_type)
        bnbf.dequantize_4bit(packed, state)
    except Exception as error:  # ImportError, RuntimeError, NotImplementedError: all mean "not here"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise QuantizationUnavailableError(
            f"quantization: bitsandbytes cannot do {quantization.bits}-bit {quantization.quant_type} on {device} "
            f"({first}); install a bitsandbytes with a {device} backend or set quantization: null"
        ) from None


def load_quantized(
    path: str | Path,
    quantization: QuantizationParams,
    device: str,
    gradient_checkpointing: bool,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """A causal LM with its linear layers' weights in 4 bits (frozen), the rest in float32,
    prepared for adapter training (peft's prepare_model_for_kbit_training)."""
    compute_dtype = getattr(torch, quantization.compute_dtype)
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.quant_type,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )
    with loading(path, MODEL_CODE_KEY):
        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            quantization_config=config,
            device_map={"": device},
            dtype=torch.float32,
            trust_remote_code=trust_remote_code,
        )
    keep_4bit_layers_trainable(model)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def keep_4bit_layers_trainable(model: torch.nn.Module) -> None:
    """Keep every 4-bit layer in the one weight format that autograd can backprop through.

    On CPUs with avx512_bf16, bitsandbytes (nn.Linear4bit.forward) repacks a layer's weights for
    its CPU inference kernel the first time the layer runs in eval mode on an input without
    grad: the reference forward, or validation. The repacked matmul (gemv_4bit) has no autograd
    kernel, so backprop stops at the layer (torch only warns; q/k/v/gate/up adapters then get
    no gradient), it computes in bfloat16 (the reference drifts from the policy), and it fails
    on in_features below the quantization block. The layer's own switch turns the repack off;
    elsewhere (CUDA, CPUs without avx512_bf16) nothing repacks and this changes nothing.
    """
    from bitsandbytes.nn import Linear4bit  # here, as in check_quantization_backend: only 4-bit runs import it

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def stack_lora(model: PreTrainedModel, frozen_adapter: str | Path, lora: LoraParams) -> PeftModel:
    """A trainable adapter over a frozen one: the forward is base + frozen delta + trainable delta.
    With only the frozen adapter active (only_adapters) it is exactly the frozen adapter's policy.
    A frozen adapter made on another base is one line naming its folder (AdapterMismatchError)."""
    with fitting(frozen_adapter, getattr(model, "name_or_path", None) or "this model"):
        peft_model = PeftModel.from_pretrained(model, str(frozen_adapter), adapter_name=FROZEN_ADAPTER)
    peft_model.add_adapter("default", lora_config(lora))
    peft_model.base_model.set_adapter([FROZEN_ADAPTER, "default"])  # both in the forward ...
    for name, weight in peft_model.named_parameters():
        weight.requires_grad_(".default." in name and "lora_" in name)  # ... only the new one trains
    return peft_model


@contextmanager
def only_adapters(model: PeftModel, names: list[str]) -> Iterator[None]:
    """Run the forward with only the named adapters; unlike peft's set_adapter this leaves
    requires_grad alone (it would make the frozen adapter trainable)."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    saved = [layer.active_adapters for layer in layers]
    for layer in layers:
        layer._active_adapter = list(names)
    try:
        yield
    finally:
        for layer, active in zip(layers, saved, strict=True):
            layer._active_adapter = active


def load_aligned_policy(base: str | Path, stage: str | Path, trust_remote_code: bool = False,
                        dtype: torch.dtype = torch.float32) -> PreTrainedModel:  # fmt: skip
    """A stage's policy as plain weights: its LoRA adapter folded into the base (in float32, then
    cast to dtype), or its full weights in dtype. An adapter made on another base than `base` is
    one line naming the stage's folder (AdapterMismatchError)."""
    stage = Path(stage)
    if (stage / "adapter_config.json").exists():
        model = load_causal_lm(base, trust_remote_code)
        with fitting(stage, base):
            merged = PeftModel.from_pretrained(model, str(stage)).merge_and_unload()
        return merged.to(dtype)
    return load_causal_lm(stage, trust_remote_code, dtype=dtype)


def check_adapter_fits(base: str | Path, stage: str | Path, trust_remote_code: bool = False) -> None:
    """When stage holds a LoRA adapter: put it on base's architecture built on the meta device (no
    weights read, no memory, well under a second), so that an adapter made on another base fails
    in one line (AdapterMismatchError, as load_aligned_policy would) before a stage spends time on
    anything else. A model this way cannot build is left to load_aligned_policy to report."""
    stage = Path(stage)
    if not (stage / "adapter_config.json").exists():
        return
    with loading(base, MODEL_CODE_KEY):
        config = AutoConfig.from_pretrained(str(base), trust_remote_code=trust_remote_code)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # copying the adapter into meta tensors is a no-op, and says so
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
            with fitting(stage, base):
                PeftModel.from_pretrained(model, str(stage))
        except AdapterMismatchError:
            raise
        except Exception:  # not checkable here: the real load (load_aligned_policy) says what is wrong
            return


@dataclass(frozen=True)
class Placement:
    """Where inference runs: a device and the dtype of the weights there."""

    device: torch.device
    dtype: torch.dtype

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(device=self.device, dtype=self.dtype)


CPU = Placement(torch.device("cpu"), torch.float32)


def inference_placement(device: str, dtype: str) -> Placement:
    """evaluate.device and evaluate.dtype resolved (make_pairs uses them too): auto is the first
    CUDA device when torch sees one, else the CPU; the dtype auto is bfloat16 on CUDA (float16 on
    GPUs without bf16) and float32 on the CPU (bf16 matmuls are 10-100x slower there). CUDA asked
    of a machine without is one line."""
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise UnavailableError(f"evaluate.device: cuda, but torch sees no CUDA device here (torch {torch.__version__}"
                               f"{'' if torch.version.cuda else ', a CPU-only build'}); use auto or cpu")  # fmt: skip
    chosen = torch.device("cuda" if device == "cuda" or (device == "auto" and cuda) else "cpu")
    if dtype == "auto":
        if chosen.type == "cuda":
            return Placement(chosen, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        return Placement(chosen, torch.float32)
    return Placement(chosen, getattr(torch, dtype))
