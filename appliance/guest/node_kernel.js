// A small JavaScript kernel for the Cube agent: one Node.js process per context.
// Requests arrive as JSON lines on stdin; replies leave as JSON lines on the pipe
// whose descriptor is in CUBE_REPLY_FD, so
// whatever user code writes to process.stdout cannot corrupt the protocol.
"use strict";
const fs = require("fs");
const readline = require("readline");
const repl = require("repl");
const { PassThrough } = require("stream");
const util = require("util");

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

// Cells run through Node's own REPL evaluator: the value of the last expression comes back,
// top-level `await` works (the REPL rewrites such cells, keeping their declarations global),
// and `let`/`const`/`class` persist between cells, as in a notebook.
const replOutput = new PassThrough();
const evaluator = repl.start({
  input: new PassThrough(),
  output: replOutput,
  prompt: "",
  terminal: false,
  useGlobal: true,
});
let pendingCell = null; // resolves the running cell when the REPL reports its error
const NO_ERROR = Symbol("no error"); // lastError before a cell (`throw undefined` is possible)

// A failing cell is not called back: the REPL hands the error to its domain, which stores it in
// `lastError` and writes it to the REPL's output. That write is how we learn the cell failed.
replOutput.on("data", () => {
  if (pendingCell !== null && evaluator.lastError !== NO_ERROR) {
    const settle = pendingCell;
    pendingCell = null;
    settle({ error: evaluator.lastError });
  }
});

function evaluate(code) {
  return new Promise((settle) => {
    evaluator.lastError = NO_ERROR;
    pendingCell = settle;
    evaluator.eval(code, evaluator.context, "<cell>", (error, value) => {
      if (pendingCell !== settle) return;
      pendingCell = null;
      // An incomplete cell comes back as the REPL's Recoverable, wrapping the real SyntaxError.
      settle(error ? { error: error.err instanceof Error ? error.err : error } : { value });
    });
  });
}

// The user's frames only: everything from the first frame of the REPL or this kernel on is ours.
function userTraceback(error) {
  const lines = String(error.stack || error).split("\n");
  const ours = lines.findIndex((line) => /^\s+at .*(node:|REPLServer|node_kernel\.js)/.test(line));
  return (ours === -1 ? lines : lines.slice(0, ours)).join("\n");
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
    const outcome = await evaluate(request.code);
    let value = outcome.value;
    if (!("error" in outcome) && value && typeof value.then === "function") value = await value;
    if ("error" in outcome) throw outcome.error;
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
      traceback: isError ? userTraceback(error) : String(error),
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
