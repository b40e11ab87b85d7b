#!/usr/bin/env node
// Headless-Chromium check of the chat page that `fastkv serve` serves at /.
//
// Usage:
//   node tests/browser/chat_page.mjs --url http://127.0.0.1:PORT/ --screenshot OUT.png [--api-key KEY]
//     [--timeout SECONDS (default 60)] [--chromium /usr/bin/chromium]
//
// Setup once: (cd tests/browser && npm ci); Chromium from Debian: apt-get install -y chromium.
//
// It opens the page, pastes a document into #document, types a question into #input,
// clicks #send, waits until a div.msg.assistant has text and document.body.dataset.state is
// "idle" again, checks that #kv shows a KV-cache figure, saves a full-page screenshot and prints
// one line of JSON {"answer": ..., "kv": ...}. Exit 0 on success; on failure prints why, exit 1.

import { chromium } from "playwright-core";

// Long enough (over 256 tokens) for the server to treat it as a document and, with an
// eviction policy, compress it; the figure in #kv then shows what that saved.
const DOCUMENT = [
  "Kemmerton is a small river town. The Zorblat river flows through Kemmerton from north to " +
  "south. The town is known for its blue bridge, built in 1911, and for a yearly apple fair " +
  "held every October on the east bank of the river.",
  "The town hall stands on Market Square. It was designed by the architect Ilse Varga and " +
  "finished in 1887. Its clock tower has four faces and rings every quarter hour. The square " +
  "holds a farmers' market on Tuesdays and Saturdays, where growers from the valley sell " +
  "cheese, honey, pears and smoked fish.",
  "Kemmerton has two schools: the Riverside Primary School, with about 240 pupils, and the " +
  "Old Mill Secondary School, which occupies a converted flour mill by the weir. The library " +
  "on Chapel Street lends books, maps and tools, and opens late on Thursdays.",
  "The railway reached Kemmerton in 1902. Trains run to the county town every hour, and the " +
  "journey takes 35 minutes. A ferry crosses the Zorblat below the blue bridge from April to " +
  "September; in winter the crossing is made by the bridge alone.",
  "The local football club, Kemmerton Rovers, plays in green and white at the Meadow Ground. " +
  "Its best season was 1974, when it reached the county cup final. The cricket club shares " +
  "the pavilion and plays on Sunday afternoons in summer.",
].join("\n\n");
const QUESTION = "Which river flows through Kemmerton?";

function parseArgs(argv) {
  const opts = { url: null, screenshot: null, apiKey: null, timeout: 60, chromium: "/usr/bin/chromium" };
  const names = { "--url": "url", "--screenshot": "screenshot", "--api-key": "apiKey",
                  "--timeout": "timeout", "--chromium": "chromium" };
  for (let i = 0; i < argv.length; i++) {
    const key = names[argv[i]];
    if (!key || i + 1 >= argv.length) throw new Error(`bad argument: ${argv[i]}`);
    opts[key] = argv[++i];
  }
  if (!opts.url || !opts.screenshot) throw new Error("--url and --screenshot are required");
  opts.timeout = Number(opts.timeout);
  if (!(opts.timeout > 0)) throw new Error("--timeout must be a positive number of seconds");
  return opts;
}

async function run(opts, log) {
  const browser = await chromium.launch({
    executablePath: opts.chromium,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    timeout: 30_000,
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1200, height: 800 } });
    page.on("console", (m) => { if (m.type() === "error") log.push("console error: " + m.text()); });
    page.on("pageerror", (e) => log.push("page error: " + e.message));
    page.on("requestfailed", (r) => log.push(`request failed: ${r.method()} ${r.url()} ${r.failure()?.errorText}`));

    const resp = await page.goto(opts.url, { waitUntil: "load", timeout: 15_000 });
    if (!resp) throw new Error("no response for " + opts.url);
    const ctype = resp.headers()["content-type"] || "";
    if (resp.status() !== 200) throw new Error(`GET ${opts.url}: HTTP ${resp.status()}`);
    if (!ctype.startsWith("text/html")) throw new Error(`GET ${opts.url}: content-type "${ctype}", want text/html`);

    for (const id of ["#messages", "#input", "#send", "#stop", "#reset", "#document", "#kv", "#apikey"]) {
      if ((await page.locator(id).count()) !== 1) throw new Error(`page has no single ${id} element`);
    }
    const state0 = await page.evaluate(() => document.body.dataset.state);
    if (state0 !== "idle") throw new Error(`body data-state is "${state0}" after load, want "idle"`);

    if (opts.apiKey) {
      await page.fill("#apikey", opts.apiKey);
      await page.locator("#apikey").dispatchEvent("change");  // the page stores it in localStorage
    }
    await page.fill("#document", DOCUMENT);
    await page.fill("#input", QUESTION);
    await page.click("#send");

    // Done when an assistant message has text and the page is idle again, or when it shows an error.
    const handle = await page.waitForFunction(() => {
      const err = document.querySelector("#messages .msg.error");
      if (err && document.body.dataset.state === "idle") return { error: err.textContent };
      const msgs = document.querySelectorAll("#messages .msg.assistant");
      const last = msgs[msgs.length - 1];
      if (!last || document.body.dataset.state !== "idle") return null;
      // The model's text, without the page's own notes (span.note: "(empty reply)", "[stopped]").
      const text = [...last.childNodes]
        .filter((n) => !(n.classList && n.classList.contains("note")))
        .map((n) => n.textContent).join("").trim();
      return text ? { answer: text } : { error: `empty assistant reply ("${last.textContent}")` };
    }, null, { timeout: opts.timeout * 1000, polling: 100 }).catch(async (e) => {
      const state = await page.evaluate(() => document.body.dataset.state).catch(() => "?");
      throw new Error(`no finished reply within ${opts.timeout}s (state "${state}"): ${e.message.split("\n")[0]}`);
    });
    const result = await handle.jsonValue();
    if (result.error) {
      await page.screenshot({ path: opts.screenshot, fullPage: true }).catch(() => {});
      throw new Error("page shows an error: " + result.error);
    }

    const users = await page.locator("#messages .msg.user").allTextContents();
    if (!users.some((t) => t.includes(QUESTION))) throw new Error("question not shown as a div.msg.user");

    const kv = (await page.locator("#kv").textContent() || "").trim();
    if (!/KV cache \d+(\.\d+)? (KiB|MiB|GiB)/.test(kv)) throw new Error(`#kv shows no KV figure: "${kv}"`);

    await page.screenshot({ path: opts.screenshot, fullPage: true });
    return { answer: result.answer, kv };
  } finally {
    await browser.close().catch(() => {});
  }
}

const log = [];
let opts;
try {
  opts = parseArgs(process.argv.slice(2));
} catch (e) {
  console.error("chat_page: " + e.message);
  console.error("usage: node tests/browser/chat_page.mjs --url URL --screenshot OUT.png [--api-key KEY] [--timeout S]");
  process.exit(1);
}
// Last-resort guard so a wedged browser can never hang the caller.
const watchdog = setTimeout(() => {
  console.error("chat_page: FAIL: overall timeout");
  process.exit(1);
}, (opts.timeout + 60) * 1000);
try {
  const summary = await run(opts, log);
  clearTimeout(watchdog);
  console.log(JSON.stringify(summary));
  process.exit(0);
} catch (e) {
  clearTimeout(watchdog);
  console.error("chat_page: FAIL: " + (e && e.message ? e.message : e));
  for (const line of log) console.error("  " + line);
  process.exit(1);
}
