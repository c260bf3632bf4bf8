// The unmodified JS SDK's template builder against a service (E2B_API_URL etc. set by the test).
// Usage: node template_build.mjs <context dir> <image> <name:tag>; prints one JSON line of observations.
import { Sandbox, Template } from "e2b";

const [context, image, name] = process.argv.slice(2);
const logs = [];
const template = Template({ fileContextPath: context })
  .fromImage(image)
  .copy("app/", "/home/user/app")
  .runCmd("cat /home/user/app/hello.txt > /home/user/copied.txt && id -un > /home/user/who.txt")
  .setEnvs({ SDK_GREETING: "from the js sdk" })
  .setWorkdir("/home/user/app");
await Template.build(template, name, { cpuCount: 1, memoryMB: 512, onBuildLogs: (entry) => logs.push(entry.message) });
const sandbox = await Sandbox.create(name, { timeoutMs: 120_000 });
let stdout;
try {
  const result = await sandbox.commands.run(
    "pwd; cat hello.txt; echo $SDK_GREETING; cat ../copied.txt ../who.txt; sub/tool.sh; stat -c %U hello.txt",
  );
  stdout = result.stdout;
} finally {
  await sandbox.kill();
}
let failure = null;
try {
  await Template.build(Template().fromImage(image).runCmd("echo js-step-output; exit 4"), "js-broken");
} catch (error) {
  failure = { type: error.constructor.name, message: String(error.message) };
}
console.log(
  JSON.stringify({
    logs,
    stdout,
    exists: await Template.exists(name.split(":")[0]),
    brokenExists: await Template.exists("js-broken"),
    failure,
  }),
);
