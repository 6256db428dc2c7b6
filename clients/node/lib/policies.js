// The two compaction policies this client drives, `streaming` and `halo`, built from the
// parameters the worker's ListPolicies reports. Pure functions over float32 scores (the
// mirror's brightness is a proto `float`, so every value is kept as Math.fround rounds it).
"use strict";

const f32 = Math.fround;

// Rows no plan may touch: structural ones (BOS), the newest `recentWindow` rows (the newest is the
// token being fed, not cached yet) and the first `sinks` rows (StreamingLLM's attention sinks).
function protectedRows(structural, recentWindow, sinks) {
  const n = structural.length;
  return structural.map((s, i) => s || i >= n - recentWindow || i < sinks);
}

// Indices 0..n-1 sorted by key ascending, ties to the lower index (a stable sort).
function orderBy(keys) {
  return keys.map((_, i) => i).sort((a, b) => keys[a] - keys[b] || a - b);
}

// Up to `count` non-overlapping adjacent pairs (i, i + 1), neither row protected, with the lowest
// max(score); ties to the lower position. The pairs' first rows, ascending.
function selectPairs(scores, prot, count) {
  const n = scores.length;
  if (n < 2 || count <= 0) return [];
  const pairScore = [];
  for (let i = 0; i + 1 < n; i++) {
    pairScore.push(prot[i] || prot[i + 1] ? Infinity : Math.max(scores[i], scores[i + 1]));
  }
  const chosen = [];
  const taken = new Set();
  for (const i of orderBy(pairScore)) {
    if (chosen.length === count || pairScore[i] === Infinity) break;
    if (taken.has(i) || taken.has(i + 1)) continue;
    taken.add(i).add(i + 1);
    chosen.push(i);
  }
  return chosen.sort((a, b) => a - b);
}

// The `count` unprotected rows with the lowest score (ties: lower position), ascending.
function selectEvictions(scores, prot, count) {
  if (count <= 0) return [];
  const masked = scores.map((s, i) => (prot[i] ? Infinity : s));
  return orderBy(masked)
    .slice(0, count)
    .filter((i) => masked[i] !== Infinity)
    .sort((a, b) => a - b);
}

function param(spec, key) {
  const value = spec.params[key];
  if (value === undefined) throw new Error(`policy ${spec.name}: ListPolicies has no ${key}`);
  return value;
}

// StreamingLLM (Xiao et al., 2023): keep `sinks` first rows and a recent window, evict the oldest
// rows in between. Scores are unused (age is the row index), so no SetBrightness is sent.
function streamingPolicy(spec) {
  const sinks = param(spec, "sinks");
  const recentWindow = param(spec, "recent_window");
  return {
    name: spec.name,
    merges: false,
    keepsScores: false,
    recentWindow,
    sinks,
    initialScore: () => 0,
    update: (scores) => ({ scores: scores.slice(), newScore: 0 }),
    plan(scores, structural, excess) {
      if (excess <= 0) return { merges: [], evictions: [] };
      const age = scores.map((_, i) => i); // oldest first
      const prot = protectedRows(structural, recentWindow, sinks);
      return { merges: [], evictions: selectEvictions(age, prot, excess) };
    },
    mergedScore: (scores, p) => Math.max(scores[p], scores[p + 1]),
  };
}

// Halo Weave: b' = clamp(b - decay + gain * attention, 0, max) each tick, new rows at `seed`; the
// adjacent pair with the lowest max-brightness is merged by the worker's repairer; when too few
// pairs can merge, the dimmest remaining rows are evicted.
function haloPolicy(spec) {
  const sinks = param(spec, "sinks");
  const recentWindow = param(spec, "recent_window");
  const seed = f32(param(spec, "params.seed"));
  const decay = f32(param(spec, "params.decay"));
  const gain = f32(param(spec, "params.gain"));
  const max = f32(param(spec, "params.max"));
  return {
    name: spec.name,
    merges: spec.merges,
    keepsScores: true,
    recentWindow,
    sinks,
    initialScore: () => seed,
    // scores: [S] rows; attention: [S + 1], the new token's attention over them and itself.
    update(scores, attention) {
      const out = scores.map((b, i) => {
        const v = f32(f32(b - decay) + f32(gain * attention[i]));
        return Math.min(Math.max(v, 0), max);
      });
      return { scores: out, newScore: seed };
    },
    plan(scores, structural, excess) {
      if (excess <= 0) return { merges: [], evictions: [] };
      const prot = protectedRows(structural, recentWindow, sinks);
      const pairs = selectPairs(scores, prot, excess);
      let evictions = [];
      if (pairs.length < excess) {
        const taken = prot.slice();
        for (const p of pairs) taken[p] = taken[p + 1] = true;
        evictions = selectEvictions(scores, taken, excess - pairs.length);
      }
      return { merges: pairs, evictions };
    },
    mergedScore: (scores, p) => Math.max(scores[p], scores[p + 1]),
  };
}

const FACTORIES = { streaming: streamingPolicy, halo: haloPolicy };

// The policy as the worker describes it (a PolicySpec from ListPolicies), with some parameters
// overridden ({recent_window: 4}).
function makePolicy(spec, overrides = {}) {
  const factory = FACTORIES[spec.name];
  if (!factory) {
    throw new Error(`policy ${spec.name} is not implemented here (${Object.keys(FACTORIES)})`);
  }
  return factory({ ...spec, params: { ...spec.params, ...overrides } });
}

module.exports = { makePolicy, selectEvictions, selectPairs, POLICY_NAMES: Object.keys(FACTORIES) };
