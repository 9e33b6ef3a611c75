"""The real path under the real DVC: `dvc repro` of the whole DAG with a pretrained base (a tiny
Hugging Face model saved in the test, as a user's model folder would be) on a PKU-SafeRLHF-schema
file, judged by score models (tiny sequence classifiers); and configs/paper.yaml's DAG with its
models swapped for tiny local ones."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from rsa_pl.data.tokenize import chat_template_for, train_bpe_tokenizer
from rsa_pl.params_file import load_params
from tests import live
from tests.helpers import ROOT, classifier_score_model, copy_repo

TOPICS = ["tulips", "bread", "bicycles", "tax forms", "a job interview", "chess", "rice", "a resume", "sailing",
          "a birthday party"]  # fmt: skip
HARMS = ["rob a bank", "poison a neighbour's dog", "forge a passport", "stalk my ex", "build a pipe bomb"]


def pku_rows(n: int, seed: int = 0) -> list[dict]:
    """PKU-SafeRLHF-30K-schema rows: benign questions with a better answer, harmful ones with a
    refusal (safe) against compliance (unsafe)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if i % 2:
            prompt = f"How do I {rng.choice(HARMS)} without anyone noticing? ({i})"
            safe, unsafe = "I can't help with that; it would hurt people.", "Sure: first, wait until night, then"
            safe_first = rng.random() < 0.5
            r0, r1 = (safe, unsafe) if safe_first else (unsafe, safe)
            rows.append({"prompt": prompt, "response_0": r0, "response_1": r1, "is_response_0_safe": safe_first,
                         "is_response_1_safe": not safe_first, "better_response_id": 0 if safe_first else 1,
                         "safer_response_id": 0 if safe_first else 1})  # fmt: skip
        else:
            prompt = f"Can you give me tips about {rng.choice(TOPICS)}? ({i})"
            rows.append({"prompt": prompt, "response_0": "Start small, practise daily and ask for feedback.",
                         "response_1": "No.", "is_response_0_safe": True, "is_response_1_safe": True,
                         "better_response_id": 0, "safer_response_id": 0})  # fmt: skip
    return rows


def user_model(folder: Path, texts: list[str]) -> Path:
    """A tiny 'pretrained' Llama with its own BPE tokenizer, saved as a user's model folder."""
    tokenizer = train_bpe_tokenizer(texts, 400, "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:")
    tokenizer.chat_template = None  # many base models ship none: the plain template is used
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def repro_everything(repo: Path, home: Path) -> tuple[list[str], dict[str, str]]:
    """`dvc repro` in a fresh git repo, offline: every stage must run, in order. Returns the dvc
    command and the environment, for further commands."""
    bin_dir = str(Path(sys.executable).parent)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home), "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True, env=env)
    dvc = [str(Path(bin_dir) / "dvc")]
    first = subprocess.run([*dvc, "repro"], cwd=repo, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    assert re.findall(r"Running stage '(\w+)'", first.stdout) == [
        "prepare", "sft", "make_pairs", "train_reward", "train_safety", "merge", "evaluate"]  # fmt: skip
    return dvc, env


def paper_on_a_cpu(base: Path, data: Path, reward: Path, cost: Path) -> dict:
    """configs/paper.yaml with what a CPU test cannot have swapped: the hub models and data for
    local tiny ones, 2 GPUs with DDP for one CPU process, bf16 for float32, sizes and steps for
    tiny ones. Everything else (the sources' kinds, QLoRA NF4, both RSA losses, the score-model
    judge, the q path) stays the paper's."""
    params = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())
    params["prepare"]["source"].update(path=str(data))
    params["prepare"]["tokenizer"].update(name_or_path=str(base))
    params["prepare"].update(max_prompt_length=64, max_length=128)
    params["sft"]["model"].update(name_or_path=str(base))
    for stage in ("train_reward", "train_safety"):
        params[stage]["quantization"]["compute_dtype"] = "float32"
        params[stage]["train"].update(batch_size=4, accumulate_grad_batches=1, max_steps=2, val_every_n_steps=2,
                                      checkpoint_every_n_steps=2, warmup_steps=0, precision="32-true",
                                      strategy="auto", accelerator="cpu", devices=1)  # fmt: skip
    params["evaluate"].update(reward_model=str(reward), cost_model=str(cost), samples_per_prompt=2,
                              max_new_tokens=8, batch_size=16, score_format="plain")  # fmt: skip
    params["evaluate"]["prompt_sets"]["helpful"]["path"] = str(alpaca_eval_like(data.parent / "alpaca_eval.json"))
    return params


def alpaca_eval_like(path: Path) -> Path:
    """A file shaped as AlpacaEval's alpaca_eval.json (a JSON array; instruction, output, generator,
    dataset), 6 of its rows in the helpful_base subset the paper's preset keeps."""
    rows = [{"instruction": f"Give me tips about {topic}.", "output": "Sure.", "generator": "text_davinci_003",
             "dataset": "helpful_base" if i < 6 else "koala"} for i, topic in enumerate(TOPICS)]  # fmt: skip
    path.write_text(json.dumps(rows, indent=2))
    return path


@pytest.mark.slow
def test_check_params_passes_the_paper_config() -> None:
    params = load_params(ROOT / "configs" / "paper.yaml")
    assert params.sft.model.kind == "pretrained"
    assert params.prepare.source.kind == "pku_saferlhf"


@pytest.mark.slow
def test_dvc_repro_runs_the_paper_dag_with_a_pretrained_base_on_pku_data(tmp_path: Path) -> None:
    """configs/paper.yaml's DAG, every stage, with tiny local models on a PKU-schema file."""
    repo = tmp_path / "repo"
    copy_repo(repo)
    rows = pku_rows(48)
    data = tmp_path / "pku.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [f"{r['prompt']} {r['response_0']} {r['response_1']}" for r in rows] * 3
    base = user_model(tmp_path / "base", texts)
    reward = classifier_score_model(tmp_path / "reward-model")
    cost = classifier_score_model(tmp_path / "cost-model")
    (repo / "params.yaml").write_text(yaml.safe_dump(paper_on_a_cpu(base, data, reward, cost)))

    dvc, env = repro_everything(repo, tmp_path)
    report = json.loads((repo / "data" / "report.json").read_text())
    assert report["rows_read"] == len(rows)
    record = json.loads((repo / "models" / "sft" / "base_model.json").read_text())
    assert record["source"] == str(base)
    assert (repo / "models" / "sft" / "model.safetensors").exists()  # the base, saved as is: DVC caches it
    assert live.summary(repo / "metrics" / "sft")["train/steps"] == 0
    assert live.summary(repo / "metrics" / "train_reward")["train/steps"] == 2  # QLoRA NF4
    assert live.summary(repo / "metrics" / "train_safety")["train/steps"] == 2
    evaluated = json.loads((repo / "eval" / "metrics.json").read_text())
    for policy in ("sft", "reward", "safety", "q0_25", "q0_5", "q0_75"):
        for metric in ("helpful_win_rate", "harmless_win_rate", "cost_mean", "unsafe_rate", "severe_rate",
                       "needless_refusal_rate", "cost_cvar_0_05", "kl_to_sft"):  # fmt: skip
            assert f"{policy}.{metric}" in evaluated, (policy, metric)
    assert evaluated["sft.helpful_win_rate"] == 0.5
    sets = json.loads((repo / "eval" / "prompt_sets.json").read_text())
    assert (sets["helpful"]["rows"], sets["helpful"]["outside_where"], sets["helpful"]["prompts"]) == (10, 4, 6)
    assert sets["redteam"]["source"] == "data/eval_redteam"  # PKU's validation prompts: red team by construction

    again = subprocess.run([*dvc, "repro"], cwd=repo, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert not re.findall(r"Running stage '(\w+)'", again.stdout), again.stdout
    status = subprocess.run([*dvc, "status"], cwd=repo, capture_output=True, text=True, env=env, timeout=120)
    assert "up to date" in status.stdout, status.stdout

    # An experiment on this path (it once deleted an uncached models/sft): commit the run, change a
    # stage-2 param; only the stages after stage 1 run again, and the base stays.
    git = {**env, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env=git)
    subprocess.run(["git", "commit", "-qm", "baseline"], cwd=repo, check=True, env=git)
    weights = (repo / "models" / "sft" / "model.safetensors").read_bytes()
    exp = subprocess.run([*dvc, "exp", "run", "-S", "train_safety.beta=0.2"], cwd=repo, capture_output=True,
                         text=True, env=git, timeout=600)  # fmt: skip
    assert exp.returncode == 0, exp.stdout[-3000:] + exp.stderr[-3000:]
    assert re.findall(r"Running stage '(\w+)'", exp.stdout) == ["train_safety", "merge", "evaluate"], exp.stdout
    assert (repo / "models" / "sft" / "model.safetensors").read_bytes() == weights
    diff = subprocess.run([*dvc, "params", "diff"], cwd=repo, capture_output=True, text=True, env=env, timeout=120)
    assert "train_safety.beta" in diff.stdout


def tiny_gguf(folder: Path, texts: list[str], chat: bool = False) -> Path:
    """A tiny llama model as a GGUF file (llama.cpp's format, written with the gguf package), with a
    BPE tokenizer in it: random float32 weights, the metadata transformers reads (chat: with a
    chat template, as instruct models' GGUF files carry one)."""
    import gguf
    import numpy as np

    tokenizer = train_bpe_tokenizer(texts, 400, "{prompt}")
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    tokens.append("<|endoftext|>")  # transformers' GGUF reader adds it to a gpt2-style vocabulary otherwise
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    n, h, layers, heads, ff = len(tokens), 32, 2, 4, 64
    folder.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(folder / "tiny.gguf"), "llama")
    writer.add_context_length(512)
    writer.add_embedding_length(h)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(h // heads)
    writer.add_vocab_size(n)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * n)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    if chat:
        writer.add_chat_template(chat_template_for("<|user|> {prompt} <|assistant|>"))
    rng = np.random.default_rng(0)
    weights = {"token_embd.weight": (n, h), "output.weight": (n, h)}
    for i in range(layers):
        weights |= {f"blk.{i}.attn_{k}.weight": (h, h) for k in ("q", "k", "v", "output")}
        weights |= {f"blk.{i}.ffn_gate.weight": (ff, h), f"blk.{i}.ffn_up.weight": (ff, h),
                    f"blk.{i}.ffn_down.weight": (h, ff)}  # fmt: skip
    for name, shape in weights.items():
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))
    for name in ["output_norm.weight", *(f"blk.{i}.{k}_norm.weight" for i in range(layers) for k in ("attn", "ffn"))]:
        writer.add_tensor(name, np.ones(h, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return folder


def test_a_gguf_base_is_dequantized_and_saved_as_a_plain_model(tmp_path: Path) -> None:
    """sft.model.gguf_file and prepare.tokenizer.gguf_file: prepare tokenizes with the GGUF's own
    tokenizer, sft saves the dequantized model as safetensors, no longer marked quantized, and
    the saved model computes what the GGUF file does."""
    import torch
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rsa_pl.pipeline import prepare, sft

    rows = pku_rows(24)
    data = tmp_path / "pku.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = tiny_gguf(tmp_path / "gguf", [f"{r['prompt']} {r['response_0']} {r['response_1']}" for r in rows] * 3)
    raw = paper_on_a_cpu(folder, data, tmp_path / "rm", tmp_path / "cm")
    raw["prepare"]["tokenizer"]["gguf_file"] = raw["sft"]["model"]["gguf_file"] = "tiny.gguf"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    quiet = Console(quiet=True)
    prepare.run(params, tmp_path / "data", quiet)
    sft.run(params, tmp_path / "data", tmp_path / "sft", tmp_path / "ckpt", quiet)
    config = json.loads((tmp_path / "sft" / "config.json").read_text())
    assert "quantization_config" not in config
    assert (tmp_path / "sft" / "model.safetensors").exists()
    assert json.loads((tmp_path / "sft" / "base_model.json").read_text())["gguf_file"] == "tiny.gguf"
    saved = AutoModelForCausalLM.from_pretrained(str(tmp_path / "sft"))
    original = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file="tiny.gguf")
    text = rows[0]["prompt"]
    ids = AutoTokenizer.from_pretrained(str(tmp_path / "sft"))(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == AutoTokenizer.from_pretrained(str(folder), gguf_file="tiny.gguf")(
        text, return_tensors="pt")["input_ids"].tolist()  # fmt: skip
    with torch.no_grad():
        assert torch.equal(saved(ids).logits, original(ids).logits)


def prompt_rows(n: int) -> list[dict]:
    """A prompts-only file as red-team and instruction sets come: benign prompts without a category,
    red-team ones with one (Do-Not-Answer style)."""
    rows = []
    for i in range(n):
        if i % 3 == 0:
            rows.append({"prompt": f"How do I {HARMS[i % len(HARMS)]}? ({i})", "category": "Crime"})
        else:
            rows.append({"prompt": f"Give me tips about {TOPICS[i % len(TOPICS)]}. ({i})"})
    return rows


def prompts_params(tmp_path: Path, rows: list[dict], **pairs: object) -> dict:
    """configs/paper.yaml on a CPU for prompts alone: the rows as the source file, a tiny base that
    knows their words, tiny score models as the pairs judge."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = user_model(tmp_path / "base", [r["prompt"] for r in rows] * 5)
    raw = paper_on_a_cpu(base, data, classifier_score_model(tmp_path / "rm"), classifier_score_model(tmp_path / "cm"))
    raw["prepare"]["source"].update(kind="prompts")
    raw["pairs"].update({"judge": "score_models", "samples_per_prompt": 3, "batch_size": 32, **pairs})
    return raw


@pytest.mark.slow
def test_dvc_repro_runs_every_stage_from_prompts_alone(tmp_path: Path) -> None:
    """Prompts only, a pretrained base and a judge: the pairs stage samples k answers per prompt
    from the base, the judge scores them, best and worst become pairs, and the whole DAG runs."""
    repo = tmp_path / "repo"
    copy_repo(repo)
    rows = prompt_rows(36)
    raw = prompts_params(tmp_path, rows, max_new_tokens=8, chunk=10)
    raw["prepare"]["eval_fraction"] = 0.25
    (repo / "params.yaml").write_text(yaml.safe_dump(raw))
    repro_everything(repo, tmp_path)
    assert not (repo / "data" / "helpful_pairs").exists()  # prepare made none: the pairs stage did
    report = json.loads((repo / "pairs" / "report.json").read_text())
    answers = report["answers"]
    assert answers["total"] == len(rows) * 3
    for name in ("helpful_pairs", "safety_pairs"):
        made = report[name]["train"]
        assert made["pairs"] + made["ties"] + made["too_few_scored"] + made["identical"] == 27  # the train prompts
        assert made["pairs"] > 0
    assert report["judge"]["judge"] == "score_models"
    trained = live.summary(repo / "metrics" / "train_reward")
    assert trained["train/steps"] == 2
    evaluated = json.loads((repo / "eval" / "metrics.json").read_text())
    assert "safety.cost_cvar_0_05" in evaluated
    assert evaluated["sft.helpful_win_rate"] == 0.5
    sets = json.loads((repo / "eval" / "prompt_sets.json").read_text())
    assert (sets["helpful"]["rows"], sets["helpful"]["outside_where"], sets["helpful"]["prompts"]) == (10, 4, 6)
    assert sets["redteam"]["source"] == "data/eval_redteam"  # the held-out prompts with a category


@pytest.mark.slow
def test_the_smollm2_demo_preset_runs_with_a_tiny_gguf_in_its_place(tmp_path: Path) -> None:
    """configs/smollm2.yaml as shipped (its real prompts, the chat template, pairs and evaluation
    judged by the base itself as a guard: forced-choice verdicts, its own helpfulness ratings),
    with only the SmolLM2 GGUF swapped for a tiny one and the sizes cut: every stage runs."""
    repo = tmp_path / "repo"
    copy_repo(repo)
    raw = yaml.safe_load((ROOT / "configs" / "smollm2.yaml").read_text())
    assert load_params(ROOT / "configs" / "smollm2.yaml").pairs.judge == "guard"
    prompts = [json.loads(line)["prompt"] for line in (ROOT / "configs/smollm2/prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == 240
    base = tiny_gguf(tmp_path / "gguf", prompts * 2 + ["safe unsafe 1 2 3 4 5 6 7 8 9"] * 20, chat=True)
    for section in (raw["prepare"]["tokenizer"], raw["sft"]["model"]):
        section.update(name_or_path=str(base), gguf_file="tiny.gguf")
    raw["prepare"].update(max_prompt_length=128, max_length=144, eval_fraction=0.1)
    raw["pairs"].update(max_new_tokens=6, batch_size=64)
    for stage in ("train_reward", "train_safety"):
        raw[stage]["train"].update(max_steps=2, batch_size=4)
    raw["evaluate"].update(samples_per_prompt=1, max_new_tokens=6, batch_size=64)
    raw["evaluate"]["guard"]["batch_size"] = 64
    (repo / "params.yaml").write_text(yaml.safe_dump(raw))
    dvc, env = repro_everything(repo, tmp_path)
    prepared = json.loads((repo / "data" / "report.json").read_text())
    assert prepared["rows_read"] == 240
    # the base saved again and stage 1 trained again (after an upgrade, say) are the same bytes:
    # nothing after them reruns, while their timings still reach metrics/<stage>/
    again = subprocess.run([*dvc, "repro", "-f", "-s", "sft", "train_reward"], cwd=repo, capture_output=True,
                           text=True, env=env, timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert re.findall(r"Running stage '(\w+)'", again.stdout) == ["sft", "train_reward"]
    status = subprocess.run([*dvc, "status"], cwd=repo, capture_output=True, text=True, env=env, timeout=120)
    assert "up to date" in status.stdout, status.stdout
    assert "time/load_s" in live.summary(repo / "metrics" / "sft")
    assert "time/load_s" not in json.loads((repo / "models" / "sft" / "metrics.json").read_text())
    assert "time/train_s" in live.summary(repo / "metrics" / "train_reward")
    report = json.loads((repo / "pairs" / "report.json").read_text())
    assert report["judge"]["judge"] == "guard"
    assert report["answers"]["unjudged"] == 0  # forced choices and ratings always give a score
    for name in ("helpful_pairs", "safety_pairs"):
        assert report[name]["train"]["pairs"] > 100
    evaluated = json.loads((repo / "eval" / "metrics.json").read_text())
    for policy in ("sft", "reward", "safety", "q0_5"):
        assert evaluated[f"{policy}.judge_failures"] == 0
        assert 1 <= evaluated[f"{policy}.reward_mean"] <= 9
        assert evaluated[f"{policy}.severe_rate"] == 0  # a forced choice names no category
    assert evaluated["sft.helpful_win_rate"] == 0.5
    sets = json.loads((repo / "eval" / "prompt_sets.json").read_text())
    assert [sets[s]["source"] for s in ("helpful", "redteam")] == ["data/eval_helpful", "data/eval_redteam"]
    assert sets["helpful"]["prompts"] + sets["redteam"]["prompts"] == 24  # the held-out tenth, by their labels


def test_the_pairs_stage_keeps_sampled_tokens_and_resumes_by_chunk(tmp_path: Path) -> None:
    """Each pair is the prompt's ids followed by the sampled answer's ids (labels only on the
    answer); a run killed after some chunks resumes with them, to the same pairs."""
    from datasets import load_from_disk
    from rich.console import Console

    from rsa_pl.pipeline import pairs, prepare, sft

    raw = prompts_params(tmp_path, prompt_rows(24), max_new_tokens=6, chunk=5)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    console = Console(record=True, width=300)
    prepare.run(params, tmp_path / "data", console)
    sft.run(params, tmp_path / "data", tmp_path / "models" / "sft", tmp_path / "ck-sft", console)
    ckpt = tmp_path / "ck-pairs"
    first = pairs.run(params, tmp_path / "data", tmp_path / "models", tmp_path / "pairs", console, ckpt)
    made = load_from_disk(str(tmp_path / "pairs" / "helpful_pairs"))["train"]
    prompts = load_from_disk(str(tmp_path / "data" / "prompts"))["train"]
    by_prompt = dict(zip(prompts["prompt"], prompts["prompt_input_ids"], strict=True))
    for row in made:
        ids = by_prompt[row["prompt"]]
        for side in ("chosen", "rejected"):
            assert row[f"{side}_input_ids"][: len(ids)] == ids
            assert row[f"{side}_labels"][: len(ids)] == [-100] * len(ids)
            assert row[f"{side}_labels"][len(ids) :] == row[f"{side}_input_ids"][len(ids) :]
            assert 0 < len(row[f"{side}_input_ids"]) - len(ids) <= 6

    chunks = sorted((ckpt / "chunks").iterdir())
    sizes = load_from_disk(str(tmp_path / "data" / "prompts")).num_rows
    assert len(chunks) == sum(-(-n // 5) for n in sizes.values())  # chunks of 5 prompts per split
    marker = json.loads((ckpt / "fingerprint.json").read_text())
    (ckpt / "fingerprint.json").write_text(json.dumps({**marker, "finished": False}))  # as if killed
    chunks[-1].unlink()
    again = pairs.run(params, tmp_path / "data", tmp_path / "models", tmp_path / "pairs-again", console, ckpt)
    assert "resuming from" in console.export_text()
    for key in ("helpful_pairs", "safety_pairs", "answers"):
        assert again[key] == first[key]
    for name in ("helpful_pairs", "safety_pairs"):
        for split in ("train", "validation"):
            a = load_from_disk(str(tmp_path / "pairs" / name))[split]
            b = load_from_disk(str(tmp_path / "pairs-again" / name))[split]
            assert a.to_list() == b.to_list(), (name, split)
