// The dev token `./dev up` serves in config.json never leaves for another origin: the page is
// opened with config.json naming API A (loopback) and the token, and an API B that records
// every request it gets. With `?api=B` the token field stays empty; with the API field changed
// to B by hand the page refuses to send; only A ever sees the token (the control shows the
// recorders would have seen it).
//
//   node test/token-binding.mjs PHOTO
//
// Prints a JSON summary of what each recorder saw.
import { createServer } from "node:http";
import { launchChromium, listen, serveDist } from "./harness.mjs";

const [photo] = process.argv.slice(2);
if (!photo) {
  console.error("usage: node test/token-binding.mjs PHOTO");
  process.exit(2);
}
const TOKEN = "dev-token-that-must-stay-home";

/** An API stand-in that answers CORS preflights (so the real request follows) and records. */
async function recorder() {
  const seen = [];
  const server = createServer((request, response) => {
    seen.push(JSON.stringify(request.headers));
    response.writeHead(request.method === "OPTIONS" ? 204 : 404, {
      "access-control-allow-origin": "*",
      "access-control-allow-headers": "*",
      "access-control-allow-methods": "POST",
    });
    response.end();
  });
  const url = await listen(server);
  return { server, url, requests: () => seen.length, sawToken: () => seen.some((h) => h.includes(TOKEN)) };
}

const [a, b] = [await recorder(), await recorder()];
const page = await serveDist({ "/config.json": JSON.stringify({ api: a.url, token: TOKEN }) });
const browser = await launchChromium();
const summary = {};
try {
  const tab = await browser.newPage();
  const attempt = async (query, api) => {
    await tab.goto(`${page.url}/${query}`);
    await tab.waitForFunction(() => document.querySelector("#api").value !== "");
    const token = await tab.inputValue("#token");
    if (api) await tab.fill("#api", api);
    await tab.setInputFiles("#files", [photo]);
    await tab.click("#start");
    await tab.waitForFunction(() => document.querySelector("#error").textContent !== "", null, { timeout: 15_000 });
    return { token, note: await tab.textContent("#token-note"), error: await tab.textContent("#error") };
  };
  summary.queryApi = await attempt(`?api=${encodeURIComponent(b.url)}`);
  summary.queryApi.bRequests = b.requests();
  summary.editedApi = await attempt("", b.url);
  summary.control = await attempt("");
  summary.aSawToken = a.sawToken();
  summary.bSawToken = b.sawToken();
} finally {
  await browser.close();
  for (const s of [a.server, b.server, page.server]) s.close();
}
console.log(JSON.stringify(summary));
