// A resumable upload from the demo page in headless Chromium, its connection cut mid-upload: the
// page's requests to the gateway go through a TCP proxy here, which cuts the first connection
// that has carried more than a third of the photo. The page must end showing the image processed
// and the route READY, the upload resumed (a PATCH at a non-zero offset, after a HEAD), never
// started over (one POST).
//
//   node test/resume.mjs API_URL TOKEN PHOTO
//
// Prints a JSON summary; exits non-zero (with a screenshot in $TMPDIR) when the page does not
// get there within the deadline.
import { createServer, connect } from "node:net";
import { statSync } from "node:fs";
import { consoleOf, launchChromium, listen, reportFailure, serveDist, waitForEveryPhotoProcessed } from "./harness.mjs";

const [api, token, photo] = process.argv.slice(2);
if (!api || !token || !photo) {
  console.error("usage: node test/resume.mjs API_URL TOKEN PHOTO");
  process.exit(2);
}
const cutAfter = Math.floor(statSync(photo).size / 3);
const tus = { POST: 0, HEAD: 0, PATCH: 0, resumedAt: [], cut: 0 };

// The proxy: the gateway's address is learnt from the first upload request.
let gateway;
const proxy = createServer((client) => {
  const upstream = connect(gateway.port, gateway.hostname);
  let sent = 0;
  client.on("data", (bytes) => {
    sent += bytes.length;
    if (tus.cut === 0 && sent > cutAfter) {
      tus.cut += 1;
      client.destroy();
      upstream.destroy();
      return;
    }
    upstream.write(bytes);
  });
  upstream.on("data", (bytes) => client.write(bytes));
  for (const [a, b] of [[client, upstream], [upstream, client]]) {
    a.on("end", () => b.end());
    a.on("error", () => b.destroy());
  }
});
const proxyUrl = new URL(await listen(proxy));

const { server, url } = await serveDist();
const page_url = `${url}/?api=${encodeURIComponent(api)}&token=${encodeURIComponent(token)}`;
const browser = await launchChromium();
let failed = false;
try {
  const page = await browser.newPage();
  await page.route(
    (u) => u.pathname.startsWith("/upload"),
    (route) => {
      const request = route.request();
      const target = new URL(request.url());
      gateway ??= { hostname: target.hostname, port: Number(target.port) };
      if (request.method() in tus) tus[request.method()] += 1;
      const offset = Number(request.headers()["upload-offset"] ?? 0);
      if (request.method() === "PATCH" && offset > 0) tus.resumedAt.push(offset);
      target.host = proxyUrl.host;
      return route.continue({ url: target.toString() });
    },
  );
  const lines = consoleOf(page);
  await page.goto(page_url);
  await page.setInputFiles("#files", [photo]);
  await page.click("#start");
  try {
    await waitForEveryPhotoProcessed(page, 1);
  } catch (e) {
    failed = true;
    await reportFailure(page, "resume", e, lines);
  }
  const summary = await page.evaluate(() => ({
    route: document.querySelector("#route-status")?.textContent,
    error: document.querySelector("#error")?.textContent,
    stage: document.querySelector(".image-row .stage")?.textContent,
    uploaded: document.querySelector(".image-row progress")?.value,
  }));
  console.log(JSON.stringify({ ...summary, tus }));
} finally {
  await browser.close();
  server.close();
  proxy.close();
}
process.exit(failed ? 1 : 0);
