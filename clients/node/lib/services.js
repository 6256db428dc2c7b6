// The two services from the .proto files alone: loaded at run time with @grpc/proto-loader (no
// generated code), one client per service, promise-returning calls, retries with backoff.
"use strict";

const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "..", "protos");
const PROTO_FILES = ["positronic/v1/cache_authority.proto", "positronic/v1/model_worker.proto"];

// Field names as the .proto spells them; int64 as JS numbers (ids, versions and row counts are
// far below 2^53; the one uint64 that is not, SamplingParams.seed, is sent as a Long-like
// {low, high, unsigned}); enums by name; bytes as Buffers; absent fields read as their defaults.
const LOADER_OPTIONS = {
  keepCase: true,
  longs: Number,
  enums: String,
  bytes: Buffer,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTO_ROOT],
};

// A peer that is down or restarting, or a call past its deadline, is retried; anything else
// (ABORTED included: it names a version the loop must re-read) goes back to the caller.
const RETRYABLE = new Set([grpc.status.UNAVAILABLE, grpc.status.DEADLINE_EXCEEDED]);

function loadPackage() {
  const definition = protoLoader.loadSync(PROTO_FILES, LOADER_OPTIONS);
  return grpc.loadPackageDefinition(definition).positronic.v1;
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// Calls fn() (a promise) again with exponential backoff while it fails with a retryable code,
// for at most timeoutS seconds.
async function callWithRetry(fn, what, { timeoutS = 60, firstDelayS = 0.05, maxDelayS = 2 } = {}) {
  const deadline = Date.now() + timeoutS * 1000;
  let delay = firstDelayS;
  for (let attempt = 1; ; attempt++) {
    try {
      return await fn();
    } catch (err) {
      if (!RETRYABLE.has(err.code) || Date.now() + delay * 1000 > deadline) throw err;
      process.stderr.write(`${what} failed (${err.code}), retry ${attempt} in ${delay}s\n`);
      await sleep(delay * 1000);
      delay = Math.min(delay * 2, maxDelayS);
    }
  }
}

function deadlineIn(seconds) {
  return new Date(Date.now() + seconds * 1000);
}

// One stub per service. `unary(name, request, timeoutS)` and `serverStream(...)` (all messages
// as an array) return promises; `clientStream` writes every message, then half-closes.
class Service {
  constructor(Ctor, address, credentials) {
    this.stub = new Ctor(address, credentials);
  }

  unary(method, request, timeoutS) {
    return new Promise((resolve, reject) => {
      this.stub[method](request, { deadline: deadlineIn(timeoutS) }, (err, resp) =>
        err ? reject(err) : resolve(resp),
      );
    });
  }

  serverStream(method, request, timeoutS) {
    return new Promise((resolve, reject) => {
      const out = [];
      const call = this.stub[method](request, { deadline: deadlineIn(timeoutS) });
      call.on("data", (msg) => out.push(msg));
      call.on("error", reject);
      call.on("end", () => resolve(out));
    });
  }

  clientStream(method, messages, timeoutS) {
    return new Promise((resolve, reject) => {
      const call = this.stub[method]({ deadline: deadlineIn(timeoutS) }, (err, resp) =>
        err ? reject(err) : resolve(resp),
      );
      for (const m of messages) call.write(m);
      call.end();
    });
  }

  close() {
    this.stub.close();
  }
}

// Clients of one authority and one worker (plaintext; the services' TLS and bearer token are
// not wired in this example client).
function connect(authorityAddress, workerAddress) {
  const v1 = loadPackage();
  const credentials = grpc.credentials.createInsecure();
  return {
    authority: new Service(v1.CacheAuthority, authorityAddress, credentials),
    worker: new Service(v1.ModelWorker, workerAddress, credentials),
  };
}

module.exports = { callWithRetry, connect, grpcStatus: grpc.status };
