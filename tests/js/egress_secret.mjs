// The unmodified JS SDK: a secret, a sandbox whose network.rules name it, one request from inside.
// Usage: node egress_secret.mjs <secret value> <ruled host> <probe.py path> <probes JSON>
// (E2B_API_URL etc. set by the test); prints one JSON line of observations.
import { readFileSync } from "node:fs";
import { Sandbox, Secret } from "e2b";

const [value, host, probePath, probes] = process.argv.slice(2);
await Secret.create("js-key", value);
const header = { "X-Api-Key": Secret.fill("js-key") };
const sandbox = await Sandbox.create({
  network: { allowOut: [host], rules: { [host]: [{ transform: { headers: header } }] } },
  timeoutMs: 300_000,
});
let results, env, info;
try {
  await sandbox.files.write("/tmp/probe.py", readFileSync(probePath, "utf8"));
  const run = await sandbox.commands.run(`python3 /tmp/probe.py '${probes}'`, { timeoutMs: 120_000 });
  results = JSON.parse(run.stdout);
  env = (await sandbox.commands.run("env")).stdout;
  info = await sandbox.getInfo();
} finally {
  await sandbox.kill();
}
let unknown = null;
try {
  await Sandbox.create({ network: { rules: { [host]: [{ transform: { headers: { "X-Api-Key": Secret.fill("nope") } } }] } } });
} catch (error) {
  unknown = { type: error.constructor.name, message: String(error.message) };
}
console.log(JSON.stringify({ results, env, rules: info.network?.rules ?? null, unknown }));
