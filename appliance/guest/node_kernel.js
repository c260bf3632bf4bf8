// A small JavaScript (and TypeScript) kernel for the Cube agent: one Node.js process per context.
// Requests arrive as JSON lines on stdin; replies leave as JSON lines on the pipe
// whose descriptor is in CUBE_REPLY_FD, so
// whatever user code writes to process.stdout cannot corrupt the protocol.
// With CUBE_LANGUAGE=typescript, cells are TypeScript: the `typescript` package (Debian's
// node-typescript) strips the types first, one cell at a time (no type checking).
"use strict";
const fs = require("fs");
const Module = require("module");
const path = require("path");
const readline = require("readline");
const repl = require("repl");
const { PassThrough } = require("stream");
const util = require("util");

const replies = fs.createWriteStream(null, { fd: Number(process.env.CUBE_REPLY_FD) });
const typescript = process.env.CUBE_LANGUAGE === "typescript";
delete process.env.CUBE_REPLY_FD;
delete process.env.CUBE_LANGUAGE;
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
// Cells resolve modules as a script in the context's directory would (its node_modules first).
globalThis.require = Module.createRequire(path.join(process.cwd(), "<cell>"));
globalThis.module = module;

// Packages of the system's Node.js (Debian installs them in /usr/share/nodejs, which a Node.js
// from elsewhere does not search), loaded on first use.
const SYSTEM_MODULE_DIRS = ["/usr/share/nodejs", "/usr/lib/nodejs", "/usr/local/lib/node_modules", "/usr/lib/node_modules"];
function systemModule(name) {
  try {
    return require(name);
  } catch (error) {
    for (const dir of SYSTEM_MODULE_DIRS) {
      if (fs.existsSync(path.join(dir, name))) return require(path.join(dir, name));
    }
    throw error;
  }
}

// TypeScript → JavaScript, keeping ES modules and top-level await (the import rewrite and the
// REPL take it from there). Syntax errors are the cell's error; types are not checked.
let ts = null;
function stripTypes(code) {
  ts = ts || systemModule("typescript");
  const output = ts.transpileModule(code, {
    compilerOptions: { target: ts.ScriptTarget.ES2022, module: ts.ModuleKind.ESNext, sourceMap: false },
    reportDiagnostics: true,
  });
  const errors = (output.diagnostics || []).filter((d) => d.category === ts.DiagnosticCategory.Error);
  if (errors.length > 0) {
    throw new SyntaxError(errors.map((d) => ts.flattenDiagnosticMessageText(d.messageText, "\n")).join("\n"));
  }
  return output.outputText;
}

// Node's REPL runs scripts, where `import ... from` is a syntax error: static imports become
// dynamic ones (`var {a, b: c} = await import("m")`, so a re-run cell may import again) and
// `export` is dropped from declarations. Cells that do not parse as a module stay as they are,
// for the REPL to report their error.
let acorn = null;
function rewriteModuleSyntax(code) {
  if (!/\b(import|export)\b/.test(code)) return code;
  acorn = acorn || systemModule("acorn");
  let program;
  try {
    program = acorn.parse(code, {
      ecmaVersion: "latest",
      sourceType: "module",
      allowAwaitOutsideFunction: true,
      allowReturnOutsideFunction: true,
      allowHashBang: true,
    });
  } catch (error) {
    return code;
  }
  let rewritten = "";
  let from = 0;
  for (const node of program.body) {
    const replacement = moduleStatement(code, node);
    if (replacement === null) continue;
    const lineBreaks = code.slice(node.start, node.end).split("\n").length - 1;
    rewritten += code.slice(from, node.start) + replacement + "\n".repeat(lineBreaks);
    from = node.end;
  }
  return rewritten + code.slice(from);
}

function moduleStatement(code, node) {
  if (node.type === "ImportDeclaration") {
    const source = `await import(${JSON.stringify(node.source.value)})`;
    const names = [];
    for (const specifier of node.specifiers) {
      if (specifier.type === "ImportNamespaceSpecifier") return `var ${specifier.local.name} = ${source};`;
      const imported = specifier.type === "ImportDefaultSpecifier" ? "default" : moduleName(specifier.imported);
      names.push(imported === specifier.local.name ? imported : `${JSON.stringify(imported)}: ${specifier.local.name}`);
    }
    return names.length ? `var { ${names.join(", ")} } = ${source};` : `${source};`;
  }
  if (node.type === "ExportNamedDeclaration" || node.type === "ExportDefaultDeclaration") {
    return node.declaration ? code.slice(node.declaration.start, node.declaration.end) : "";
  }
  if (node.type === "ExportAllDeclaration") return "";
  return null;
}

function moduleName(node) {
  return node.type === "Literal" ? String(node.value) : node.name;
}

function prepare(code) {
  return rewriteModuleSyntax(typescript ? stripTypes(code) : code);
}

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
    const outcome = await evaluate(prepare(request.code));
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
