// The declarations name every export of the module (a drift check without a TypeScript compiler).

import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";

import * as mod from "../src/index.js";

test("index.d.ts declares every export of src/index.js", () => {
  const dts = readFileSync(new URL("../index.d.ts", import.meta.url), "utf8");
  for (const name of Object.keys(mod)) {
    assert.match(dts, new RegExp(`export (declare )?(class|function) ${name}\\b`), name);
  }
});
