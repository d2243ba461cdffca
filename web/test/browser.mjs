// The demo page in headless Chromium against a real stack: sign in with a dev token, choose
// photos, create the route, and wait until the page shows every image processed (stage DONE,
// preview loaded) and the route READY. Serves dist/ itself on a free loopback port.
//
//   node test/browser.mjs API_URL TOKEN PHOTO...
//
// Prints a JSON summary; exits non-zero (with a screenshot in $TMPDIR) when the page does not
// get there within the deadline.
import { consoleOf, launchChromium, reportFailure, serveDist, waitForEveryPhotoProcessed } from "./harness.mjs";

const [api, token, ...photos] = process.argv.slice(2);
if (!api || !token || photos.length === 0) {
  console.error("usage: node test/browser.mjs API_URL TOKEN PHOTO...");
  process.exit(2);
}
const { server, url } = await serveDist();
const page_url = `${url}/?api=${encodeURIComponent(api)}&token=${encodeURIComponent(token)}`;

const browser = await launchChromium();
let failed = false;
try {
  const page = await browser.newPage();
  const lines = consoleOf(page);
  await page.goto(page_url);
  await page.setInputFiles("#files", photos);
  await page.click("#start");
  try {
    await waitForEveryPhotoProcessed(page, photos.length);
  } catch (e) {
    failed = true;
    await reportFailure(page, "browser", e, lines);
  }
  const summary = await page.evaluate(() => ({
    route: document.querySelector("#route-status")?.textContent,
    error: document.querySelector("#error")?.textContent,
    imageTypes: document.body.dataset.imageTypes,
    images: [...document.querySelectorAll(".image-row")].map((row) => ({
      id: row.dataset.imageId,
      stage: row.querySelector(".stage")?.textContent,
      uploaded: row.querySelector("progress")?.value,
      preview: row.querySelector("img.preview")?.naturalWidth ?? 0,
      placeholder: row.querySelector("img.preview")?.style.backgroundImage.startsWith('url("data:image/png') ?? false,
      previewType: row.querySelector("img.preview")?.dataset.type,
    })),
  }));
  console.log(JSON.stringify(summary));
} finally {
  await browser.close();
  server.close();
}
process.exit(failed ? 1 : 0);
