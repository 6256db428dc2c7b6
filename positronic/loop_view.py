"""The driver's read of a session's committed rows: token ids, structural flags, scores.

Changed only after the authority acknowledges a patch, by the same edits, applied from the
highest position down exactly as the patch engine applies them (or rebuilt from GetSession).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from positronic.v1 import session_pb2


@dataclass
class View:
    version: int
    digest: bytes  # the authority's hash-chain digest at `version`
    token_ids: list[int]
    structural: list[bool]
    scores: torch.Tensor  # [S] float32

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, View):
            return NotImplemented
        return (
            self.version == other.version
            and self.digest == other.digest
            and self.token_ids == other.token_ids
            and self.structural == other.structural
            and torch.allclose(self.scores.float(), other.scores.float())
        )


def apply_edits(
    view: View,
    *,
    scores: torch.Tensor,
    merges: list[tuple[int, int, float]],
    evictions: list[int],
    appended: tuple[int, float],
    version: int,
    digest: bytes,
) -> View:
    """The view after a committed patch: scores set, pairs merged, rows evicted, one appended."""
    tokens = list(view.token_ids)
    structural = list(view.structural)
    values = scores.float().tolist()
    tokens.append(appended[0])
    structural.append(False)
    values.append(float(appended[1]))
    edits = [(p, "merge", tok, s) for p, tok, s in merges] + [
        (p, "evict", 0, 0.0) for p in evictions
    ]
    for p, kind, tok, s in sorted(edits, key=lambda e: e[0], reverse=True):
        if kind == "merge":
            tokens[p : p + 2] = [tok]
            structural[p : p + 2] = [False]
            values[p : p + 2] = [s]
        else:
            del tokens[p], structural[p], values[p]
    return View(version, digest, tokens, structural, torch.tensor(values, dtype=torch.float32))


def view_from_mirror(resp) -> View:
    """A View from a GetSessionResponse."""
    mirror = resp.mirror
    return View(
        version=resp.session.version,
        digest=resp.session.digest,
        token_ids=[m.token_id for m in mirror],
        structural=[m.source == session_pb2.TOKEN_SOURCE_STRUCTURAL for m in mirror],
        scores=torch.tensor([m.brightness for m in mirror], dtype=torch.float32),
    )
