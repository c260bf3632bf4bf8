// A small JavaScript kernel for the Cube agent: one Node.js process per context.
// Requests arrive as JSON lines on stdin; replies leave as JSON lines on the pipe
// whose descriptor is in CUBE_REPLY_FD, so
// whatever user code writes to process.stdout cannot corrupt the protocol.
"use strict";
const fs = require("fs");
const readline = require("readline");
const util = require("util");
const vm = require("vm");

const replies = fs.createWriteStream(null, { fd: Number(process.env.CUBE_REPLY_FD) });
delete process.env.CUBE_REPLY_FD;
let current = null; // id of the execution whose output is being collected
let executionCount = 0;

function reply(message) {
  replies.write(JSON.stringify(message) + "\n");
}

function emitOutput(stream, args) {
  const text = util.format(...args) + "\n";
  if (current === null) {
    (stream === "stderr" ? process.stderr : process.stdout).write(text);
  } else {
    reply({ id: current, type: stream, text });
  }
}

globalThis.console = {
  ...console,
  log: (...args) => emitOutput("stdout", args),
  info: (...args) => emitOutput("stdout", args),
  debug: (...args) => emitOutput("stdout", args),
  warn: (...args) => emitOutput("stderr", args),
  error: (...args) => emitOutput("stderr", args),
};
globalThis.require = require;
globalThis.module = module;

function compile(code) {
  try {
    return new vm.Script(code, { filename: "<cell>" });
  } catch (error) {
    // Top-level await is not valid in a script: run such cells as an async function body.
    if (error instanceof SyntaxError && /await/.test(code)) {
      return new vm.Script(`(async () => {\n${code}\n})()`, { filename: "<cell>" });
    }
    throw error;
  }
}

async function execute(request) {
  current = request.id;
  executionCount += 1;
  const saved = {};
  for (const [key, value] of Object.entries(request.env || {})) {
    saved[key] = process.env[key];
    process.env[key] = value;
  }
  try {
    let value = compile(request.code).runInThisContext();
    if (value && typeof value.then === "function") value = await value;
    if (value !== undefined) {
      reply({ id: request.id, type: "result", text: util.inspect(value), is_main_result: true });
    }
  } catch (error) {
    const isError = error instanceof Error;
    reply({
      id: request.id,
      type: "error",
      name: isError ? error.name : "Error",
      value: isError ? error.message : String(error),
      traceback: isError && error.stack ? error.stack : String(error),
    });
  } finally {
    for (const [key, value] of Object.entries(saved)) {
      if (value === undefined) delete process.env[key];
      else process.env[key] = value;
    }
    reply({ id: request.id, type: "done", execution_count: executionCount });
    current = null;
  }
}

// Executions run one after another, like cells.
let queue = Promise.resolve();
readline.createInterface({ input: process.stdin }).on("line", (line) => {
  const request = JSON.parse(line);
  if (request.type === "env") {
    queue = queue.then(() => Object.assign(process.env, request.vars));
  } else if (request.type === "execute") {
    queue = queue.then(() => execute(request));
  }
});
process.on("unhandledRejection", (error) => emitOutput("stderr", [error]));
reply({ type: "ready" });
