// The unmodified JS SDK: a volume written by one sandbox is read by the next; bad input meanwhile.
// Usage: node volume_mounts.mjs (E2B_API_URL, E2B_SANDBOX_URL, E2B_VOLUME_API_URL set by the test);
// prints one JSON line of observations.
import { Sandbox, Volume } from "e2b";

async function failure(promise) {
  try {
    await promise;
    return null;
  } catch (error) {
    return { type: error.constructor.name, message: String(error.message) };
  }
}

const volume = await Volume.create("js-work");
await volume.writeFile("/seed.txt", "from the js content client");
const first = await Sandbox.create({ volumeMounts: { "/mnt/data": volume }, timeoutMs: 300_000 });
let seed, bad;
try {
  seed = (await first.commands.run("cat /mnt/data/seed.txt")).stdout;
  await first.files.write("/mnt/data/out/result.txt", "written in js sandbox 1");
  bad = {
    outsideVolume: await failure(volume.readFile("/../../../etc/passwd")),
    outsideMountRoot: await failure(Sandbox.create({ volumeMounts: { "/etc/data": volume } })),
    secondMount: await failure(Sandbox.create({ volumeMounts: { "/mnt/other": "js-work" } })),
    destroyWhileMounted: await failure(Volume.destroy(volume.volumeId)),
    missingVolume: await failure(Sandbox.create({ volumeMounts: { "/mnt/x": "no-such-volume" } })),
  };
  bad.firstStillRuns = (await first.commands.run("cat /mnt/data/out/result.txt")).stdout;
} finally {
  await first.kill();
}
const second = await Sandbox.create({ volumeMounts: { "/home/user/vol": "js-work" }, timeoutMs: 300_000 });
let read;
try {
  read = await second.files.read("/home/user/vol/out/result.txt");
} finally {
  await second.kill();
}
const destroyed = await Volume.destroy(volume.volumeId);
const afterDestroy = await failure(Sandbox.create({ volumeMounts: { "/mnt/data": "js-work" } }));
console.log(JSON.stringify({ seed, bad, read, destroyed, afterDestroy }));
