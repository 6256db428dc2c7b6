#!/usr/bin/env node
// positronic-generate: the Python `positronic generate` against running services, in Node.js.
// stdout is exactly the text (the prompt, its continuation, a newline), as the Python CLI
// prints it; --print-digest adds one JSON line on stderr with the session's final version and
// digest, which equal the Python CLI's for the same settings.
"use strict";

const fs = require("node:fs");
const { parseArgs } = require("node:util");
const { connect } = require("./lib/services");
const { Loop, REDUCTIONS } = require("./lib/loop");
const { POLICY_NAMES } = require("./lib/policies");

const USAGE = `usage: node generate.js --authority HOST:PORT --worker HOST:PORT
    (--prompt TEXT | --prompt-file FILE) [--tokens N] [--policy ${POLICY_NAMES.join("|")}]
    [--target-size N] [--hard-max N] [--seed S] [--temperature T] [--top-k K] [--top-p P]
    [--repetition-penalty R] [--attention-reduction ${Object.keys(REDUCTIONS).join("|")}]
    [--recent-window N] [--stop-at-eos] [--no-echo-prompt] [--print-digest]
Defaults as the Python CLI's: --tokens 256, --policy halo, --target-size 96, --hard-max
target + 32, --seed 0, --temperature 0.8 (0 is greedy), --top-k 0, --top-p 0.95.`;

const OPTIONS = {
  authority: { type: "string" },
  worker: { type: "string" },
  prompt: { type: "string" },
  "prompt-file": { type: "string" },
  tokens: { type: "string", default: "256" },
  "max-new-tokens": { type: "string" }, // the Python CLI's name for --tokens
  policy: { type: "string", default: "halo" },
  "target-size": { type: "string", default: "96" },
  "hard-max": { type: "string", default: "0" },
  seed: { type: "string", default: "0" },
  temperature: { type: "string", default: "0.8" },
  "top-k": { type: "string", default: "0" },
  "top-p": { type: "string", default: "0.95" },
  "repetition-penalty": { type: "string", default: "1.0" },
  "attention-reduction": { type: "string", default: "last" },
  "recent-window": { type: "string" },
  "stop-at-eos": { type: "boolean", default: false },
  "no-echo-prompt": { type: "boolean", default: false },
  "print-digest": { type: "boolean", default: false },
  help: { type: "boolean", short: "h", default: false },
};

class UsageError extends Error {}

function number(values, name, integer) {
  const text = values[name];
  const value = Number(text);
  if (text.trim() === "" || !Number.isFinite(value) || (integer && !Number.isInteger(value))) {
    const kind = integer ? "an integer" : "a number";
    throw new UsageError(`--${name}: not ${kind}: ${text.slice(0, 64)}`);
  }
  return value;
}

function parse(argv) {
  const { values } = parseArgs({ args: argv, options: OPTIONS, strict: true });
  if (values.help) return null;
  if (!values.authority || !values.worker) throw new UsageError("give --authority and --worker");
  if ((values.prompt === undefined) === (values["prompt-file"] === undefined)) {
    throw new UsageError("give one of --prompt and --prompt-file");
  }
  if (!POLICY_NAMES.includes(values.policy)) {
    throw new UsageError(`--policy: one of ${POLICY_NAMES}`);
  }
  if (!(values["attention-reduction"] in REDUCTIONS)) {
    throw new UsageError(`--attention-reduction: one of ${Object.keys(REDUCTIONS)}`);
  }
  if (values["max-new-tokens"] !== undefined) values.tokens = values["max-new-tokens"];
  const targetRows = number(values, "target-size", true);
  const hardMax = number(values, "hard-max", true);
  const config = {
    policy: values.policy,
    overrides: {},
    targetRows,
    hardMaxRows: hardMax === 0 ? targetRows + 32 : hardMax,
    maxNewTokens: number(values, "tokens", true),
    seed: number(values, "seed", true),
    temperature: number(values, "temperature", false),
    topK: number(values, "top-k", true),
    topP: number(values, "top-p", false),
    repetitionPenalty: number(values, "repetition-penalty", false),
    attentionReduction: values["attention-reduction"],
    stopAtEos: values["stop-at-eos"],
    retryTimeoutS: 60,
    callTimeoutS: 30,
  };
  if (values["recent-window"] !== undefined) {
    config.overrides.recent_window = number(values, "recent-window", true);
  }
  if (!(2 <= config.targetRows && config.targetRows <= config.hardMaxRows)) {
    throw new UsageError("need 2 <= --target-size <= --hard-max");
  }
  if (config.maxNewTokens < 0) throw new UsageError("--tokens must be >= 0");
  const prompt =
    values.prompt !== undefined ? values.prompt : fs.readFileSync(values["prompt-file"], "utf8");
  return { values, config, prompt };
}

async function main(argv) {
  let args;
  try {
    args = parse(argv);
  } catch (err) {
    process.stderr.write(`${err.message}\n${USAGE}\n`);
    return 2;
  }
  if (args === null) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  const { values, config, prompt } = args;
  const services = connect(values.authority, values.worker);
  // The prompt goes out with the first text, so that nothing is printed for a failed start.
  let echo = values["no-echo-prompt"] ? "" : prompt;
  const write = (text) => {
    process.stdout.write(echo + text);
    echo = "";
  };
  try {
    const { sessionId, view, stats } = await new Loop(services, config, write).run(prompt);
    process.stdout.write(`${echo}\n`);
    process.stderr.write(
      `${stats.iterations} tokens, ${stats.merges} merges, ${stats.evictions} evictions, ` +
        `max rows ${stats.maxRows}/${config.hardMaxRows}\n`,
    );
    if (!stats.consistent) process.stderr.write("warning: the view differs from the mirror\n");
    if (values["print-digest"]) {
      const summary = {
        session_id: sessionId,
        version: view.version,
        digest: view.digest.toString("hex"),
        iterations: stats.iterations,
        merges: stats.merges,
        evictions: stats.evictions,
        max_rows: stats.maxRows,
        consistent: stats.consistent,
      };
      process.stderr.write(`${JSON.stringify(summary)}\n`);
    }
    return stats.consistent ? 0 : 1;
  } catch (err) {
    const code = err.code !== undefined ? ` (gRPC code ${err.code})` : "";
    process.stderr.write(`error${code}: ${err.details || err.message}\n`);
    return 1;
  } finally {
    services.authority.close();
    services.worker.close();
  }
}

main(process.argv.slice(2)).then((rc) => {
  process.exitCode = rc;
});
