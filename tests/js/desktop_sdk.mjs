// The unmodified JS @e2b/desktop SDK drives a `desktop` sandbox: screenshot, mouse, keyboard.
// Usage: node desktop_sdk.mjs (E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY set by the test:
// tests/browser/test_desktop_uml.py); prints one JSON line of observations.
import { Sandbox } from "@e2b/desktop";

const desktop = await Sandbox.create({ timeoutMs: 600_000 });
const seen = {};
try {
  const png = await desktop.screenshot();
  seen.pngHead = Buffer.from(png.slice(0, 8)).toString("hex");
  seen.pngSize = [Buffer.from(png).readUInt32BE(16), Buffer.from(png).readUInt32BE(20)];
  await desktop.moveMouse(345, 123);
  seen.cursor = await desktop.getCursorPosition();
  seen.screen = await desktop.getScreenSize();
  // Typed into a window: xterm running `cat` into a file.
  await desktop.commands.run("xterm -e 'cat > /tmp/typed-js.txt'", { background: true });
  const window = (await desktop.commands.run("xdotool search --sync --onlyvisible --class xterm | head -1")).stdout.trim();
  await desktop.commands.run(`xdotool windowactivate --sync ${window}`);
  await desktop.write("typed through @e2b/desktop");
  await desktop.press("enter");
  await desktop.press(["ctrl", "d"]);
  seen.typed = (
    await desktop.commands.run(
      "for i in $(seq 50); do [ -s /tmp/typed-js.txt ] && break; sleep 0.2; done; cat /tmp/typed-js.txt",
    )
  ).stdout.trim();
} finally {
  await desktop.kill();
}
console.log(JSON.stringify(seen));
