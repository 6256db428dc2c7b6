"""Policy specs for the benchmarks: a name, or a name with settings, e.g.

    halo                      the halo policy as `positronic generate` runs it
    halo-user                 the user's formula exactly (seed 255, decay 2, gain 10, max 255)
    halo:decay=0.5:gain=200   halo with settings (also: seed, max, window, reduction, candidates)
    streaming:sinks=4, h2o:window=16, tova

`window` is the policy's protected recent window, `reduction` the layer reduction of the attention
row (last, mean, max), `candidates` how many replacements the repairer returns per pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from positronic.brightness import USER_DEFAULTS, BrightnessParams
from positronic.loop import REDUCTIONS
from positronic.policies import POLICIES, Policy, make_policy

PRESETS: dict[str, tuple[str, dict[str, str]]] = {
    # The user's formula and settings exactly, kept whatever the default becomes.
    "halo-user": (
        "halo",
        {
            "seed": str(USER_DEFAULTS.seed),
            "decay": str(USER_DEFAULTS.decay),
            "gain": str(USER_DEFAULTS.gain),
            "max": str(USER_DEFAULTS.max),
            "window": "8",
            "reduction": "last",
        },
    ),
}
_BRIGHTNESS = ("seed", "decay", "gain", "max")
_KEYS = {*_BRIGHTNESS, "window", "reduction", "candidates", "sinks"}


@dataclass(frozen=True)
class PolicySpec:
    label: str  # as given on the command line; the key in the JSON
    name: str  # a key of positronic.policies.POLICIES
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def reduction(self) -> str:
        return self.settings.get("reduction", "last")

    @property
    def candidates(self) -> int:
        return int(self.settings.get("candidates", "5"))

    def make(self) -> Policy:
        """A fresh policy object (policies keep no state, but do not share one anyway)."""
        overrides: dict = {}
        s = self.settings
        if "window" in s:
            overrides["recent_window"] = int(s["window"])
        if "sinks" in s:
            overrides["sinks"] = int(s["sinks"])
        if any(k in s for k in _BRIGHTNESS):
            base = make_policy("halo").params  # type: ignore[attr-defined]
            values = {k: float(s.get(k, getattr(base, k))) for k in _BRIGHTNESS}
            overrides["params"] = BrightnessParams(**values)
        return make_policy(self.name, **overrides)


def parse_spec(text: str) -> PolicySpec:
    """`name[:key=value]...` -> PolicySpec; raises ValueError naming what is wrong."""
    head, *parts = text.strip().split(":")
    name, settings = head, {}
    if head in PRESETS:
        name, preset = PRESETS[head]
        settings = dict(preset)
    if name not in POLICIES:
        raise ValueError(f"unknown policy {head!r}; choose from {', '.join([*POLICIES, *PRESETS])}")
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or key not in _KEYS:
            raise ValueError(f"{text!r}: {part!r} is not one of {', '.join(sorted(_KEYS))}=VALUE")
        settings[key] = value
    if settings.get("reduction", "last") not in REDUCTIONS:
        raise ValueError(f"{text!r}: reduction must be one of {', '.join(REDUCTIONS)}")
    if any(k in settings for k in _BRIGHTNESS) and name != "halo":
        raise ValueError(f"{text!r}: brightness settings apply to halo only")
    spec = PolicySpec(text.strip(), name, settings)
    spec.make()  # validate the values now, not in a worker process later
    return spec


def parse_specs(text: str) -> list[PolicySpec]:
    specs = [parse_spec(t) for t in text.split(",") if t.strip()]
    if not specs:
        raise ValueError("no policies given")
    if len({s.label for s in specs}) != len(specs):
        raise ValueError("a policy is named twice")
    return specs
