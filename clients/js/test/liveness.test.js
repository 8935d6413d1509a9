// Dead-connection detection without WebSocket pings: a frozen node (SIGSTOP) answers nothing;
// the client's JSON ping goes unanswered and the connection is replaced once the node thaws.

import { test } from "node:test";
import assert from "node:assert/strict";

import { startNode, client, connected, once, sleep } from "./helpers.js";

test("an unanswered JSON ping closes the connection (4000) and the client reconnects", async () => {
  const node = await startNode(); // embedded broker, ping interval 1 s
  const c = client(node, { pingMargin: 300, pongTimeout: 700, connectTimeout: 1000 });
  try {
    await connected(c);
    // An idle but healthy connection stays up: pongs answer the pings.
    let drops = 0;
    c.on("disconnected", () => drops++);
    await sleep(3000);
    assert.equal(drops, 0, "an idle live connection is kept");

    await node.freeze();
    const stoppedAt = Date.now();
    const d = await once(c, "disconnected", 6000);
    const detectedIn = Date.now() - stoppedAt;
    console.log(`# dead connection detected ${detectedIn} ms after SIGSTOP (limit 1000+300+700 ms + tick)`);
    assert.deepEqual(d, { code: 4000, reason: "ping timeout", willReconnect: true });
    assert.ok(detectedIn <= 1000 + 300 + 700 + 600, `${detectedIn} ms`);
    const back = once(c, "connected", 10000);
    node.thaw();
    await back;
    assert.equal(c.state, "connected");
  } finally {
    node.thaw();
    c.close();
    await node.kill();
  }
});
