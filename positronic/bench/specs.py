"""Policy specs for the benchmarks: a policy name, or a name with settings, e.g.

    halo                      the halo policy as `positronic generate --policy halo` runs it
    halo-user                 the user's formula exactly (seed 255, decay 2, gain 10, no sinks)
    halo:decay=0.5:gain=200   halo with settings (seed, decay, gain, max, sinks, window, ...)
    streaming:sinks=4, h2o:recent=0:window=16, tova:reduction=mean

`window` is the policy's protected recent window (rows), `recent` H2O's recent window as a
share of the budget (default 0.5, the paper's split; the window is the larger of the two),
`sinks` its protected first rows (halo and streaming), `reduction` the layer reduction of the
attention row (last, mean, max), `candidates` how many replacements the repairer returns per
pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from positronic.loop import REDUCTIONS
from positronic.policies import POLICIES, Policy, make_policy

_BRIGHTNESS = ("seed", "decay", "gain", "max")
_KEYS = {*_BRIGHTNESS, "window", "reduction", "candidates", "sinks", "recent"}


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
        """A fresh policy object with the spec's settings over the policy's defaults."""
        overrides: dict = {}
        s = self.settings
        if "window" in s:
            overrides["recent_window"] = int(s["window"])
        if "sinks" in s:
            overrides["sinks"] = int(s["sinks"])
        if "recent" in s:
            overrides["recent_fraction"] = float(s["recent"])
        if any(k in s for k in _BRIGHTNESS):
            base = make_policy(self.name).params  # type: ignore[attr-defined]
            overrides["params"] = replace(base, **{k: float(s[k]) for k in _BRIGHTNESS if k in s})
        return make_policy(self.name, **overrides)


def parse_spec(text: str) -> PolicySpec:
    """`name[:key=value]...` -> PolicySpec; raises ValueError naming what is wrong."""
    name, *parts = text.strip().split(":")
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")
    settings = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or key not in _KEYS:
            raise ValueError(f"{text!r}: {part!r} is not one of {', '.join(sorted(_KEYS))}=VALUE")
        settings[key] = value
    if settings.get("reduction", "last") not in REDUCTIONS:
        raise ValueError(f"{text!r}: reduction must be one of {', '.join(REDUCTIONS)}")
    if any(k in settings for k in _BRIGHTNESS) and not hasattr(make_policy(name), "params"):
        raise ValueError(f"{text!r}: brightness settings apply to halo policies only")
    spec = PolicySpec(text.strip(), name, settings)
    try:
        spec.make()  # validate the values now, not in a worker process later
    except TypeError as e:
        raise ValueError(f"{text!r}: {e}") from None
    return spec


def parse_specs(text: str) -> list[PolicySpec]:
    specs = [parse_spec(t) for t in text.split(",") if t.strip()]
    if not specs:
        raise ValueError("no policies given")
    if len({s.label for s in specs}) != len(specs):
        raise ValueError("a policy is named twice")
    return specs
