"""`rsa-pl prepare`: build the data (embedded world or a real dataset), tokenized, with a report.

Writes, under the output folder (default data/), atomically (built beside it, then swapped in):
    tokenizer/                         the tokenizer every later stage uses
    sft/                               DatasetDict train/validation: input_ids, labels (-100 on the prompt)
    helpful_pairs/, safety_pairs/      DatasetDict train/validation: chosen_* / rejected_* ids and labels
    eval_helpful/, eval_redteam/       Dataset: held-out prompts; red-team ones with their harm category,
                                       categories and severity (real data: over all their validation rows)
    world/*.jsonl                      embedded only: the world's raw rows (PKU-SafeRLHF schema + oracle fields)
    report.json                        counts, lengths, the prompt format, the helpfulness/safety tension,
                                       rejects by reason (a prompt too long: what the template adds to it)
    rejects.jsonl                      every skipped row once, with its reason (and the sets it left)
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict
from rich.console import Console
from rich.table import Table
from transformers import PreTrainedTokenizerBase

from rsa_pl.config import PrepareParams
from rsa_pl.data.sources import DataError, Reject, SourceResult, load_source, reject_counts
from rsa_pl.data.tokenize import (
    Encoded,
    PromptFormat,
    PromptTooLongError,
    encode,
    encode_prompt,
    train_bpe_tokenizer,
)
from rsa_pl.errors import UnavailableError
from rsa_pl.models import load_tokenizer
from rsa_pl.params_file import load_params
from rsa_pl.pipeline.outputs import staging_for, swap_in
from rsa_pl.world.generator import World, build_world

_TEXT, _IDS, _FLAG = datasets.Value("string"), datasets.List(datasets.Value("int32")), datasets.Value("bool")
_TEXTS, _INT = datasets.List(datasets.Value("string")), datasets.Value("int32")
# One schema per kind of set, so that empty sets save too and every run writes the same types.
FEATURES = {
    "sft": datasets.Features(
        {"prompt": _TEXT, "prompt_text": _TEXT, "response": _TEXT, "input_ids": _IDS, "labels": _IDS, "category": _TEXT}
    ),
    "pairs": datasets.Features(
        {
            **{name: _TEXT for name in ("prompt", "prompt_text", "chosen", "rejected", "category")},
            **{f"{side}_{kind}": _IDS for side in ("chosen", "rejected") for kind in ("input_ids", "labels")},
            "is_chosen_safe": _FLAG,
            "is_rejected_safe": _FLAG,
        }
    ),
    "prompts": datasets.Features(
        {
            "prompt": _TEXT,
            "prompt_text": _TEXT,
            "prompt_input_ids": _IDS,
            "category": _TEXT,
            "topic": _TEXT,
            "categories": _TEXTS,
            "severity": _INT,
        }
    ),
}
SET_KINDS = {
    "sft": "sft",
    "helpful_pairs": "pairs",
    "safety_pairs": "pairs",
    "prompts": "prompts",
    "eval_helpful": "prompts",
    "eval_redteam": "prompts",
}


def as_dataset(examples: list[dict[str, Any]], features: datasets.Features) -> Dataset:
    """A Dataset of exactly these columns and types, also when there are no examples.

    Saved with num_shards=1: datasets 5 writes an empty dataset as zero shards by default,
    which load_from_disk then cannot read.
    """
    return Dataset.from_dict({name: [e[name] for e in examples] for name in features}, features=features)


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


Origin = tuple[str, int]
"""Where a row comes from: the file (or hub id) and the row's 0-based index in it."""
Item = tuple[Origin, dict[str, Any]]


def _split(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """(train, validation): a seeded shuffle, the first ceil(fraction * n) rows for validation."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    cut = math.ceil(fraction * len(items)) if items else 0
    return [items[i] for i in sorted(order[cut:])], [items[i] for i in sorted(order[:cut])]


class _Tokenized:
    """Tokenizes rows into examples, collecting the rows it drops as rejects (each row once)."""

    def __init__(self, fmt: PromptFormat, params: PrepareParams) -> None:
        self.fmt, self.params = fmt, params
        self.rejects: dict[Origin, Reject] = {}
        self.prompt_lengths: list[int] = []
        self.response_lengths: list[int] = []
        self.truncated = 0

    def _encode(self, prompt: str, response: str) -> Encoded:
        encoded = encode(self.fmt, prompt, response, self.params.max_length, self.params.max_prompt_length)
        self.response_lengths.append(encoded.response_length)
        self.truncated += encoded.truncated
        return encoded

    def _each(self, name: str, items: list[Item], make: Callable[[dict[str, Any]], dict[str, Any]]):
        examples = []
        for origin, row in items:
            try:
                examples.append(make(row))
            except PromptTooLongError as error:
                if origin not in self.rejects:  # a row in several sets is one reject, listing them
                    data = {**row, "detail": str(error), "sets": []}
                    self.rejects[origin] = Reject(origin[0], origin[1], "prompt too long", data)
                self.rejects[origin].data["sets"].append(name)
        return examples

    def sft(self, name: str, items: list[Item]) -> list[dict[str, Any]]:
        def make(row: dict[str, Any]) -> dict[str, Any]:
            e = self._encode(row["prompt"], row["response"])
            self.prompt_lengths.append(e.prompt_length)
            return {"prompt": row["prompt"], "prompt_text": e.prompt_text, "response": row["response"],
                    "input_ids": e.input_ids, "labels": e.labels, "category": row.get("category")}  # fmt: skip

        return self._each(name, items, make)

    def pairs(self, name: str, items: list[Item], label: str) -> list[dict[str, Any]]:
        def make(row: dict[str, Any]) -> dict[str, Any]:
            chosen_id = row[label]
            chosen, rejected = row[f"response_{chosen_id}"], row[f"response_{1 - chosen_id}"]
            c = self._encode(row["prompt"], chosen)
            r = self._encode(row["prompt"], rejected)
            self.prompt_lengths.append(c.prompt_length)
            return {
                "prompt": row["prompt"], "prompt_text": c.prompt_text, "chosen": chosen, "rejected": rejected,
                "chosen_input_ids": c.input_ids, "chosen_labels": c.labels,
                "rejected_input_ids": r.input_ids, "rejected_labels": r.labels,
                "category": row.get("category"),
                "is_chosen_safe": row.get(f"is_response_{chosen_id}_safe"),
                "is_rejected_safe": row.get(f"is_response_{1 - chosen_id}_safe"),
            }  # fmt: skip

        return self._each(name, [(o, r) for o, r in items if r.get(label) is not None], make)

    def prompts(self, name: str, items: list[Item]) -> list[dict[str, Any]]:
        def make(row: dict[str, Any]) -> dict[str, Any]:
            text, ids = encode_prompt(self.fmt, row["prompt"], self.params.max_prompt_length)
            category = row.get("category")
            categories = row.get("categories", [category] if category is not None else [])
            return {"prompt": row["prompt"], "prompt_text": text, "prompt_input_ids": ids, "category": category,
                    "topic": row.get("topic"), "categories": list(categories),
                    "severity": row.get("severity")}  # fmt: skip

        return self._each(name, items, make)


def _percentiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: float(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)])  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": float(ordered[-1])}


def _tension(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Among harmful-prompt pairs: how often the more helpful answer is the less safe one."""
    harmful = [
        r
        for r in rows
        if r["category"] is not None or r["is_response_0_safe"] is False or r["is_response_1_safe"] is False
    ]
    labelled = [r for r in harmful if r["safer_response_id"] is not None]
    unsafe_preferred = [
        r
        for r in labelled
        if r[f"is_response_{r['better_response_id']}_safe"] is False
        and r[f"is_response_{1 - r['better_response_id']}_safe"] is True
    ]
    disagree = [r for r in labelled if r["better_response_id"] != r["safer_response_id"]]
    return {
        "harmful_prompt_pairs": len(labelled),
        "more_helpful_is_unsafe_other_safe": len(unsafe_preferred),
        "share_more_helpful_is_unsafe_other_safe": len(unsafe_preferred) / len(labelled) if labelled else 0.0,
        "share_better_differs_from_safer": len(disagree) / len(labelled) if labelled else 0.0,
    }


def _load_rows(params: PrepareParams, staging: Path) -> tuple[SourceResult, str, World | None]:
    """The source's canonical rows, its name (as rejects name it) and, embedded, the world."""
    if params.source.kind != "embedded":
        path = params.source.path or ""
        return load_source(path, params.source.kind, params.source.split), path, None
    world = build_world(params.world, params.seed)
    for name in ("preferences", "sft", "helpful_eval", "redteam_eval"):
        _write_jsonl(staging / "world" / f"{name}.jsonl", getattr(world, name))
    # The world's rows go through the same reader and checks as a real PKU-SafeRLHF file.
    path = str(staging / "world" / "preferences.jsonl")
    return load_source(path, "pku_saferlhf"), path, world


def _tokenizer_name(params: PrepareParams) -> str:
    if params.tokenizer.kind == "pretrained":
        return str(params.tokenizer.name_or_path)
    return "the trained BPE tokenizer (prepare.tokenizer.kind: train_bpe)"


def _tokenizer(params: PrepareParams, world: World | None, rows: list[dict[str, Any]]) -> PreTrainedTokenizerBase:
    if params.tokenizer.kind == "pretrained":
        name = params.tokenizer.name_or_path
        try:
            return load_tokenizer(name, params.tokenizer.trust_remote_code, params.tokenizer.gguf_file)
        except UnavailableError as error:  # its own code refused, a missing folder, offline
            raise DataError(str(error)) from None
        except (OSError, ValueError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise DataError(f"{name}: cannot load the tokenizer ({type(error).__name__}: {first_line})") from None
    assert world is not None
    assert params.tokenizer.vocab_size is not None
    template = params.prompt_template
    corpus = [template.format(prompt=r["prompt"]) + " " + r["response"] for r in world.sft]
    corpus += [template.format(prompt=r["prompt"]) + " " + r[f"response_{i}"] for r in rows for i in (0, 1)]
    corpus += [template.format(prompt=r["prompt"]) for r in world.helpful_eval + world.redteam_eval]
    return train_bpe_tokenizer(corpus, params.tokenizer.vocab_size, template)


def _numbered(path: Path, rows: list[dict[str, Any]]) -> list[Item]:
    return [((str(path), index), row) for index, row in enumerate(rows)]


REDTEAM_SCHEMAS = ("pku_saferlhf",)
"""Sources whose prompts are red-team prompts when a row has no `harmful` label: PKU-SafeRLHF's were
written to elicit its harm categories (BeaverTails' red-team prompts; the 2024 release's 19 categories)."""


def _eval_prompts(validation: list[Item], kind: str) -> tuple[list[Item], list[Item]]:
    """Real data's held-out prompt sets: the validation rows' prompts, each once, classified by the
    prompt's own label, never by its answers (a harmful prompt whose answers both refuse stays a
    red-team prompt): a row's `harmful` column where it has one, else the source's kind (red team for
    REDTEAM_SCHEMAS, benign otherwise). A red-team prompt's categories are those of its unsafe
    responses over all its rows (category: the first), its severity the largest level."""
    prompts: dict[str, Item] = {}
    for origin, row in validation:
        new = {"prompt": row["prompt"], "topic": None, "categories": [], "severity": None, "harmful": None}
        _, entry = prompts.setdefault(row["prompt"], (origin, new))
        if row["harmful"] is not None:
            entry["harmful"] = bool(entry["harmful"]) or row["harmful"]
        entry["categories"] += [c for c in row["categories"] if c not in entry["categories"]]
        if row["severity"] is not None:
            entry["severity"] = max(row["severity"], entry["severity"] or 0)
    helpful: list[Item] = []
    redteam: list[Item] = []
    for origin, entry in prompts.values():
        entry["category"] = entry["categories"][0] if entry["categories"] else None
        harmful = entry.pop("harmful")
        (redteam if (kind in REDTEAM_SCHEMAS if harmful is None else harmful) else helpful).append((origin, entry))
    return helpful, redteam


def _prompt_too_long(rejects: list[Reject], fmt: PromptFormat, params: PrepareParams) -> dict[str, Any] | None:
    """What a reader needs when prompts were too long: how many, where, and what the format adds."""
    too_long = [r for r in rejects if r.reason == "prompt too long"]
    if not too_long:
        return None
    around, system = fmt.overhead(), fmt.system_tokens()
    what = f"the chat template of {fmt.name}" if fmt.kind == "chat" else "prepare.prompt_template"
    of_them = f" ({system} of them the system prompt)" if system else ""
    drop = " or set prepare.system_prompt: null" if system else ""
    return {
        "rows": len(too_long),
        "by_set": dict(sorted(Counter(name for r in too_long for name in r.data["sets"]).items())),
        "tokens_around_prompt": around,
        "system_prompt_tokens": system,
        "hint": f"{what} adds {around} tokens around every prompt{of_them}; "
        f"raise prepare.max_prompt_length ({params.max_prompt_length}){drop}",
    }


def build(params: PrepareParams, staging: Path, out_name: str) -> dict[str, Any]:
    """Build every output of the stage into staging (to become out_name); return the report."""
    source, source_name, world = _load_rows(params, staging)
    rows = source.rows
    tokenizer = _tokenizer(params, world, rows)
    fmt = PromptFormat(tokenizer, params.prompt_format, params.prompt_template, params.system_prompt,
                       _tokenizer_name(params))  # fmt: skip
    if fmt.kind == "chat" and fmt.end_of_turn is not None and fmt.end_of_turn != tokenizer.eos_token_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(fmt.end_of_turn)  # generation stops at the end of turn
    pad_from = None
    if tokenizer.pad_token is None:  # Llama-style tokenizers have none; batches need one (masked out anyway)
        if tokenizer.eos_token is None:
            raise DataError(f"{_tokenizer_name(params)}: the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token, pad_from = tokenizer.eos_token, "eos"
    tokenizer.save_pretrained(str(staging / "tokenizer"))
    tok = _Tokenized(fmt, params)
    items = [((source_name, index), row) for index, row in zip(source.indices, rows, strict=True)]
    train_rows, validation_rows = _split(items, params.eval_fraction, params.seed)
    sets: dict[str, Any] = {}
    if world is not None:
        sft_train, sft_validation = _split(_numbered(staging / "world" / "sft.jsonl", world.sft),
                                           params.eval_fraction, params.seed + 1)  # fmt: skip
        sets["sft"] = {
            "train": tok.sft("sft.train", sft_train),
            "validation": tok.sft("sft.validation", sft_validation),
        }
    prompts_only = params.source.kind == "prompts"
    if prompts_only:  # the pairs stage answers and judges them
        sets["prompts"] = {
            "train": tok.prompts("prompts.train", train_rows),
            "validation": tok.prompts("prompts.validation", validation_rows),
        }
    for name, label in (("helpful_pairs", "better_response_id"), ("safety_pairs", "safer_response_id")):
        if prompts_only:
            break
        sets[name] = {
            "train": tok.pairs(f"{name}.train", train_rows, label),
            "validation": tok.pairs(f"{name}.validation", validation_rows, label),
        }
    if prompts_only:
        helpful = [(origin, row) for origin, row in validation_rows if not row["harmful"]]
        redteam = [(origin, row) for origin, row in validation_rows if row["harmful"]]
    elif world is not None:
        helpful = _numbered(staging / "world" / "helpful_eval.jsonl", world.helpful_eval)
        redteam = _numbered(staging / "world" / "redteam_eval.jsonl", world.redteam_eval)
    else:
        helpful, redteam = _eval_prompts(validation_rows, params.source.kind)
    sets["eval_helpful"] = tok.prompts("eval_helpful", helpful)
    sets["eval_redteam"] = tok.prompts("eval_redteam", redteam)

    counts: dict[str, Any] = {}
    categories: dict[str, dict[str, int]] = {}
    for name, value in sets.items():
        features = FEATURES[SET_KINDS[name]]
        if isinstance(value, dict):
            splits = {split: as_dataset(examples, features) for split, examples in value.items()}
            DatasetDict(splits).save_to_disk(str(staging / name), num_shards=dict.fromkeys(splits, 1))
            counts[name] = {split: len(examples) for split, examples in value.items()}
            for split, examples in value.items():
                categories[f"{name}.{split}"] = dict(sorted(Counter(e["category"] or "none" for e in examples).items()))
        else:
            as_dataset(value, features).save_to_disk(str(staging / name), num_shards=1)
            counts[name] = len(value)
            categories[name] = dict(sorted(Counter(e["category"] or "none" for e in value).items()))
    # Rows read from the staging folder are reported under the output folder they end up in.
    read = [*source.rejects, *tok.rejects.values()]
    rejects = [replace(r, source=r.source.replace(str(staging), out_name)) for r in read]
    _write_jsonl(staging / "rejects.jsonl", (asdict(r) for r in rejects))
    rejected: dict[str, Any] = {"total": len(rejects), "by_reason": reject_counts(rejects)}
    too_long = _prompt_too_long(rejects, fmt, params)
    if too_long is not None:
        rejected["prompt_too_long"] = too_long
    report = {
        "source": params.source.kind if params.source.kind == "embedded" else params.source.path,
        "rows_read": len(rows) + len(source.rejects),
        "counts": counts,
        "categories": categories,
        "lengths": {
            "prompt_tokens": _percentiles(tok.prompt_lengths),
            "response_tokens": _percentiles(tok.response_lengths),
            "truncated_responses": tok.truncated,
        },
        "tension": _tension(rows) if not prompts_only else None,
        "rejected": rejected,
        "tokenizer": {
            "kind": params.tokenizer.kind,
            "vocab_size": len(tokenizer),
            "pad_token": tokenizer.pad_token,
            "pad_token_from": pad_from,
        },
        "prompt_format": fmt.describe(),
    }
    (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def run(params_path: Path, out: Path, console: Console) -> dict[str, Any]:
    """Load params, build into a staging folder beside out, swap it in, print a summary."""
    params = load_params(params_path).prepare
    datasets.disable_progress_bars()
    out_name, out = str(out), out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_for(out)
    try:
        report = build(params, staging, out_name)
        swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _print_summary(report, out, console)
    return report


def _print_summary(report: dict[str, Any], out: Path, console: Console) -> None:
    table = Table(title=f"prepare -> {out}")
    table.add_column("set")
    table.add_column("rows", justify="right")
    for name, value in report["counts"].items():
        table.add_row(name, " / ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict) else str(value))
    console.print(table)
    tension = report["tension"]
    if tension is not None:  # prompts alone have no pairs yet
        console.print(
            f"harmful-prompt pairs where the more helpful answer is unsafe and the other safe: "
            f"{tension['share_more_helpful_is_unsafe_other_safe']:.1%} of {tension['harmful_prompt_pairs']}"
        )
    rejected = report["rejected"]
    console.print(f"rejected rows: {rejected['total']} {rejected['by_reason']}", markup=False, soft_wrap=True)
    if "prompt_too_long" in rejected:
        console.print(f"prompt too long: {rejected['prompt_too_long']['hint']}", markup=False, soft_wrap=True)
