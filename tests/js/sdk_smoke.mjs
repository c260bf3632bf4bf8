// The unmodified JS SDK against the guest agent in debug mode (localhost:49983 / :49999).
// Usage: E2B_DEBUG=true node sdk_smoke.mjs <scratch dir>; prints one JSON line of observations.
import { Sandbox } from "@e2b/code-interpreter";

const scratch = process.argv[2];
const sandbox = await Sandbox.create();
const execution = await sandbox.runCode("x = 6 * 7\nprint('from js sdk')\nx");
const command = await sandbox.commands.run("echo commands-ok");
await sandbox.files.write(`${scratch}/js.txt`, "written by js");
const content = await sandbox.files.read(`${scratch}/js.txt`);
let missing = null;
try {
  await sandbox.files.read(`${scratch}/missing.txt`);
} catch (error) {
  missing = error.constructor.name;
}
console.log(
  JSON.stringify({
    stdout: execution.logs.stdout,
    text: execution.text,
    command: command.stdout,
    exitCode: command.exitCode,
    content,
    missing,
  }),
);
