// Browser test of the `hexveil simulate --html` page: headless Chromium (Debian's package,
// driven by playwright-core) opens the file and checks its charts, that it makes no request
// besides itself and that nothing errors.
//
// Env: PAGE (required: the HTML file), CHROMIUM (default /usr/bin/chromium),
// UPDATE_SCREENSHOT=1 to (re)write docs/simulate.png. Run by `cargo test --test simulate`,
// or by hand: `PAGE=/tmp/sim.html node tests/browser/simulate.test.mjs`.
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { chromium } from "playwright-core";

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, "..", "..");
const file = process.env.PAGE;
if (!file) {
  console.error("PAGE must name the HTML file written by `hexveil simulate --html`");
  process.exit(2);
}
const url = pathToFileURL(path.resolve(file)).href;
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const checks = [];
const check = (name) => { checks.push(name); console.log("ok - " + name); };

const profile = mkdtempSync(path.join(tmpdir(), "hexveil-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  viewport: { width: 1280, height: 900 },
});
const requests = [];
const problems = [];
context.on("request", (r) => requests.push(r.url()));
const page = context.pages()[0] || await context.newPage();
page.setDefaultTimeout(15000);
page.on("pageerror", (e) => problems.push("page error: " + e.message));
page.on("console", (m) => { if (m.type() === "error" || m.type() === "warning") problems.push(m.text()); });

let failed = false;
try {
  await page.goto(url);
  assert.match(await page.title(), /^hexveil simulate: /);
  check("page loads: " + (await page.title()));

  const bars = await page.locator("#histogram rect.bar").count();
  assert.ok(bars >= 2, `the histogram draws bars (got ${bars})`);
  const tall = await page.locator("#histogram rect.bar").evaluateAll(
    (rs) => rs.filter((r) => r.getBBox().height > 1).length);
  assert.ok(tall >= 2, "some histogram bars have height");
  check(`notifications-per-device histogram: ${bars} bars`);

  const reasons = await page.locator("#outcomes text").allTextContents();
  for (const r of ["NONE", "DWELL_NOT_MET", "DAILY_CAP"]) {
    assert.ok(reasons.includes(r), `the outcome chart names ${r}`);
  }
  assert.ok(await page.locator("#outcomes rect.bar").count() >= 6, "outcome bars");
  check("withheld-by-reason bars name " + reasons.filter((t) => /^[A-Z_]+$/.test(t)).length + " outcomes");

  const series = page.locator("svg.series");
  assert.equal(await series.count(), 2, "one released-vs-true chart per config");
  for (let i = 0; i < 2; i++) {
    const s = series.nth(i);
    const d = await s.locator("path.band").getAttribute("d");
    assert.ok(d && d.split("L").length >= 20, "a 95% band over the day");
    assert.ok(await s.locator("polyline.truth").count() === 1, "the true count line");
    assert.ok(await s.locator("circle.released").count() >= 10, "released points");
  }
  check("released vs true counts with 95% bands, for both configs");

  const rows = await page.locator("table tbody tr").count();
  assert.ok(rows >= 30, `the table holds every figure (${rows} rows)`);
  assert.match(await page.locator("table").textContent(), /ε the schedule spends per day/);
  check(`figures table: ${rows} rows`);

  if (process.env.UPDATE_SCREENSHOT === "1") {
    mkdirSync(path.join(repo, "docs"), { recursive: true });
    await page.screenshot({ path: path.join(repo, "docs", "simulate.png"), fullPage: false });
    check("screenshot written to docs/simulate.png");
  }

  await page.setViewportSize({ width: 390, height: 844 });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 1, `no horizontal scrolling at phone width (overflow ${overflow}px)`);
  check("readable at phone width");

  assert.deepEqual(requests.filter((u) => u !== url), [], "no request besides the page itself");
  assert.deepEqual(problems, [], "no page errors, console errors or warnings");
  check("no outside request, no error");
} catch (e) {
  failed = true;
  console.error("FAILED: " + (e && e.stack ? e.stack : e));
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
console.log(`${checks.length} passed, ${failed ? 1 : 0} failed`);
process.exit(failed ? 1 : 0);
