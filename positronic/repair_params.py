"""A policy's repair as the wire says it: RepairSpec (positronic.policies) <-> RepairParams, and a
preset as a PolicySpec (ListPolicies). Shared by the loop, which asks each Tick for its policy's
repair, and the worker, which lists the presets; pure, no service imported."""

from __future__ import annotations

from positronic.policies import POLICIES, Policy, RepairSpec, make_policy
from positronic.v1 import model_worker_pb2 as pb

REPAIRERS = {
    "default": pb.REPAIRER_UNSPECIFIED,
    "lm": pb.REPAIRER_LM,
    "mlm": pb.REPAIRER_MLM,
    "kv_merge": pb.REPAIRER_KV_MERGE,
    "pair_lm": pb.REPAIRER_PAIR_LM,
}
KV_WEIGHTS = {"attention": pb.KV_MERGE_WEIGHTS_ATTENTION, "equal": pb.KV_MERGE_WEIGHTS_EQUAL}
KV_KEYS = {"mean": pb.KV_MERGE_KEY_MEAN, "heavier": pb.KV_MERGE_KEY_HEAVIER}


def repair_params_pb(spec: RepairSpec | None) -> pb.RepairParams:
    """What a Tick request carries for this repair (None: the worker's default repairer)."""
    if spec is None:
        return pb.RepairParams()
    return pb.RepairParams(
        repairer=REPAIRERS[spec.repairer],
        max_candidates=spec.candidates,
        kv_weights=KV_WEIGHTS[spec.kv_weights],
        kv_key=KV_KEYS[spec.kv_key],
    )


def policy_spec_pb(policy: Policy) -> pb.PolicySpec:
    return pb.PolicySpec(
        name=policy.name,
        description=policy.description,
        merges=policy.merges,
        repair=repair_params_pb(policy.repair if policy.merges else None),
        params=policy.parameters(),
    )


def list_policies_pb() -> pb.ListPoliciesResponse:
    """Every preset, ordered by name."""
    return pb.ListPoliciesResponse(
        policies=[policy_spec_pb(make_policy(name)) for name in sorted(POLICIES)]
    )
