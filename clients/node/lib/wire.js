// Wire helpers: KV blocks sliced along N, a Patch as a stream of messages, the per-iteration
// sampling seed as a uint64, request ids.
"use strict";

const crypto = require("node:crypto");

const ITEM_SIZE = {
  DTYPE_FLOAT32: 4,
  DTYPE_FLOAT16: 2,
  DTYPE_BFLOAT16: 2,
  DTYPE_INT64: 8,
  DTYPE_INT32: 4,
};
// Ops per Patch message are batched up to about this many bytes (the authority's messages may
// be larger, up to 64 MiB, but a large prime travels in pieces: end_of_patch commits them).
const MAX_CHUNK_BYTES = 2 * 1024 * 1024;

// Rows [a, b) of a Tensor shaped [L, H, N, D] (row-major, so each (l, h) holds N rows of D).
function sliceRows(tensor, a, b) {
  const [L, H, N, D] = tensor.shape.map(Number);
  const item = ITEM_SIZE[tensor.dtype];
  if (!item) throw new Error(`unknown dtype ${tensor.dtype}`);
  const rowBytes = D * item;
  const parts = [];
  for (let lh = 0; lh < L * H; lh++) {
    const base = lh * N * rowBytes;
    parts.push(tensor.data.subarray(base + a * rowBytes, base + b * rowBytes));
  }
  return { dtype: tensor.dtype, shape: [L, H, b - a, D], data: Buffer.concat(parts) };
}

function sliceKV(kv, a, b) {
  return { keys: sliceRows(kv.keys, a, b), values: sliceRows(kv.values, a, b) };
}

// An upper-bound estimate of an op's encoded size: its tensor bytes plus a margin per field.
function opBytes(op) {
  const body = op.append || op.replace_pair || op.evict || op.set_brightness;
  let n = 64;
  if (body.kv) n += body.kv.keys.data.length + body.kv.values.data.length + 64;
  for (const key of ["token_ids", "brightness", "expected_token_ids"]) {
    if (body[key]) n += 11 * body[key].length;
  }
  for (const piece of body.pieces || []) n += Buffer.byteLength(piece) + 6;
  if (body.piece) n += Buffer.byteLength(body.piece) + 6;
  if (body.replaced_text) n += Buffer.byteLength(body.replaced_text) + 6;
  return n;
}

// The messages of one Patch: the header on each, ops batched, end_of_patch on the last.
function patchMessages(sessionId, expectedVersion, requestId, ops) {
  const header = {
    session_id: sessionId,
    expected_version: expectedVersion,
    request_id: requestId,
  };
  const messages = [];
  let batch = [];
  let size = 0;
  for (const op of ops) {
    const bytes = opBytes(op);
    if (batch.length && size + bytes > MAX_CHUNK_BYTES) {
      messages.push({ ...header, ops: batch });
      batch = [];
      size = 0;
    }
    batch.push(op);
    size += bytes;
  }
  messages.push({ ...header, ops: batch, end_of_patch: true });
  return messages;
}

const U64 = 1n << 64n;
const GOLDEN = 0x9e3779b97f4a7c15n; // 2^64 / golden ratio: spreads consecutive seeds apart

// The seed of iteration i's draw: (seed * 0x9E3779B97F4A7C15 + i) mod 2^64, as the Python loop
// computes it. A uint64 past 2^53, so it is sent as {low, high, unsigned} (protobufjs's Long).
function iterationSeed(seed, iteration) {
  const v = (((BigInt(seed) * GOLDEN + BigInt(iteration)) % U64) + U64) % U64;
  return {
    low: Number(v & 0xffffffffn) | 0,
    high: Number(v >> 32n) | 0,
    unsigned: true,
  };
}

// A fresh idempotency key: 32 hex digits (PatchRequest.request_id allows [A-Za-z0-9._:-]).
function requestId() {
  return crypto.randomUUID().replace(/-/g, "");
}

module.exports = { iterationSeed, patchMessages, requestId, sliceKV };
