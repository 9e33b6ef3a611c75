"""The methods of the embedded-world tail experiment (reports/embedded.md, round 2), each a set of
params overrides of the one DAG in dvc.yaml, and the seeds they run with.

A setting is one DVC experiment per seed; it trains stage 1 and stage 2 and evaluates the
policies it names (evaluate.policies: SFT and merged policies only where the report reads them).
Three groups (Setting.group):
- headline, 5 seeds: TDPO, RSA with each reading of the measure, the control (cvar mu = 1, which is
  the KL and must equal TDPO), and the reverse order;
- anchoring, 3 seeds: stage 2's alpha swept with stage 1 fixed at the method's headline stage 1 (DVC's
  run-cache restores it), for the tail against stage 2's KL to the stage-1 policy;
- sharp, 3 seeds: the headline methods on configs/sharp.yaml's world (its own SFT model).
The report's methods are (setting, policy) pairs (METHODS).
"""

from __future__ import annotations

from dataclasses import dataclass, field

SEEDS = (0, 1, 2, 3, 4)  # the headline's; the anchoring and sharp groups run the first three
SHORT_SEEDS = SEEDS[:3]
EVAL_SEED_STRIDE = 1000  # evaluate.seed = 1000 x seed: each batch is seeded seed + index, so no overlap
ROUND = "r2"  # experiment names: r2-<setting>-s<seed> (round 1's emb-* ran before the CVaR tie fix)
# configs/sharp.yaml's world as overrides of params.yaml's (tests/test_experiments.py checks they agree)
SHARP_WORLD = (("prepare.world.harmful.catastrophe", "0.02"), ("prepare.world.reward.catastrophe_helpful", "false"))


@dataclass(frozen=True)
class Stage:
    """One preference stage's objective (the keys a method sets; the rest stay as in params.yaml)."""

    pairs: str
    loss: str
    beta: float
    alpha: float = 0.0
    measure: str = "kl"
    mu: float = 1.0
    lr: float | None = None  # None: params.yaml's

    def overrides(self, section: str) -> dict[str, str]:
        lr = {} if self.lr is None else {f"{section}.train.lr": f"{self.lr:g}"}
        return {
            f"{section}.pairs": self.pairs,
            f"{section}.loss": self.loss,
            f"{section}.beta": f"{self.beta:g}",
            f"{section}.alpha": f"{self.alpha:g}",
            f"{section}.risk.measure": self.measure,
            f"{section}.risk.mu": f"{self.mu:g}",
            **lr,
        }


@dataclass(frozen=True)
class Setting:
    """One experiment per seed: stage 1, stage 2, the merge ratios and the policies evaluated."""

    name: str
    stage1: Stage
    stage2: Stage
    group: str = "headline"  # headline | anchoring | sharp
    policies: tuple[str, ...] = ("safety",)
    q: tuple[float, ...] = (0.5,)
    world: tuple[tuple[str, str], ...] = ()
    seeds: tuple[int, ...] = field(default=SEEDS)

    def overrides(self, seed: int) -> dict[str, str]:
        return {
            **dict(self.world),
            **self.stage1.overrides("train_reward"),
            **self.stage2.overrides("train_safety"),
            "merge.q": "[" + ",".join(f"{q:g}" for q in self.q) + "]",
            "evaluate.policies": "[" + ",".join(self.policies) + "]",
            "train_reward.train.seed": str(seed),
            "train_safety.train.seed": str(seed),
            "evaluate.seed": str(EVAL_SEED_STRIDE * seed),
        }

    def experiment(self, seed: int) -> str:
        """The DVC experiment's name."""
        return f"{ROUND}-{self.name}-s{seed}"


BETA_HELPFUL, BETA_SAFETY = 0.1, 0.05  # params.yaml's beta_1 and beta_2 (SACPO: 0.1; 0.05 of its grid)
ALPHA = 0.5  # params.yaml's risk weight (Ra-DPO explored 0.3-0.9)


def _stages(loss: str, measure: str, mu: float, alpha: float = ALPHA) -> tuple[Stage, Stage]:
    return (
        Stage("helpful", loss, BETA_HELPFUL, ALPHA, measure, mu),
        Stage("safety", loss, BETA_SAFETY, alpha, measure, mu),
    )


def _rsa(measure: str, mu: float) -> tuple[Stage, Stage]:
    return _stages("rsa", measure, mu)


TDPO = _stages("tdpo", "kl", 1.0)
REVERSE = (  # safety first (beta_2 with the safety pairs), then helpfulness (beta_1)
    Stage("safety", "rsa", BETA_SAFETY, ALPHA, "cvar", 0.95),
    Stage("helpful", "rsa", BETA_HELPFUL, ALPHA, "cvar", 0.95),
)
HEADLINE: tuple[Setting, ...] = (
    Setting("tdpo", *TDPO, policies=("sft", "reward", "safety")),  # sft once per seed: its row and the baseline
    Setting("rsa-cvar-0.95", *_rsa("cvar", 0.95), policies=("reward", "safety", "q0_5")),
    # the control: CVaR at mu = 1 is the KL, so this is TDPO (both stages compared)
    Setting("rsa-cvar-1", *_rsa("cvar", 1.0), policies=("reward", "safety")),
    Setting("rsa-cvar_lower-0.9", *_rsa("cvar_lower", 0.9)),
    Setting("rsa-cvar_lower-0.95", *_rsa("cvar_lower", 0.95)),
    Setting("rsa-erm_lower-0.5", *_rsa("erm_lower", 0.5)),
    Setting("rsa-cvar_radpo-0.95", *_rsa("cvar_radpo", 0.95)),
    Setting("rsa-cvar-0.95-safety-first", *REVERSE, policies=("reward", "safety", "q0_5")),
)


def _anchoring(name: str, stages: tuple[Stage, Stage], alpha: float) -> Setting:
    """stage 2's alpha changed, stage 1 the headline's (the same params: DVC's run-cache restores it)."""
    first, second = stages
    return Setting(
        f"{name}-a{alpha:g}", first, Stage(second.pairs, second.loss, second.beta, alpha, second.measure, second.mu),
        group="anchoring", policies=("safety",), seeds=SHORT_SEEDS,
    )  # fmt: skip


ANCHORING: tuple[Setting, ...] = (
    # 0.75-1.5: TDPO anchored as hard as an upper-tail measure at 0.5 (>= KL); 0.25 and 0.35 (added when
    # RSA cvar at those alphas drifted past TDPO at 0.5): TDPO at the drift of RSA's weaker anchoring
    *(_anchoring("tdpo", TDPO, a) for a in (0.25, 0.35, 0.75, 1.0, 1.5)),
    *(_anchoring("rsa-cvar-0.95", _rsa("cvar", 0.95), a) for a in (0.25, 0.35)),
    _anchoring("rsa-cvar_lower-0.95", _rsa("cvar_lower", 0.95), 1.0),
)
# the sharp world: the headline methods but the control (a check of the loss, not of the world)
SHARP: tuple[Setting, ...] = tuple(
    Setting(
        f"sharp-{s.name}", s.stage1, s.stage2, group="sharp", policies=s.policies, world=SHARP_WORLD, seeds=SHORT_SEEDS
    )
    for s in HEADLINE
    if s.name != "rsa-cvar-1"
)
SETTINGS: tuple[Setting, ...] = HEADLINE + ANCHORING + SHARP
# the methods a short queue runs first: TDPO, the two readings of the paper at mu 0.95, the reverse order
CORE = ("tdpo", "rsa-cvar-0.95", "rsa-cvar_lower-0.95", "rsa-cvar-0.95-safety-first")


def tier(setting: Setting, seed: int) -> int:
    """Queue tiers, so that a queue cut short keeps whole comparisons: 0 the headline at seeds 0-2, 1 the
    anchoring curves (their stage 1s come from tier 0), 2 the sharp world's core methods, 3 the headline's
    core methods at seeds 3-4 (the control with them), 4 the rest."""
    core = setting.name.removeprefix("sharp-") in CORE
    if setting.group == "headline":
        return 0 if seed in SHORT_SEEDS else 3 if core or setting.name == "rsa-cvar-1" else 4
    if setting.group == "anchoring":
        return 1
    return 2 if core else 4


def queue_order() -> list[tuple[Setting, int]]:
    """(setting, seed) in the order to run them: by tier, then seed by seed (a queue cut short loses
    whole seeds, not methods), then in SETTINGS' order."""
    index = {s.name: i for i, s in enumerate(SETTINGS)}
    pairs = [(setting, seed) for setting in SETTINGS for seed in setting.seeds]
    return sorted(pairs, key=lambda p: (tier(*p), p[1], index[p[0].name]))


def _merged(q: float) -> str:
    """The policy merged at ratio q as merge names it (0.5 -> q0_5): collect.merged_policy's rule,
    written out here because collect imports this module."""
    return "q" + f"{q:g}".replace(".", "_")


@dataclass(frozen=True)
class Method:
    """A row of the report: one policy of one setting."""

    label: str
    setting: str
    policy: str
    group: str  # headline | anchoring | sharp


HEADLINE_LABELS = {
    "tdpo": "TDPO then TDPO",
    "rsa-cvar-0.95": "RSA cvar 0.95 (upper tail)",
    "rsa-cvar-1": "control: RSA cvar mu=1 (= KL)",
    "rsa-cvar_lower-0.9": "RSA cvar_lower 0.9 (lower tail)",
    "rsa-cvar_lower-0.95": "RSA cvar_lower 0.95 (lower tail)",
    "rsa-erm_lower-0.5": "RSA erm_lower 0.5 (lower tail)",
    "rsa-cvar_radpo-0.95": "RSA cvar_radpo 0.95 (Ra-DPO's estimator)",
    "rsa-cvar-0.95-safety-first": "RSA cvar 0.95, safety first",
}


def _methods() -> tuple[Method, ...]:
    rows: list[Method] = []
    for prefix, group in (("", "headline"), ("sharp-", "sharp")):
        rows += [
            Method("SFT", f"{prefix}tdpo", "sft", group),
            Method("TDPO (helpfulness only)", f"{prefix}tdpo", "reward", group),
            Method("RSA cvar 0.95 stage 1 (helpfulness only)", f"{prefix}rsa-cvar-0.95", "reward", group),
        ]
        rows += [
            Method(label, prefix + name, "safety", group)
            for name, label in HEADLINE_LABELS.items()
            if not (prefix and name == "rsa-cvar-1")
        ]
        rows += [
            Method("RSA(P) cvar 0.95 q=0.5", f"{prefix}rsa-cvar-0.95", _merged(0.5), group),
            Method("RSA cvar 0.95 safety only (stage 1 of the reverse order)", f"{prefix}{REVERSE_NAME}", "reward",
                   group),
            Method("RSA(P) cvar 0.95 safety first, q=0.5", f"{prefix}{REVERSE_NAME}", _merged(0.5), group),
        ]  # fmt: skip
    rows += [Method(_anchor_label(s), s.name, "safety", "anchoring") for s in ANCHORING]
    return tuple(rows)


REVERSE_NAME = "rsa-cvar-0.95-safety-first"
ANCHOR_BASES = {"tdpo": "tdpo", "rsa-cvar-0.95": "rsa-cvar-0.95", "rsa-cvar_lower-0.95": "rsa-cvar_lower-0.95"}


def _anchor_label(setting: Setting) -> str:
    base = setting.name.rsplit("-a", 1)[0]
    return f"{HEADLINE_LABELS[base].split(' (')[0]}, stage 2 alpha={setting.stage2.alpha:g}"


METHODS = _methods()
