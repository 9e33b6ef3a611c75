"""Refusal detection on real data: phrase rules (docs/method.md, "Evaluation protocol").

The rules are regular expressions, one a line, in rsa_pl/evaluation/prompts/refusal_patterns.txt
(or the file evaluate.refusal_patterns names): an answer matching any of them, case-insensitively,
anywhere, is a refusal. They are written for English answers and err towards precision: an answer
that helps while adding a caveat ("I'd advise against ...") counts, one that merely mentions the law
does not.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from rsa_pl.evaluation.judges import JudgeError

SHIPPED = "refusal_patterns.txt"


def rules_text(path: str | Path | None) -> tuple[str, str]:
    """(where the rules come from, their text): the shipped file, or the one at path."""
    if path is None:
        return f"rsa_pl/evaluation/prompts/{SHIPPED}", resources.files("rsa_pl.evaluation.prompts").joinpath(
            SHIPPED
        ).read_text(encoding="utf-8")
    try:
        return str(path), Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise JudgeError(f"evaluate.refusal_patterns: {path}: cannot read ({error.strerror or error})") from None


class RefusalRules:
    """Compiled refusal rules; `refuses(text)` says whether an answer matches any of them."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.source, text = rules_text(path)
        self.patterns: list[re.Pattern[str]] = []
        for number, line in enumerate(text.splitlines(), start=1):
            rule = line.strip()
            if not rule or rule.startswith("#"):
                continue
            try:
                self.patterns.append(re.compile(rule, re.IGNORECASE))
            except re.error as error:
                raise JudgeError(f"{self.source}: line {number}: not a regular expression ({error})") from None
        if not self.patterns:
            raise JudgeError(f"{self.source}: no refusal rules in it")

    def refuses(self, text: str) -> bool:
        return any(p.search(text) for p in self.patterns)
