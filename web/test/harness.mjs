// What the browser tests share: dist/ served on a free loopback port (with extra files, such as
// a config.json), Debian's Chromium (/usr/bin/chromium, or $CHROMIUM) through Playwright, and
// the wait for the page to show every photo processed.
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import { extname, join } from "node:path";
import { tmpdir } from "node:os";
import { chromium } from "playwright-core";

const dist = new URL("../dist/", import.meta.url).pathname;
const types = { ".html": "text/html", ".js": "text/javascript", ".map": "application/json", ".json": "application/json" };

/** Serves dist/ plus `extra` ({"/config.json": "..."}); resolves to the server and its URL. */
export async function serveDist(extra = {}) {
  const server = createServer(async (request, response) => {
    const path = new URL(request.url, "http://x").pathname.replace(/^\/$/, "/index.html");
    try {
      const body = extra[path] ?? (await readFile(join(dist, path.replace(/\.\.+/g, ""))));
      response.writeHead(200, { "content-type": types[extname(path)] ?? "application/octet-stream" });
      response.end(body);
    } catch {
      response.writeHead(404).end();
    }
  });
  return { server, url: await listen(server) };
}

/** Listens on a free loopback port; resolves to `http://127.0.0.1:PORT`. */
export async function listen(server) {
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return `http://127.0.0.1:${server.address().port}`;
}

export function launchChromium() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: [
      "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
}

/** Collects the page's console lines and errors, for a failure's report. */
export function consoleOf(page) {
  const lines = [];
  page.on("console", (m) => lines.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => lines.push(`pageerror: ${e.message}`));
  return lines;
}

/** Reports why the page did not get there: the error, a screenshot in $TMPDIR, its console. */
export async function reportFailure(page, name, error, lines) {
  const shot = join(tmpdir(), `follow-${name}-${Date.now()}.png`);
  await page.screenshot({ path: shot, fullPage: true });
  console.error(`the page did not show every image processed: ${error.message}\nscreenshot: ${shot}\n${lines.join("\n")}`);
}

/** Waits until the page shows `n` images, every one DONE with its preview loaded, and the route
 * READY; rejects after 60 s. */
export function waitForEveryPhotoProcessed(page, n) {
  return page.waitForFunction(
    (n) => {
      const rows = [...document.querySelectorAll(".image-row")];
      return (
        document.querySelector("#route-status")?.textContent === "READY" &&
        rows.length === n &&
        rows.every((row) => {
          const img = row.querySelector("img.preview");
          return row.querySelector(".stage")?.textContent?.startsWith("DONE") && img?.complete && img.naturalWidth > 0;
        })
      );
    },
    n,
    { timeout: 60_000, polling: 100 },
  );
}
