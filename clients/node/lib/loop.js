// One session's generation, as the protos and README describe the loop:
//   prime   Tokenize (add_bos) -> CreateSession -> Prefill of every prompt token but the last ->
//           Patch at version 0 (one Append per run of equal source per Prefill chunk)
//   each    plan merges from the committed scores (one tick behind) -> Tick(last token, pairs)
//   tick    -> scores from the attention row -> Patch([SetBrightness], ReplacePair..., Evict...,
//           Append(last token)) -> version + 1
// The view of the session (token ids, structural flags, scores) changes only after the
// authority acknowledges a patch; an ABORTED patch (another writer) re-reads it with GetSession.
"use strict";

const { callWithRetry, grpcStatus } = require("./services");
const { makePolicy } = require("./policies");
const { iterationSeed, patchMessages, requestId, sliceKV } = require("./wire");

const MAX_STALE_IN_A_ROW = 20;

const REDUCTIONS = {
  last: "ATTENTION_REDUCTION_LAST_LAYER",
  mean: "ATTENTION_REDUCTION_MEAN_LAYERS",
  max: "ATTENTION_REDUCTION_MAX_LAYERS",
};

// Maximal [a, b) runs of equal flags within [start, stop).
function* runs(flags, start, stop) {
  let a = start;
  while (a < stop) {
    let b = a;
    while (b < stop && flags[b] === flags[a]) b++;
    yield [a, b];
    a = b;
  }
}

// The view after a committed patch: scores set, pairs merged, rows evicted (highest position
// first, as the patch engine applies them), the input token appended.
function applyEdits(view, { scores, merges, evictions, appended, version, digest }) {
  const tokens = [...view.tokenIds, appended.token];
  const structural = [...view.structural, false];
  const values = [...scores, appended.score];
  const edits = [
    ...merges.map((m) => ({ p: m.position, merge: m })),
    ...evictions.map((p) => ({ p, merge: null })),
  ].sort((x, y) => y.p - x.p);
  for (const { p, merge } of edits) {
    if (merge) {
      tokens.splice(p, 2, merge.tokenId);
      structural.splice(p, 2, false);
      values.splice(p, 2, merge.score);
    } else {
      tokens.splice(p, 1);
      structural.splice(p, 1);
      values.splice(p, 1);
    }
  }
  return { version, digest, tokenIds: tokens, structural, scores: values };
}

function viewFromSession(resp) {
  return {
    version: resp.session.version,
    digest: resp.session.digest,
    tokenIds: resp.mirror.map((m) => m.token_id),
    structural: resp.mirror.map((m) => m.source === "TOKEN_SOURCE_STRUCTURAL"),
    scores: resp.mirror.map((m) => m.brightness),
  };
}

function sameView(a, b) {
  const eq = (x, y) => x.length === y.length && x.every((v, i) => v === y[i]);
  return (
    a.version === b.version &&
    Buffer.compare(a.digest, b.digest) === 0 &&
    eq(a.tokenIds, b.tokenIds) &&
    eq(a.structural, b.structural) &&
    eq(a.scores.map(Math.fround), b.scores.map(Math.fround))
  );
}

class Loop {
  // services: {authority, worker} (services.connect); config: see generate.js's options.
  constructor(services, config, onText) {
    this.a = services.authority;
    this.w = services.worker;
    this.cfg = config;
    this.onText = onText;
    this.stats = { merges: 0, evictions: 0, iterations: 0, maxRows: 0, staleRetries: 0 };
  }

  worker(method, request, timeoutS = this.cfg.callTimeoutS) {
    const retry = { timeoutS: this.cfg.retryTimeoutS };
    return callWithRetry(() => this.w.unary(method, request, timeoutS), method, retry);
  }

  authority(method, request) {
    const retry = { timeoutS: this.cfg.retryTimeoutS };
    return callWithRetry(() => this.a.unary(method, request, this.cfg.callTimeoutS), method, retry);
  }

  patch(sessionId, version, ops, timeoutS = this.cfg.callTimeoutS) {
    // One request id for every attempt: a retried patch applies at most once.
    const messages = patchMessages(sessionId, version, requestId(), ops);
    return callWithRetry(() => this.a.clientStream("Patch", messages, timeoutS), "Patch", {
      timeoutS: this.cfg.retryTimeoutS,
    });
  }

  async setUp() {
    this.info = await this.worker("Info", {});
    const { policies } = await this.worker("ListPolicies", {});
    const spec = policies.find((p) => p.name === this.cfg.policy);
    if (!spec) throw new Error(`the worker lists no policy ${this.cfg.policy}`);
    this.policy = makePolicy(spec, this.cfg.overrides);
    this.repair = spec.repair; // what each Tick asks for (empty when the policy only evicts)
    const protectedRows = this.policy.recentWindow + this.policy.sinks + 1;
    if (protectedRows >= this.cfg.targetRows) {
      throw new Error(`policy ${spec.name} protects ${protectedRows} rows; raise --target-size`);
    }
    const positions = this.info.geometry.max_position_embeddings;
    if (positions && this.cfg.hardMaxRows >= positions) {
      throw new Error(`hard maximum ${this.cfg.hardMaxRows} rows must be below ${positions}`);
    }
  }

  async prime(prompt) {
    const tok = await this.worker("Tokenize", { text: prompt, add_bos: true });
    const { ids, pieces, structural } = tok;
    if (ids.length < 2 || structural.every(Boolean)) throw new Error("the prompt has no text");
    const n = ids.length - 1; // the last prompt token is fed to the first Tick, not primed
    if (n > this.cfg.hardMaxRows) throw new Error(`the prompt has ${ids.length} tokens`);
    const created = await this.authority("CreateSession", {
      session_id: "",
      geometry: this.info.geometry,
      budget: { target_rows: this.cfg.targetRows, hard_max_rows: this.cfg.hardMaxRows },
      seed_brightness: this.policy.initialScore(),
    });
    const session = created.session;
    const chunks = await callWithRetry(
      () =>
        this.w.serverStream(
          "Prefill",
          {
            session_id: session.session_id,
            version: 0,
            token_ids: ids.slice(0, n),
            start_position: 0,
            expected_digest: session.digest,
          },
          10 * this.cfg.callTimeoutS,
        ),
      "Prefill",
      { timeoutS: this.cfg.retryTimeoutS },
    );
    const score = this.policy.initialScore();
    const ops = [];
    for (const chunk of chunks) {
      const first = chunk.first_token_index;
      const count = Number(chunk.kv.keys.shape[2]);
      // One Append per run of equal source: structural rows (BOS) are recorded as such.
      for (const [start, end] of runs(structural, first, first + count)) {
        const whole = start === first && end === first + count;
        ops.push({
          append: {
            position: start,
            token_ids: ids.slice(start, end),
            kv: whole ? chunk.kv : sliceKV(chunk.kv, start - first, end - first),
            pieces: pieces.slice(start, end),
            brightness: new Array(end - start).fill(score),
            source: structural[start] ? "TOKEN_SOURCE_STRUCTURAL" : "TOKEN_SOURCE_PROMPT",
          },
        });
      }
    }
    const resp = await this.patch(session.session_id, 0, ops, 10 * this.cfg.callTimeoutS);
    this.stats.maxRows = Math.max(this.stats.maxRows, resp.row_count);
    this.sessionId = session.session_id;
    this.pendingPiece = pieces[n];
    this.view = {
      version: resp.version,
      digest: resp.digest,
      tokenIds: ids.slice(0, n),
      structural: structural.slice(0, n),
      scores: new Array(n).fill(Math.fround(score)),
    };
    return ids[n];
  }

  async iterate(token, iteration, source) {
    const { policy, view } = this;
    const n = view.tokenIds.length;
    const structural = [...view.structural, false];
    const excess = n + 1 - this.cfg.targetRows;
    let pairs = [];
    let evictions = [];
    if (policy.merges && excess > 0) {
      // One tick behind: the committed scores (the previous tick's), the new row seeded.
      const plan = policy.plan([...view.scores, policy.initialScore()], structural, excess);
      pairs = plan.merges;
      evictions = plan.evictions.slice();
    }
    const tick = await this.worker("Tick", {
      session_id: this.sessionId,
      version: view.version,
      expected_digest: view.digest,
      input_token_id: token,
      sampling: {
        temperature: this.cfg.temperature,
        top_k: this.cfg.topK,
        top_p: this.cfg.topP,
        repetition_penalty: this.cfg.repetitionPenalty,
        seed: iterationSeed(this.cfg.seed, iteration),
      },
      attention_reduction: REDUCTIONS[this.cfg.attentionReduction],
      merges: pairs.map((p) => ({
        position: p,
        expected_token_ids: view.tokenIds.slice(p, p + 2),
      })),
      repair: this.repair,
    });
    if (tick.attention.length !== n + 1) {
      throw new Error(`attention row of ${tick.attention.length} values for ${n} rows + 1`);
    }
    const { scores, newScore } = policy.update(view.scores, tick.attention);
    const allScores = [...scores, newScore];
    if (!policy.merges && excess > 0) {
      evictions = policy.plan(allScores, structural, excess).evictions.slice();
    }
    const merges = [];
    pairs.forEach((p, k) => {
      const merge = tick.merges[k];
      if (merge.merged) {
        const score = policy.mergedScore(allScores, p);
        merges.push({ position: p, merge, tokenId: merge.token_id, score });
      } else {
        // No single token fits: the pair's dimmer row goes instead.
        evictions.push(allScores[p] <= allScores[p + 1] ? p : p + 1);
      }
    });
    evictions = [...new Set(evictions)].sort((x, y) => x - y);
    const ops = [];
    if (policy.keepsScores) {
      ops.push({ set_brightness: { expected_row_count: n, brightness: scores } });
    }
    for (const m of merges) {
      ops.push({
        replace_pair: {
          position: m.position,
          expected_token_ids: view.tokenIds.slice(m.position, m.position + 2),
          token_id: m.tokenId,
          kv: m.merge.kv,
          piece: m.merge.piece,
          brightness: m.score,
          replaced_text: m.merge.replaced_text,
        },
      });
    }
    for (const p of evictions) {
      ops.push({ evict: { position: p, expected_token_id: view.tokenIds[p] } });
    }
    ops.push({
      append: {
        position: n,
        token_ids: [token],
        kv: tick.input_kv,
        pieces: [this.pendingPiece],
        brightness: [newScore],
        source,
      },
    });
    const resp = await this.patch(this.sessionId, view.version, ops);
    this.view = applyEdits(view, {
      scores: scores.map(Math.fround),
      merges,
      evictions,
      appended: { token, score: Math.fround(newScore) },
      version: resp.version,
      digest: resp.digest,
    });
    if (this.view.tokenIds.length !== resp.row_count) {
      const rows = this.view.tokenIds.length;
      throw new Error(`driver expects ${rows} rows, authority has ${resp.row_count}`);
    }
    this.stats.merges += merges.length;
    this.stats.evictions += evictions.length;
    this.stats.maxRows = Math.max(this.stats.maxRows, resp.row_count);
    return tick;
  }

  async reread() {
    return viewFromSession(await this.authority("GetSession", { session_id: this.sessionId }));
  }

  // Generates cfg.maxNewTokens tokens after `prompt`; returns the final view and stats.
  async run(prompt) {
    await this.setUp();
    let token = await this.prime(prompt);
    let source = "TOKEN_SOURCE_PROMPT";
    const decoder = new TextDecoder("utf-8"); // invalid sequences become U+FFFD
    const eos = this.info.special_tokens.eos_token_id;
    let i = 0;
    let staleInARow = 0;
    while (i < this.cfg.maxNewTokens) {
      let tick;
      try {
        tick = await this.iterate(token, i, source);
      } catch (err) {
        if (err.code !== grpcStatus.ABORTED) throw err;
        // Another writer committed first: re-read the committed state and go on.
        this.stats.staleRetries++;
        if (++staleInARow > MAX_STALE_IN_A_ROW) throw err;
        this.view = await this.reread();
        continue;
      }
      i++;
      staleInARow = 0;
      this.stats.iterations = i;
      this.pendingPiece = tick.next_token_piece;
      source = "TOKEN_SOURCE_GENERATED";
      let text = decoder.decode(tick.next_token_bytes, { stream: true });
      if (tick.next_token_id === eos) text += decoder.decode() + "\n\n";
      if (text) this.onText(text);
      token = tick.next_token_id;
      if (this.cfg.stopAtEos && token === eos) break;
    }
    const tail = decoder.decode();
    if (tail) this.onText(tail);
    this.stats.consistent = sameView(await this.reread(), this.view);
    return { sessionId: this.sessionId, view: this.view, stats: this.stats };
  }
}

module.exports = { Loop, REDUCTIONS };
