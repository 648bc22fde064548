// The Access Tokens page in a real browser: headless Chromium (Debian's
// /usr/bin/chromium) driven by playwright-core. Run by
// tests/integration/browser.rs, which starts the server and answers the
// lines this script prints (`SECRET …`, `REVOKED …`, `SIGNED_OUT …`) on
// stdin once it has checked them over gRPC. Screenshots of each step go to
// $SCREENSHOTS; the token list's also to $DOCS_PNG (the README's).

import { createRequire } from "node:module";
import { mkdtempSync, copyFileSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import readline from "node:readline";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const web = env("WEB_URL");
const username = env("WEB_USERNAME");
const password = env("WEB_PASSWORD");
const shots = env("SCREENSHOTS");
const docsPng = env("DOCS_PNG");
const require = createRequire(path.join(env("NODE_TOOLS"), "package.json"));
const { chromium } = require("playwright-core");

const lines = readline.createInterface({ input: process.stdin });
const answers = lines[Symbol.asyncIterator]();
/** Prints `line` and waits for the Rust side's answer. */
async function ask(line) {
  console.log(line);
  const { value, done } = await answers.next();
  if (done || value.trim() !== "ok") throw new Error(`${line.split(" ")[0]}: ${value}`);
}

mkdirSync(shots, { recursive: true });
let step = 0;
async function shot(page, name) {
  step += 1;
  const file = path.join(shots, `${String(step).padStart(2, "0")}-${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  return file;
}
function expect(condition, what) {
  if (!condition) throw new Error(`expected: ${what}`);
}

// A fresh profile (Playwright's way of passing --user-data-dir).
const context = await chromium.launchPersistentContext(
  mkdtempSync(path.join(tmpdir(), "identity-browser-")),
  {
    executablePath: "/usr/bin/chromium",
    args: ["--no-sandbox"],
    headless: true,
    viewport: { width: 1280, height: 800 },
  },
);
const page = context.pages()[0] ?? (await context.newPage());
try {
  page.on("pageerror", (err) => {
    throw err;
  });

  // Sign in.
  await page.goto(`${web}/sign-in`);
  await shot(page, "sign-in");
  await page.getByLabel("Username").fill(username);
  await page.getByLabel("Password").fill(password);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.waitForURL(`${web}/tokens`);
  await shot(page, "signed-in");

  // A token to revoke later.
  await page.getByRole("link", { name: "Create a token" }).click();
  await page.getByLabel("Name", { exact: true }).fill("nightly backup");
  await page.getByLabel("90 days").check();
  await page.getByRole("button", { name: "Create token" }).click();
  const other = await page.locator("#secret").inputValue();
  expect(other.length > 20, "the other token's secret");

  // A scoped one-time token, limited to one project.
  await page.goto(`${web}/tokens/new`);
  await page.getByLabel("Name", { exact: true }).fill("deploy script");
  await page.getByLabel("tokens:read").check();
  await page.getByLabel("Other scopes").fill("projects:read");
  await page.getByLabel("Resources", { exact: true }).fill("projects/3f9c2a");
  await page.getByLabel("7 days").check();
  await page.getByLabel("Uses allowed").fill("1");
  await shot(page, "create-form");
  // From the keyboard: the form works without a pointer. (A click right
  // after a full-page screenshot of a page taller than the viewport can
  // land before Chromium has restored the viewport, and miss.)
  await page.getByRole("button", { name: "Create token" }).focus();
  await page.keyboard.press("Enter");
  const secret = await page.locator("#secret").inputValue();
  expect(secret.length > 20, "the secret is on the page");
  expect(await page.getByRole("button", { name: "Copy to clipboard" }).isVisible(), "the copy button, with JavaScript");
  await shot(page, "secret-shown-once");
  // The Rust side verifies it (its one use) over gRPC.
  await ask(`SECRET ${secret}`);

  // The list shows it exhausted.
  await page.goto(`${web}/tokens`);
  const row = page.locator("tr", { hasText: "deploy script" });
  expect((await row.innerText()).includes("exhausted"), "the one-time token is exhausted");
  copyFileSync(await shot(page, "token-list"), docsPng);

  // Revoke the other one, after the confirmation.
  await page.getByRole("link", { name: "Revoke nightly backup" }).click();
  await shot(page, "revoke-confirmation");
  await page.getByRole("button", { name: "Revoke nightly backup" }).click();
  await page.waitForURL(`${web}/tokens`);
  expect((await page.locator("tr", { hasText: "nightly backup" }).innerText()).includes("revoked"), "revoked on the page");
  await ask(`REVOKED ${other}`);

  // Sign out: the old cookie no longer works.
  const session = (await context.cookies()).find((c) => c.name === "identity-session");
  expect(session && session.httpOnly && session.sameSite === "Strict", "an HttpOnly, SameSite=Strict session cookie");
  await page.getByRole("button", { name: "Sign out" }).click();
  await page.waitForURL(`${web}/sign-in`);
  await shot(page, "signed-out");
  await context.addCookies([session]);
  await page.goto(`${web}/tokens`);
  expect(page.url() === `${web}/sign-in`, "the old cookie leads to the sign-in form");
  await ask(`SIGNED_OUT ${session.value}`);
  console.log("DONE");
} catch (err) {
  await shot(page, "failed");
  console.error(`the page at the failure: ${page.url()}\n${await page.locator("main").innerText()}`);
  throw err;
} finally {
  await context.close();
  lines.close();
}
