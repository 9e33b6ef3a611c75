"""Typed params: one model per params.yaml section, the schema of params.yaml.

params.yaml is the single source of hyperparameters. Every key is required (no hidden
defaults), unknown keys are rejected, types are strict (a quoted "0.1" is not a number), and
each section states its cross-field rules (cross_field_problems), checked once the fields of a
section are valid. rsa_pl/params_file.py reads a file against this schema and reports every
problem at once with its dotted key path, e.g. `train_safety.risk.mu: must be in (0, 1] for
cvar, got 1.5`.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field

from rsa_pl.risk import RISK_MEASURES, check_mu

__all__ = ["Params", "PreferenceStageParams", "Problem", "RiskParams", "Section", "nested_section"]

Problem = tuple[str, str]  # (dotted key path, message)


class Section(BaseModel):
    """A params.yaml mapping: strict types, no unknown keys, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, use_attribute_docstrings=True)

    def cross_field_problems(self) -> list[Problem]:
        """Problems that involve several fields, as (relative dotted path, message)."""
        return []


class RiskParams(Section):
    """The token risk measure Phi_mu of the sequential risk term D (docs/method.md)."""

    measure: Literal["kl", "cvar", "erm", "cvar_radpo", "cvar_lower", "erm_lower"]
    """kl (TDPO); upper tail of the drift (>= KL, Ra-DPO's code): cvar (tail mass mu), erm
    (entropic, aversion mu), cvar_radpo (Ra-DPO's estimator); lower tail (<= KL, the paper's
    printed formulas): cvar_lower (tail mass mu), erm_lower (aversion mu)."""
    mu: float
    """cvar, cvar_lower, cvar_radpo: in (0, 1] (smaller = more risk-averse); erm: > 0 (larger =
    more averse); erm_lower: in (0, 1] (larger = more averse; above 1 it could reward drift); kl: ignored."""

    def cross_field_problems(self) -> list[Problem]:
        problem = check_mu(self.measure, self.mu)
        return [("mu", problem)] if problem else []


# Which risk measures each loss name admits; DPO has no risk term (alpha must be 0).
LOSS_MEASURES: dict[str, tuple[str, ...]] = {
    "dpo": tuple(RISK_MEASURES),
    "tdpo": ("kl",),
    "rsa": ("cvar", "erm", "cvar_radpo", "cvar_lower", "erm_lower"),
}


class LoraParams(Section):
    """LoRA adapters through peft."""

    r: Annotated[int, Field(ge=1)]
    """Rank of the adapter matrices."""
    alpha: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    """Scaling: the adapter's delta is (alpha / r) B A."""
    dropout: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]
    """Dropout on the adapter's input (0: the policy is deterministic in training)."""
    target_modules: Annotated[list[str], Field(min_length=1)]
    """Module names to adapt, e.g. q_proj, k_proj, v_proj, o_proj (Llama) or c_attn (GPT-2)."""


class QuantizationParams(Section):
    """QLoRA: the frozen base weights loaded in 4 bits through bitsandbytes, LoRA adapters on top."""

    bits: Literal[4]
    """Weight bits of the frozen base (4: the only width bitsandbytes trains through)."""
    quant_type: Literal["nf4", "fp4"]
    """nf4 (NormalFloat, QLoRA's choice) or fp4."""
    double_quant: bool
    """Quantize the quantization constants too (about 0.4 bits per weight saved)."""
    compute_dtype: Literal["float32", "bfloat16", "float16"]
    """The dtype of the dequantized matmuls: float32 on CPU, bfloat16 on recent GPUs."""


class PreferenceStageParams(Section):
    """A preference stage (train_reward: helpfulness, train_safety: safety): objective and training."""

    pairs: Literal["helpful", "safety"]
    """The preference set this stage trains on (data/helpful_pairs or data/safety_pairs):
    helpful in train_reward and safety in train_safety; swap them for the reverse order
    (safety first, docs/method.md "Stepwise alignment")."""
    loss: Literal["dpo", "tdpo", "rsa"]
    """dpo (alpha = 0), tdpo (measure kl), or rsa (measure cvar, erm, cvar_radpo, cvar_lower or erm_lower)."""
    beta: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    """Temperature: beta_1 for stage 1; beta_2 = beta / lambda for stage 2 (smaller = stronger realignment)."""
    alpha: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    """Weight of the risk term; 0 for dpo, > 0 for tdpo and rsa."""
    variant: Literal[1, 2]
    """2: stop-gradient through D(y_w) (TDPO2, RSA Eq. 15); 1: no stop-gradient (TDPO1 at alpha = 1)."""
    risk: RiskParams | None
    """The risk measure of D; null skips it (dpo only). With dpo it is computed and logged, not optimised."""
    lora: LoraParams | None
    """LoRA adapters (reference = the same model with adapters disabled); null: full fine-tuning
    (reference = a frozen copy)."""
    quantization: QuantizationParams | None
    """4-bit base weights (QLoRA, needs lora); null: the base in the training precision. In
    train_safety the stage-1 adapter stays a frozen adapter over the 4-bit base, under the new one."""
    train: TrainParams

    def cross_field_problems(self) -> list[Problem]:
        problems: list[Problem] = []
        if self.loss == "dpo" and self.alpha != 0:
            problems.append(("alpha", f"must be 0 for loss dpo (DPO has no risk term), got {self.alpha}"))
        if self.loss != "dpo" and self.alpha == 0:
            problems.append(("alpha", f"must be > 0 for loss {self.loss} (alpha = 0 is loss dpo)"))
        if self.loss != "dpo" and self.risk is None:
            problems.append(("risk", f"required for loss {self.loss}: a mapping with measure and mu"))
        if self.quantization is not None and self.lora is None:
            problems.append(("quantization", "needs lora: 4-bit weights are frozen, only adapters train (QLoRA)"))
        if self.quantization is not None and self.train.strategy == "fsdp":
            problems.append(("train.strategy", "fsdp cannot shard 4-bit weights (torch's FSDP flattens no integer "
                             "tensors): use ddp with quantization, or quantization: null"))  # fmt: skip
        if self.risk is not None:
            allowed = LOSS_MEASURES[self.loss]
            if self.risk.measure not in allowed:
                problems.append(
                    (
                        "risk.measure",
                        f"must be one of {', '.join(allowed)} for loss {self.loss}, got {self.risk.measure!r}",
                    )
                )
        return problems

    def objective(self) -> dict[str, Any]:
        """Keyword arguments of rsa_pl.losses.preference_loss_from_logits."""
        return {
            "beta": self.beta,
            "alpha": self.alpha,
            "variant": self.variant,
            "measure": self.risk.measure if self.risk else None,
            "mu": self.risk.mu if self.risk else 1.0,
        }


Probability = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]


class HarmfulBehaviour(Section):
    """How the world's SFT-like policy answers a harmful prompt (the rest of the mass complies)."""

    refuse: Probability
    """Refuses (sometimes followed by a redirection)."""
    redirect: Probability
    """Redirects to safe advice without refusing."""
    filler: Probability
    """A compliant answer opens with a filler sentence."""
    severe_step: Probability
    """A harmful step is moderate (severity 2) rather than mild (1)."""
    catastrophe: Probability
    """After a harmful step, the rare catastrophic continuation (severity 3) follows; once at most."""
    max_steps: PositiveInt
    """A compliant answer has 1..max_steps harmful steps."""

    def cross_field_problems(self) -> list[Problem]:
        if self.refuse + self.redirect > 1:
            return [("redirect", f"refuse + redirect must be <= 1, got {self.refuse + self.redirect}")]
        return []


class BenignBehaviour(Section):
    """How the world's SFT-like policy answers a benign prompt."""

    needless_refusal: Probability
    """Refuses a benign prompt (exaggerated safety)."""
    filler: Probability
    """Opens with a filler sentence."""
    off_topic: Probability
    """Inserts one helpful step of another topic (irrelevant)."""
    max_steps: PositiveInt
    """A helpful answer gives the first 1..max_steps steps of the topic."""


class RewardParams(Section):
    """The oracle's helpfulness reward (rsa_pl/world/oracle.py states the formula)."""

    step: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    """Value of the first relevant step."""
    decay: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
    """Each further distinct relevant step is worth decay times the previous one."""
    refusal_benign: float
    """Reward of a refusal of a benign prompt."""
    refusal_harmful: float
    """Reward of a refusal of a harmful prompt."""
    redirect_benign: float
    """Reward of a redirection of a benign prompt."""
    redirect_harmful: float
    """Reward of a redirection of a harmful prompt."""
    filler: float
    """Per irrelevant sentence (filler, off-topic or repeated step)."""
    unparseable: float
    """Per span the oracle cannot parse (malformed text)."""
    catastrophe_helpful: bool
    """Does a catastrophic step count as a relevant (helpful) step of a harmful prompt, as every
    other harmful step does (PKU-SafeRLHF's labels: compliance is helpful)? false: it adds its cost
    and no reward (configs/sharp.yaml's world)."""


class LabelParams(Section):
    """Bradley-Terry preference labels on the oracle's reward and cost, plus label noise."""

    reward_temperature: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    """Temperature of the Bradley-Terry draw of the helpfulness label from the reward difference."""
    cost_temperature: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    """Temperature of the draw of the safety label from the cost difference."""
    noise: Annotated[float, Field(ge=0, lt=0.5, allow_inf_nan=False)]
    """Probability of flipping each label after the Bradley-Terry draw."""


class WorldParams(Section):
    """The embedded safety world: sizes, behaviour, oracle and labels (docs/world.md)."""

    preference_pairs: PositiveInt
    """Preference rows (two candidates per training prompt draw), before rejects."""
    sft_examples: PositiveInt
    """SFT examples (prompt + the SFT-like policy's answer) for the base model."""
    helpful_eval_prompts: PositiveInt
    """Held-out benign prompts (SACPO used 129)."""
    redteam_eval_prompts: Annotated[int, Field(ge=8)]
    """Held-out red-team prompts, spread evenly over the 8 categories (SACPO used 83)."""
    harmful_fraction: Annotated[float, Field(gt=0, le=0.6, allow_inf_nan=False)]
    """Share of harmful prompts among training draws (benign prompts stay >= 40%)."""
    harmful: HarmfulBehaviour
    benign: BenignBehaviour
    cost_weights: Annotated[list[Annotated[float, Field(ge=0, allow_inf_nan=False)]], Field(min_length=3, max_length=3)]
    """Cost of a harmful step of severity 1, 2, 3 (catastrophic)."""
    reward: RewardParams
    labels: LabelParams

    def cross_field_problems(self) -> list[Problem]:
        w = self.cost_weights
        if not (0 < w[0] <= w[1] <= w[2]):
            return [("cost_weights", f"must be positive and non-decreasing by severity, got {w}")]
        return []


class SourceParams(Section):
    """Where the preference data comes from."""

    kind: Literal["embedded", "pku_saferlhf", "hh", "jsonl", "prompts"]
    """embedded: the built-in world; pku_saferlhf / hh / jsonl: a real preference dataset; prompts:
    prompts alone (a prompt column, optional category and harmful), whose pairs the pairs stage
    makes on-policy with a judge."""
    path: str | None
    """A local file or folder (parquet, json, jsonl, arrow, save_to_disk) or a hub id; null for embedded."""
    split: str
    """The split to read from a hub id or a saved DatasetDict."""


class TokenizerParams(Section):
    """The tokenizer: trained on the world's corpus, or a model's own."""

    kind: Literal["train_bpe", "pretrained"]
    """train_bpe: a byte-level BPE trained on the data (embedded); pretrained: the base model's own."""
    vocab_size: Annotated[int, Field(ge=300)] | None
    """train_bpe: vocabulary size of the byte-level BPE (>= 256 bytes + special tokens)."""
    name_or_path: str | None
    """pretrained: the model whose tokenizer to use (hub id or local folder)."""
    gguf_file: str | None
    """pretrained: read the tokenizer from this GGUF file in name_or_path (needs the gguf package)."""
    trust_remote_code: bool
    """pretrained: run the tokenizer's own Python code if its config names some (auto_map).
    Off: such a tokenizer is refused in one line. Turn on only for code you have read."""

    def cross_field_problems(self) -> list[Problem]:
        if self.kind == "train_bpe" and self.vocab_size is None:
            return [("vocab_size", "required for kind train_bpe")]
        if self.kind == "pretrained" and not self.name_or_path:
            return [("name_or_path", "required for kind pretrained")]
        return []


class PrepareParams(Section):
    """The prepare stage: data source, the embedded world, tokenization and truncation."""

    seed: int
    """Seeds the world's generation and the splits."""
    source: SourceParams
    world: WorldParams | None
    tokenizer: TokenizerParams
    prompt_format: Literal["chat", "plain"]
    """chat: the tokenizer's chat template (a tokenizer without one is an error); the response
    ends with the template's end-of-turn token, which becomes the saved tokenizer's EOS so that
    generation stops there. plain: prompt_template, even if the tokenizer has a chat template;
    the response ends with EOS."""
    system_prompt: str | None
    """chat: the system message of every prompt; null: none, and a system prompt the template
    adds on its own when there is none (SmolLM2, Qwen2.5) is left out too. plain: must be null
    (write it into prompt_template)."""
    prompt_template: str
    """plain: the prompt's text, {prompt} inside (SACPO's is the default); train_bpe: also the
    trained tokenizer's chat template."""
    max_length: PositiveInt
    """Prompt + response tokens; the response end is cut beyond it."""
    max_prompt_length: PositiveInt
    """Rows whose prompt alone is longer (template included) are dropped."""
    eval_fraction: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]
    """Share of preference pairs and SFT examples held out for validation."""

    def cross_field_problems(self) -> list[Problem]:
        problems: list[Problem] = []
        if "{prompt}" not in self.prompt_template:
            problems.append(("prompt_template", "must contain {prompt}"))
        if self.prompt_format == "plain" and self.system_prompt is not None:
            problems.append(("system_prompt", "must be null for prompt_format plain (write it into prompt_template)"))
        if self.max_prompt_length >= self.max_length:
            problems.append(("max_prompt_length", f"must be < max_length ({self.max_length})"))
        if self.source.kind == "embedded" and self.world is None:
            problems.append(("world", "required for source embedded (the world to generate)"))
        if self.source.kind == "embedded" and self.tokenizer.kind != "train_bpe":
            problems.append(("tokenizer.kind", "must be train_bpe for source embedded (the world has its own words)"))
        if self.source.kind != "embedded" and not self.source.path:
            problems.append(("source.path", f"required for source {self.source.kind}"))
        if self.source.kind != "embedded" and self.tokenizer.kind != "pretrained":
            problems.append(("tokenizer.kind", "must be pretrained for a real dataset (the model's own tokenizer)"))
        return problems


class TrainParams(Section):
    """The Lightning Trainer and optimiser of a training stage."""

    seed: int
    """Seeds data order and initialisation (lightning.seed_everything)."""
    batch_size: PositiveInt
    """Examples (SFT) or pairs (preference stages) per device and step."""
    group_by_length: bool
    """Batch examples of similar length (less padding, faster; biases batch composition)."""
    accumulate_grad_batches: PositiveInt
    """Batches per optimizer step (the effective batch is batch_size x devices x this)."""
    lr: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    """Peak learning rate of AdamW (linear warmup, then cosine decay to 0 at the last step)."""
    weight_decay: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    """AdamW decoupled weight decay (matrices only; not biases and norms)."""
    warmup_steps: Annotated[int, Field(ge=0)]
    """Linear warmup steps before the cosine decay."""
    max_epochs: PositiveInt
    """Epochs over the training set (unless max_steps stops first)."""
    max_steps: Annotated[int, Field(ge=-1)]
    """Optimizer steps; -1 runs max_epochs."""
    gradient_clip_val: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    """Clip the gradient norm to this; 0 disables clipping."""
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"]
    """32-true on CPU (bf16 matmuls are 10-100x slower there); bf16-mixed on GPUs; auto: bf16-mixed
    when training runs on a CUDA GPU with bf16 (16-mixed on one without), else 32-true."""
    val_every_n_steps: PositiveInt
    """Validation every this many training batches."""
    log_every_n_steps: PositiveInt
    """Log training metrics every this many steps."""
    checkpoint_every_n_steps: PositiveInt
    """The last checkpoint is rewritten this often into the stage's checkpoint folder."""
    strategy: Literal["auto", "ddp", "fsdp", "deepspeed_stage_2", "deepspeed_stage_3"]
    """Lightning strategy: auto, ddp (N processes, each with the whole model), fsdp (N processes
    sharding the model, its gradients and optimizer state; CPU or GPU; not with quantization),
    deepspeed_stage_2/3 (CUDA GPUs only; pip install 'rsa-pl[deepspeed]'). docs/stages.md."""
    accelerator: Literal["auto", "cpu", "gpu"]
    """cpu, gpu or auto."""
    devices: PositiveInt
    """Devices (processes under ddp / fsdp) per node."""
    num_nodes: PositiveInt
    """Nodes (multi-node ddp / fsdp: docs/cluster.md)."""
    gradient_checkpointing: bool
    """Recompute activations in backward: less memory, about 30% more time."""
    nonfinite: Literal["stop", "skip"]
    """A non-finite loss or gradient: stop (one line naming stage, step and batch; the last
    checkpoint is kept for resuming) or skip that batch's update (counted in train/skipped_batches)."""


SCRATCH_KEYS = ("architecture", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_positions")


class ModelParams(Section):
    """The base model: a tiny one trained from scratch (embedded world) or a pretrained one."""

    kind: Literal["scratch", "pretrained"]
    """scratch: a tiny model built from this section (embedded world); pretrained: name_or_path."""
    name_or_path: str | None
    """pretrained: hub id or local folder in Hugging Face format."""
    gguf_file: str | None
    """pretrained: a GGUF file in name_or_path (llama.cpp's format): dequantized to float32 and
    saved as safetensors by the sft stage (needs the gguf package)."""
    trust_remote_code: bool
    """pretrained: run the model's own Python code if its config names some (auto_map), in
    every stage that loads it. Off: such a model is refused in one line. Turn on only for code
    you have read."""
    architecture: Literal["llama", "gpt2"] | None
    """scratch: the transformers architecture to build from a config."""
    hidden_size: PositiveInt | None
    """Width of the model built from scratch."""
    num_layers: PositiveInt | None
    """Transformer layers."""
    num_heads: PositiveInt | None
    """Attention heads (hidden_size must divide by it)."""
    intermediate_size: PositiveInt | None
    """Width of the MLP."""
    max_positions: PositiveInt | None
    """Longest sequence the position embeddings cover (>= prepare.max_length)."""

    def cross_field_problems(self) -> list[Problem]:
        problems: list[Problem] = []
        if self.kind == "pretrained" and not self.name_or_path:
            problems.append(("name_or_path", "required for kind pretrained"))
        if self.kind == "scratch":
            for key in SCRATCH_KEYS:
                if getattr(self, key) is None:
                    problems.append((key, "required for kind scratch (the model to build)"))
        if self.hidden_size and self.num_heads and self.hidden_size % self.num_heads:
            problems.append(("num_heads", f"must divide hidden_size ({self.hidden_size})"))
        return problems


class SampleParams(Section):
    """How a stage samples responses to judge its policy."""

    temperature: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    """Sampling temperature of the quality check (1.0: the model's own distribution)."""
    max_new_tokens: PositiveInt
    """Longest sampled answer, in tokens."""
    seed: int
    """Seeds the sampling."""


class SftParams(Section):
    """The sft stage: the embedded base model trained on the world's SFT set, or a pretrained model."""

    model: ModelParams
    train: TrainParams | None
    """Training of a scratch base (null with a pretrained base: nothing is trained)."""
    sample: SampleParams | None
    """Held-out prompts are answered by sampling and judged by the world's oracle (embedded only;
    null otherwise)."""


class MergeParams(Section):
    """RSA(P): theta = (1 - q) theta_r + q theta_s for each q (larger q is safer)."""

    q: Annotated[list[Probability], Field(min_length=1)]
    """Mixing ratios in [0, 1]; P-SACPO used 0.25, 0.5, 0.75 (0 and 1 are the two stages)."""

    def cross_field_problems(self) -> list[Problem]:
        repeated = sorted({q for q in self.q if self.q.count(q) > 1})
        return [("q", f"each ratio once, got {', '.join(map(str, repeated))} more than once")] if repeated else []


class PairsParams(Section):
    """The pairs stage (source prompts): k answers per prompt sampled from the base, judged, and the
    best and worst kept as a pair, as Safe RLHF collected its data (other sources: nothing to do)."""

    judge: Literal["llm", "guard", "score_models"]
    """Which judge scores the answers, configured as in evaluate (evaluate.llm, evaluate.guard,
    evaluate.reward_model / cost_model)."""
    samples_per_prompt: Annotated[int, Field(ge=2)]
    """Answers sampled per prompt (k >= 2)."""
    temperature: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    """Sampling temperature."""
    max_new_tokens: PositiveInt
    """Longest answer, in tokens (an answer cut there is counted as truncated)."""
    seed: int
    """Seeds the sampling (per batch)."""
    batch_size: PositiveInt
    """Prompts x samples per generation batch."""
    chunk: PositiveInt
    """Prompts per resumable unit: a killed run keeps every finished chunk."""


class LlmJudgeParams(Section):
    """evaluate.judge llm (and the helpfulness half of guard): a judge LLM behind any
    OpenAI-compatible chat-completions server (vLLM, TGI, llama.cpp, `transformers serve`, an API)."""

    base_url: str | None
    """The server's API root, e.g. http://localhost:8000/v1."""
    model: str | None
    """The model name the server lists at /v1/models."""
    api_key_env: str | None
    """The environment variable holding the API key (the key itself is never in params or logs);
    null: no key (local servers)."""
    max_concurrency: PositiveInt
    """Requests in flight at once."""
    timeout_s: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    """Seconds one request may take before it is retried."""
    retries: NonNegativeInt
    """Retries of a request on connection errors, timeouts, rate limits (429) and 5xx, with
    exponential backoff; after them the run stops (verdicts so far are cached: a rerun resumes)."""
    temperature: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    """The judge's sampling temperature (0: greedy, reproducible verdicts)."""
    max_tokens: PositiveInt
    """Longest judge reply, in tokens (the scores are on its first line)."""
    pairwise: bool
    """Win rates from pairwise comparisons of the greedy answers with SFT's, in both A/B
    orders (SACPO's protocol); false: from the per-answer scores, like the other judges."""
    prompts: str | None
    """A folder whose pointwise.txt / pairwise_helpful.txt / pairwise_harmless.txt replace the
    shipped judge prompts (rsa_pl/evaluation/prompts/); null: the shipped ones."""


class GuardParams(Section):
    """evaluate.judge guard: a safety classifier chat model run in-process (Llama Guard / ShieldGemma style)."""

    model: str | None
    """A local folder or hub id of a chat model that answers safe / unsafe and a category."""
    format: Literal["instruction", "native"]
    """instruction: the guard prompt (rsa_pl/evaluation/prompts/guard.txt or guard.prompt) as
    one user turn in the model's chat template; native: the model's own chat template over the
    (user, assistant) conversation, as Llama Guard's template builds its prompt itself."""
    prompt: str | None
    """instruction format: a file replacing the shipped guard prompt ({prompt} and {answer} in it)."""
    severe_categories: list[str]
    """Categories whose unsafe answers count as severe (severe_rate): codes or names as the guard
    writes them (the shipped prompt's codes H1-H14; Llama Guard's S1-S14)."""
    verdict: Literal["reply", "probability"]
    """reply: the guard writes its reply (verdict, category) and the cost is read at its first
    written token; a reply without safe/unsafe is a judge failure. probability: a forced choice,
    the log-odds of unsafe vs safe as the reply's first token in one forward pass, no reply (for
    models that do not keep to the answer format; no category, so nothing is severe)."""
    rate_helpfulness: bool
    """The guard model also rates helpfulness (the reward): the expected rating 1-9 under its
    probabilities for the first token of its reply to the helpfulness prompt (G-Eval's score).
    For a local model when no reward model or llm server is at hand: a small model rates poorly."""
    helpfulness_prompt: str | None
    """rate_helpfulness: a file replacing the shipped rating prompt
    (rsa_pl/evaluation/prompts/helpfulness.txt; {prompt} and {answer} in it)."""
    max_new_tokens: PositiveInt
    """Longest guard reply (the verdict and the category), in tokens."""
    batch_size: PositiveInt
    """Answers per guard forward pass."""


class PromptSetParams(Section):
    """An evaluation prompt file: a benchmark's prompts (docs/prompt_sets.md lists the usual ones)."""

    path: str
    """A local JSONL, JSON, CSV, parquet or arrow file, a save_to_disk folder, or a hub dataset id.
    DVC tracks this param, not the file: after editing the file in place, `dvc repro -f evaluate`."""
    split: str
    """The split of a hub id or a saved DatasetDict."""
    prompt_column: str
    """The column holding the prompt text."""
    category_column: str | None
    """A column holding each prompt's category (red team: its harm category, reported per
    category); null: none (red-team metrics per category say "unknown")."""
    where: dict[str, str | int | bool]
    """Only rows whose columns equal these values, e.g. {dataset: helpful_base} (AlpacaEval's 129
    helpful-base prompts); {}: every row."""
    limit: PositiveInt | None
    """At most this many prompts: a sample seeded by evaluate.seed, kept in file order; null: all."""


class PromptSetsParams(Section):
    """evaluate's two prompt sets; a null set falls back to the validation prompts prepare set aside
    (data/eval_helpful, data/eval_redteam), classified by the prompt's own label."""

    helpful: PromptSetParams | None
    """Benign prompts (helpfulness: helpful_win_rate, reward_mean, needless_refusal_rate)."""
    redteam: PromptSetParams | None
    """Red-team prompts (harmlessness: harmless_win_rate, cost, unsafe and severe rates, the tail)."""
    fallback_limit: PositiveInt | None
    """At most this many of prepare's validation prompts in a set that falls back to them (a sample
    seeded by evaluate.seed, kept in order); null: all."""


class EvaluateParams(Section):
    """The evaluate stage: every policy answers the held-out prompts, a judge scores them."""

    judge: Literal["oracle", "score_models", "llm", "guard"]
    """oracle: the embedded world's exact judge (embedded source only); score_models:
    reward_model and cost_model; llm: a judge LLM over an OpenAI-compatible server (evaluate.llm);
    guard: a safety classifier chat model (evaluate.guard), with helpfulness from reward_model
    or from evaluate.llm if one is named. docs/method.md says what each metric means per judge."""
    reward_model: str | None
    """score_models (or guard's helpfulness): a local folder or hub id of a one-output sequence
    classifier or a Safe-RLHF score model (beaver-7b-v1.0-reward)."""
    cost_model: str | None
    """score_models: the same for the cost (beaver-7b-v1.0-cost; a positive cost means unsafe),
    or a two-label safety classifier (cost = log-odds of its unsafe label)."""
    score_format: Literal["auto", "safe_rlhf", "chat", "plain"]
    """How a score model sees (prompt, answer), whatever the policy's template: safe_rlhf
    ("BEGINNING OF CONVERSATION: USER: ... ASSISTANT:..."), chat (the score model's own chat
    template), plain (prompt, blank line, answer); auto: safe_rlhf for LlamaForScore, else chat
    when the score model's tokenizer has a template, else plain."""
    severe_cost: Annotated[float, Field(allow_inf_nan=False)]
    """score_models: an answer whose cost is at least this counts as severe (severe_rate); set it
    for your cost model's scale (the llm and guard judges have their own rule, docs/method.md)."""
    llm: LlmJudgeParams
    """The judge LLM server (judge llm, or guard's helpfulness)."""
    guard: GuardParams
    """The safety classifier (judge guard)."""
    refusal: Literal["patterns", "judge", "either"]
    """Refusal detection on real data (needless_refusal_rate): patterns (the phrase rules of
    rsa_pl/evaluation/prompts/refusal_patterns.txt or refusal_patterns), judge (the llm judge's
    refusal field; judge llm), either; the oracle always uses the embedded world's exact refusals."""
    refusal_patterns: str | None
    """A file of refusal rules (one regular expression a line, # comments) replacing the shipped ones."""
    prompt_sets: PromptSetsParams
    """The prompts every policy answers (files, or prepare's validation prompts)."""
    samples_per_prompt: PositiveInt
    """Sampled answers per prompt (besides the greedy one): the tail only shows in samples."""
    temperature: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    """Sampling temperature of the sampled answers (greedy answers are also generated)."""
    max_new_tokens: PositiveInt
    """Longest answer, in tokens."""
    seed: int
    """Seeds the sampling (per batch: results do not depend on what ran before)."""
    tail_levels: Annotated[list[Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]], Field(min_length=1)]
    """CVaR of the cost over all sampled red-team answers at these upper-tail fractions (0.1: worst 10%)."""
    policies: Annotated[list[str], Field(min_length=1)] | None
    """The policies to evaluate and report (sft, reward, safety, q0_5, ...); null: every one. SFT's
    greedy answers are made either way (the win rates' baseline), its samples only when listed:
    an experiment that needs only the stage-2 policy evaluates just that."""
    batch_size: PositiveInt
    """Prompts x samples per generation batch."""
    device: Literal["auto", "cpu", "cuda"]
    """Where policies and in-process judges (score models, guard) run: auto is the GPU when torch
    sees one, else the CPU; cuda without one is an error."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"]
    """Their weights' dtype: auto is bfloat16 on a GPU (float16 without bf16) and float32 on the CPU.
    Log-probabilities (kl_to_sft) are always taken in float32 from the logits."""
    trust_remote_code: bool
    """score_models and guard: run the judge models' own Python code if their configs name some
    (auto_map). Off: such a model is refused in one line."""

    def cross_field_problems(self) -> list[Problem]:
        problems: list[Problem] = []
        if self.judge == "score_models":
            for key in ("reward_model", "cost_model"):
                if getattr(self, key) is None:
                    problems.append((key, "required for judge score_models: a score model folder or hub id"))
        if self.judge == "llm":
            for key in ("base_url", "model"):
                if getattr(self.llm, key) is None:
                    problems.append((f"llm.{key}", "required for judge llm"))
        if self.judge == "guard":
            if self.guard.model is None:
                problems.append(("guard.model", "required for judge guard: a chat model folder or hub id"))
            sources = [name for name, named in (("reward_model", self.reward_model is not None),
                       ("llm.base_url", self.llm.base_url is not None),
                       ("guard.rate_helpfulness", self.guard.rate_helpfulness)) if named]  # fmt: skip
            if len(sources) > 1:
                problems.append((sources[0], f"judge guard takes helpfulness from one of reward_model, llm or "
                                             f"guard.rate_helpfulness; got {' and '.join(sources)}"))  # fmt: skip
            if self.llm.base_url is not None and self.llm.model is None:
                problems.append(("llm.model", "required when llm.base_url is set"))
        if self.refusal != "patterns" and self.judge != "llm":
            problems.append(("refusal", f"{self.refusal} needs the llm judge's refusal field (judge: llm)"))
        return problems


class Params(Section):
    """All of params.yaml: one field per pipeline stage that exists so far."""

    prepare: PrepareParams
    """Builds the data: the embedded world or a real dataset, tokenized."""
    sft: SftParams
    """The base model (trained from scratch for the embedded world)."""
    pairs: PairsParams
    """On-policy preference pairs from prompts alone (source prompts)."""
    train_reward: PreferenceStageParams
    """Stage 1, reward (helpfulness) alignment; reference = the SFT model."""
    train_safety: PreferenceStageParams
    """Stage 2, safety realignment; reference = the stage-1 policy."""
    merge: MergeParams
    """RSA(P) weight averaging of the two stages' policies."""
    evaluate: EvaluateParams
    """Generation with every policy, judging, metrics and plots."""

    def cross_field_problems(self) -> list[Problem]:
        """Conflicts between sections, caught before anything trains."""
        problems: list[Problem] = []
        source = self.prepare.source.kind
        if self.sft.model.kind == "scratch":
            for key in ("train", "sample"):
                if getattr(self.sft, key) is None:
                    problems.append((f"sft.{key}", "required for a scratch base (sft.model.kind: scratch)"))
        if self.sft.model.kind == "scratch" and source != "embedded":
            problems.append(("sft.model.kind", f"scratch trains on the embedded world's SFT set; a {source} source "
                                               "needs a pretrained base (kind: pretrained)"))  # fmt: skip
        if self.evaluate.judge == "oracle" and source != "embedded":
            problems.append(("evaluate.judge", f"oracle judges the embedded world only; use llm, guard or "
                                               f"score_models for {source}"))  # fmt: skip
        return problems


def nested_section(annotation: Any) -> type[Section] | None:
    """The Section class a field holds (directly or as `Section | None`), else None."""
    candidates = (
        list(get_args(annotation)) if get_origin(annotation) in (typing.Union, types.UnionType) else [annotation]
    )
    nested = [c for c in candidates if isinstance(c, type) and issubclass(c, Section)]
    return nested[0] if nested else None
