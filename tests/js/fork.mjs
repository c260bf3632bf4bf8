// The unmodified JS SDK's fork (`sandbox.fork({ count })`): a sandbox holding a Python variable is
// forked into 3; each fork sees the variable, changes its own copy, and the source keeps its own.
// Usage: node fork.mjs (E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY set by the test); prints one
// JSON line of observations. Timeouts are an emulated host's (every call is slow there).
import { Sandbox } from "@e2b/code-interpreter";

const requestTimeoutMs = 900_000;
const template = process.env.CUBE_TEMPLATE || "code-interpreter";

async function run(sandbox, code) {
  const execution = await sandbox.runCode(code, { timeoutMs: requestTimeoutMs, requestTimeoutMs });
  if (execution.error) throw new Error(`${execution.error.name}: ${execution.error.value}`);
  return execution.logs.stdout.join("");
}

const source = await Sandbox.create(template, { timeoutMs: 3_600_000, requestTimeoutMs });
const forks = [];
const seen = { source: source.sandboxId, forks: [], errors: [] };
try {
  seen.marker = (await run(source, "import os\nmarker = os.urandom(8).hex()\nprint(marker)")).trim();
  const results = await source.fork({ count: 3, timeoutMs: 3_600_000, requestTimeoutMs });
  for (const result of results) {
    if (result instanceof Error) seen.errors.push(`${result.constructor.name}: ${result.message}`);
    else forks.push(result);
  }
  for (const fork of forks) {
    const saw = (await run(fork, "print(marker)")).trim();
    await run(fork, "marker = 'changed in this fork'");
    seen.forks.push({ id: fork.sandboxId, saw, isSandbox: fork instanceof Sandbox });
  }
  seen.sourceAfter = (await run(source, "print(marker)")).trim();
} finally {
  for (const sandbox of [...forks, source]) await sandbox.kill({ requestTimeoutMs });
  seen.checkpoints = [];
  for (const snapshot of await Sandbox.listSnapshots({ sandboxId: source.sandboxId }).nextItems()) {
    seen.checkpoints.push(snapshot.snapshotId);
  }
}
console.log(JSON.stringify(seen));
