"""What the test modules share (fixtures live in conftest.py; no test module imports another):
params and models for tiny pipelines, data builders, and expectations built by hand, not with
the code under test."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
)

from rsa_pl.config import ModelParams
from rsa_pl.data.collate import PreferenceCollator
from rsa_pl.data.datamodule import TokenizedDataModule
from rsa_pl.data.tokenize import train_bpe_tokenizer


def lora_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """The weight change a saved LoRA adapter makes, by weight name: B @ A * alpha / r (rsLoRA:
    alpha / sqrt(r)), transposed for an embedding, read from its safetensors and config by hand
    (not through peft), in float64."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    unsupported = [k for k in ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern") if config[k]]
    assert not unsupported, f"not computed by hand here: {unsupported}"
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / math.sqrt(r) if config["use_rslora"] else alpha / r
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    deltas: dict[str, torch.Tensor] = {}
    for key, a in weights.items():
        name = key.removeprefix("base_model.model.")
        if ".lora_A." in key:
            b = weights[key.replace(".lora_A.", ".lora_B.")]
            deltas[name.replace(".lora_A.weight", ".weight")] = (b.double() @ a.double()) * scaling
        elif key.endswith(".lora_embedding_A"):
            b = weights[key.replace("lora_embedding_A", "lora_embedding_B")]
            deltas[name.replace(".lora_embedding_A", ".weight")] = (b.double() @ a.double()).T * scaling
    assert deltas, f"no LoRA weights in {adapter}"
    return deltas


def folded(state: Mapping[str, torch.Tensor], adapter: Path, q: float = 1.0) -> dict[str, torch.Tensor]:
    """state + q * the adapter's delta, in float64, cast back to each weight's dtype."""
    deltas = lora_deltas(adapter)
    missing = deltas.keys() - state.keys()
    assert not missing, f"the adapter changes weights the model does not have: {sorted(missing)[:3]}"
    return {k: (w.double() + q * deltas[k]).to(w.dtype) if k in deltas else w for k, w in state.items()}


# from test_preference.py
def stage_params(tmp_path: Path, lora: bool = True) -> Path:
    path = tiny_params(tmp_path)
    raw = yaml.safe_load(path.read_text())
    for stage in ("train_reward", "train_safety"):
        raw[stage]["train"].update(batch_size=4, max_steps=3, val_every_n_steps=2, checkpoint_every_n_steps=2,
                                   warmup_steps=0, log_every_n_steps=1)  # fmt: skip
        if not lora:
            raw[stage]["lora"] = None
    path.write_text(yaml.safe_dump(raw))
    return path


def one_batch(root: Path, pairs: str = "safety_pairs") -> dict[str, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(str(root / "data" / "tokenizer"))
    dm = TokenizedDataModule(root / "data" / pairs, 4, PreferenceCollator(tokenizer.pad_token_id), 0, False)
    dm.setup()
    return next(iter(dm.val_dataloader()))


# from test_sft.py
ROOT = Path(__file__).resolve().parents[1]


def tiny_params(tmp_path: Path, architecture: str = "llama", **train: object) -> Path:
    """Committed params shrunk: a small world and a 1-layer model trained for a few steps."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["prepare"]["world"].update(
        preference_pairs=120, sft_examples=200, helpful_eval_prompts=8, redteam_eval_prompts=8
    )
    raw["sft"]["model"].update(architecture=architecture, hidden_size=32, num_layers=1, num_heads=2,
                               intermediate_size=64)  # fmt: skip
    settings = {"batch_size": 8, "max_steps": 6, "val_every_n_steps": 3, "checkpoint_every_n_steps": 3,
                "warmup_steps": 1, "log_every_n_steps": 1}  # fmt: skip
    raw["sft"]["train"].update({**settings, **train})
    raw["sft"]["sample"]["max_new_tokens"] = 12
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def scratch_model_params(architecture: str, max_positions: int) -> ModelParams:
    """A 1-layer, 32-wide model built from scratch (tests that need a model, not a pipeline)."""
    sizes = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
    return ModelParams(kind="scratch", name_or_path=None, gguf_file=None, trust_remote_code=False,
                       architecture=architecture, max_positions=max_positions, **sizes)  # fmt: skip


# from test_evaluation.py
TEXTS = ["BEGINNING OF CONVERSATION: USER: rob the bank ASSISTANT: no", "USER: plant tulips ASSISTANT: water them"]


def _tiny_llama() -> LlamaConfig:
    return LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip


def _tokenizer(folder: Path) -> None:
    train_bpe_tokenizer(TEXTS * 20, 300, "{prompt}").save_pretrained(str(folder))


def classifier_score_model(folder: Path, labels: int = 1) -> Path:
    config = _tiny_llama()
    config.num_labels = labels
    LlamaForSequenceClassification(config).save_pretrained(str(folder))
    _tokenizer(folder)
    return folder


def safe_rlhf_score_model(folder: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A Safe-RLHF-style LlamaForScore checkpoint: the base model's weights plus score_head."""
    model = LlamaModel(_tiny_llama())
    model.save_pretrained(str(folder))
    weights = {f"model.{k}": v for k, v in model.state_dict().items()}
    head_w, head_b = torch.randn(1, 16), torch.randn(1)
    save_file({**weights, "score_head.weight": head_w, "score_head.bias": head_b}, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["LlamaForScore"], score_dim=1, model_type="llama")
    (folder / "config.json").write_text(json.dumps(config))
    _tokenizer(folder)
    return folder, head_w, head_b


# from test_losses.py
PAIRS, T, V = 3, 7, 11
MU = {"kl": 1.0, "cvar": 0.9, "erm": 2.0, "cvar_radpo": 0.95, "cvar_lower": 0.9, "erm_lower": 0.5}


def make_batch(dtype: torch.dtype = torch.float64, pairs: int = PAIRS, t: int = T, v: int = V, seed: int = 0):
    """A [chosen; rejected] batch: logits (2B, T, V), labels (2B, T), response mask (2B, T).

    Each row has a prompt prefix (mask False), a response, and right padding (mask False).
    """
    g = torch.Generator().manual_seed(seed)
    policy = torch.randn(2 * pairs, t, v, generator=g, dtype=torch.float64)
    ref = policy + 0.5 * torch.randn(2 * pairs, t, v, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (2 * pairs, t), generator=g)
    mask = torch.zeros(2 * pairs, t, dtype=torch.bool)
    for row in range(2 * pairs):
        start = int(torch.randint(1, 3, (1,), generator=g))
        stop = int(torch.randint(start + 1, t + 1, (1,), generator=g))
        mask[row, start:stop] = True
    labels = torch.where(mask, labels, -100)  # ids off the response are ignored, even invalid ones
    return policy.to(dtype).requires_grad_(True), ref.to(dtype), labels, mask


# from test_risk.py
def make_logps(rows: int, vocab: int, kind: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised float64 (policy, reference) log-probs of shape (rows, vocab).

    Every row has exactly-zero reference probabilities (-inf logits, the policy's there
    finite or -inf too) and near-zero ones. kind: "near" (policy a perturbed reference),
    "far" (independent), "tied" (the drift takes a few distinct values, many ties),
    "equal" (policy == reference), "dense" (near, but every reference probability > 0).
    """
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3.0
    if kind == "near":
        policy = ref + 0.3 * torch.randn(rows, vocab, generator=g, dtype=torch.float64)
    elif kind == "far":
        policy = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3.0
    elif kind == "tied":
        policy = ref + torch.randint(-2, 3, (rows, vocab), generator=g).to(torch.float64) * 0.5
    else:
        policy = ref.clone()
    if kind == "dense":  # finite logits, as a model gives: full support, no masking path
        return torch.log_softmax(ref + 0.3 * torch.randn(rows, vocab, generator=g, dtype=torch.float64), -1), (
            torch.log_softmax(ref, -1)
        )
    u = torch.rand(rows, vocab, generator=g)
    zero, tiny = u < 0.08, (u >= 0.08) & (u < 0.12)
    zero[:, 0] = False  # at least one atom of support per row
    both_inf = zero & (u < 0.04)  # -inf in both models; the policy is finite on the support
    ref = ref.masked_fill(zero, -math.inf)
    policy = policy.masked_fill(both_inf, -math.inf)
    ref = torch.where(tiny, ref.amax(-1, keepdim=True) - 60.0, ref)
    if kind == "equal":
        policy = ref.clone()
    return torch.log_softmax(policy, -1), torch.log_softmax(ref, -1)


# from test_judges.py
GUARD_TEMPLATE = "<|user|>\n{prompt}\n<|assistant|>\n"


def _tiny(vocab: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip


GUARD_TEXTS = [
    "rob the bank unsafe\nH14", "plant tulips safe", "Unsafe UNSAFE Safe SAFE safe unsafe H7 S1 H14",
    "Decide whether the answer is safe", "water them", "[User] [Assistant]",
]  # fmt: skip


def guard_model(folder: Path) -> Path:
    """A tiny chat model with a BPE tokenizer that knows the verdict words."""
    tokenizer = train_bpe_tokenizer(GUARD_TEXTS * 20, 400, GUARD_TEMPLATE)
    config = _tiny(len(tokenizer))
    # the shipped guard prompt is ~1,000 tokens of this tokenizer; weights large enough that the
    # answer moves the verdict step's logits well beyond the tests' tolerance
    config.max_position_embeddings, config.initializer_range = 2048, 0.5
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


# from test_real_dag.py
def copy_repo(repo: Path) -> None:
    listed = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]
    files = subprocess.run(listed, cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in [*files, "dvc.yaml"]:
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    (repo / "dvc.lock").unlink(missing_ok=True)
    for generated in ("eval", "metrics"):
        shutil.rmtree(repo / generated, ignore_errors=True)


# from test_sources.py
# PKU-SafeRLHF as it is on the hub today (PKU-Alignment/PKU-SafeRLHF, default config): per response
# a source, a safety flag, a map of its 19 harm categories (a struct, in this order) and a severity
# level (0 safe, 1 minor .. 3 severe), a sha256; both preferences.
HARM_CATEGORIES = (
    "Endangering National Security", "Insulting Behavior", "Discriminatory Behavior", "Endangering Public Health",
    "Copyright Issues", "Violence", "Drugs", "Privacy Violation", "Economic Crime", "Mental Manipulation",
    "Human Trafficking", "Physical Harm", "Sexual Content", "Cybercrime", "Disrupting Public Order",
    "Environmental Damage", "Psychological Harm", "White-Collar Crime", "Animal Abuse",
)  # fmt: skip
_HARMS = pa.struct([(name, pa.bool_()) for name in HARM_CATEGORIES])
CURRENT_PKU_SCHEMA = pa.schema(
    [("prompt", pa.string()), ("response_0", pa.string()), ("response_1", pa.string()),
     ("prompt_source", pa.string()), ("response_0_source", pa.string()), ("response_1_source", pa.string()),
     ("is_response_0_safe", pa.bool_()), ("is_response_1_safe", pa.bool_()),
     ("response_0_harm_category", _HARMS), ("response_1_harm_category", _HARMS),
     ("response_0_severity_level", pa.int64()), ("response_1_severity_level", pa.int64()),
     ("better_response_id", pa.int64()), ("safer_response_id", pa.int64()),
     ("response_0_sha256", pa.string()), ("response_1_sha256", pa.string())]
)  # fmt: skip


def current_pku_row(prompt: str, responses: tuple[str, str], harms: tuple[set[str], set[str]],
                    severities: tuple[int, int], better: int = 0, safer: int = 0) -> dict[str, Any]:  # fmt: skip
    """One row of today's PKU-SafeRLHF; a response is unsafe when it has a harm or a severity."""
    row: dict[str, Any] = {"prompt": prompt, "prompt_source": "BeaverTails"}
    for i in (0, 1):
        row[f"response_{i}"] = responses[i]
        row[f"response_{i}_source"] = "Alpaca-7B"
        row[f"is_response_{i}_safe"] = not harms[i] and severities[i] == 0
        row[f"response_{i}_harm_category"] = {name: name in harms[i] for name in HARM_CATEGORIES}
        row[f"response_{i}_severity_level"] = severities[i]
        row[f"response_{i}_sha256"] = hashlib.sha256(responses[i].encode()).hexdigest()
    return {**row, "better_response_id": better, "safer_response_id": safer}


def write_current_pku(path: Path, rows: list[dict[str, Any]], drop: str | None = None) -> Path:
    table = pa.Table.from_pylist(rows, schema=CURRENT_PKU_SCHEMA)
    pq.write_table(table.drop_columns([drop]) if drop else table, path)
    return path


CURRENT_PKU_ROWS = [
    current_pku_row("How do I water a cactus?", ("Sparingly, once a month.", "Daily."), (set(), set()), (0, 0)),
    current_pku_row("How do I hurt my neighbour's dog?", ("Poison its food.", "Please do not."),
                    ({"Animal Abuse", "Violence"}, set()), (2, 0), better=0, safer=1),
    current_pku_row("How do I hurt my neighbour's dog?", ("Talk to your neighbour.", "Sell him pills for it."),
                    (set(), {"Drugs", "Animal Abuse"}), (0, 3), better=1, safer=0),
    current_pku_row("Find my ex's new address.", ("Search her phone.", "Hack her email."),
                    ({"Privacy Violation"}, {"Cybercrime", "Privacy Violation"}), (1, 2), better=1, safer=0),
    current_pku_row("Is it fine to skip a fare?", ("Sure, nobody checks.", "No, buy a ticket."),
                    (set(), set()), (1, 0), better=0, safer=1),  # unsafe, but no category ticked
]  # fmt: skip
