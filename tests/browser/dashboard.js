#!/usr/bin/env node
// Drives veer's admin dashboard in headless Chromium (Debian's /usr/bin/chromium, through
// playwright-core; no browser is downloaded). Run by tests/dashboard.rs:
//
//   node tests/browser/dashboard.js --url http://127.0.0.1:PORT/ --route web \
//        [--token TOKEN] [--reason TEXT] [--screenshot FILE]
//
// Checks that the page loads with nothing fetched from another origin and no script error,
// shows the route and its charts, shows the admin API's 401 error for a command without the
// token (when --token is given), then types the token and clicks "abort" and waits for the
// page to show the route rolled back, and shows the 409 for a second "abort". Prints one JSON line with what it saw; exits non-zero
// with the reason on any failure.
"use strict";

const { chromium } = require("playwright-core");

function args() {
  const out = { chromium: process.env.CHROMIUM || "/usr/bin/chromium" };
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, "");
    if (argv[i + 1] === undefined) throw new Error("missing value for " + argv[i]);
    out[key] = argv[i + 1];
  }
  for (const k of ["url", "route"]) if (!out[k]) throw new Error("--" + k + " is required");
  return out;
}

async function main() {
  const opt = args();
  const origin = new URL(opt.url).origin;
  const browser = await chromium.launch({
    executablePath: opt.chromium,
    headless: true,
    timeout: 30000,
    // Playwright starts it with a fresh temporary profile (--user-data-dir) of its own.
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  const seen = { external: [], pageErrors: [], consoleErrors: [] };
  try {
    const page = await browser.newPage();
    page.setDefaultTimeout(15000);
    page.on("request", (r) => {
      const u = r.url();
      if (!u.startsWith(origin + "/") && !u.startsWith("data:")) seen.external.push(u);
    });
    page.on("pageerror", (e) => seen.pageErrors.push(String(e)));
    page.on("console", (m) => {
      // The 401 and 409 the test provokes on purpose are logged by Chromium as failed loads.
      if (m.type() === "error" && !/status of (401|409)/.test(m.text())) seen.consoleErrors.push(m.text());
    });

    const resp = await page.goto(opt.url, { waitUntil: "load" });
    if (!resp || resp.status() !== 200) throw new Error("GET " + opt.url + " answered " + (resp && resp.status()));
    const contentType = resp.headers()["content-type"] || "";
    if (!contentType.startsWith("text/html")) throw new Error("content-type " + contentType);
    const title = await page.title();

    const card = page.locator(`section.route[data-route="${opt.route}"]`);
    await card.locator(".name").filter({ hasText: opt.route }).waitFor();
    const heading = await page.getByRole("heading", { level: 2 }).filter({ hasText: opt.route }).textContent();
    const phase = card.locator(".phase");
    const phaseBefore = (await phase.textContent()).trim();
    if (phaseBefore === "rolled_back") throw new Error("the route is rolled back before any click");

    // Two polls at least: the weight line has a second point.
    await page.waitForFunction(
      (sel) => (document.querySelector(sel)?.getAttribute("d") || "").includes("L"),
      `section.route[data-route="${opt.route}"] .weight svg path`,
      { timeout: 15000 },
    );
    const versionRows = await card.locator(".versions tbody tr").count();
    const verdict = (await card.locator(".verdict").textContent()).trim();
    const ruleRows = await card.locator(".rules tbody tr").count();
    const conn = (await page.locator("#conn").textContent()).trim();

    const abort = card.getByRole("button", { name: "abort", exact: true });
    const msg = card.locator(".msg");
    let unauthorized = null;
    if (opt.token) {
      await abort.click();
      await msg.filter({ hasText: "HTTP 401" }).waitFor();
      unauthorized = (await msg.textContent()).trim();
      if ((await phase.textContent()).trim() === "rolled_back") throw new Error("abort without the token rolled back");
      await page.getByLabel("Admin token").fill(opt.token);
      const stored = await page.evaluate(() => sessionStorage.getItem("veer.adminToken"));
      if (stored !== opt.token) throw new Error("the token is not kept in sessionStorage");
    }
    if (opt.reason) await page.getByLabel("Reason").fill(opt.reason);
    await abort.click();
    await msg.filter({ hasText: "abort done" }).waitFor();
    const afterClick = (await msg.textContent()).trim();
    await page.waitForFunction(
      (sel) => document.querySelector(sel)?.textContent.trim() === "rolled_back",
      `section.route[data-route="${opt.route}"] .phase`,
      { timeout: 15000 },
    );
    const transition = (await card.locator(".transition").textContent()).trim();
    // A second abort is refused by the API (409); the page shows why.
    await abort.click();
    await msg.filter({ hasText: "HTTP 409" }).waitFor();
    const conflict = (await msg.textContent()).trim();
    if (opt.screenshot) await page.screenshot({ path: opt.screenshot, fullPage: true });

    if (seen.external.length) throw new Error("requests left the admin origin: " + seen.external.join(", "));
    if (seen.pageErrors.length) throw new Error("script errors: " + seen.pageErrors.join(" | "));
    if (seen.consoleErrors.length) throw new Error("console errors: " + seen.consoleErrors.join(" | "));

    console.log(JSON.stringify({
      ok: true,
      browser: browser.version(),
      title,
      heading: heading.replace(/\s+/g, " ").trim(),
      phase_before: phaseBefore,
      version_rows: versionRows,
      verdict,
      rule_rows: ruleRows,
      connection: conn,
      unauthorized,
      after_click: afterClick,
      phase_after: "rolled_back",
      transition,
      conflict,
    }));
  } finally {
    await browser.close();
  }
}

const watchdog = setTimeout(() => {
  console.error("dashboard.js: gave up after 90 s");
  process.exit(2);
}, 90000);

main().then(
  () => clearTimeout(watchdog),
  (e) => {
    console.error("dashboard.js: " + (e && e.stack ? e.stack : e));
    process.exit(1);
  },
);
