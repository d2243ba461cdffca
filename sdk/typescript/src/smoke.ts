/**
 * The SDK against a running stack, as a browser would use it (grpc-web + fetch):
 * `node dist/smoke.js API_URL TOKEN PHOTO.jpg` creates a route, watches it, uploads the photo,
 * and prints one JSON line per event until the route is READY. Exits non-zero on any surprise.
 * The end-to-end suite runs it.
 */
import { readFile } from "node:fs/promises";
import { RouteStatus, Stage, followClients, upload } from "./index.js";

const [apiUrl, token, photo] = process.argv.slice(2);
if (!apiUrl || !token || !photo) {
  console.error("usage: node dist/smoke.js API_URL TOKEN PHOTO.jpg");
  process.exit(2);
}
const follow = followClients(apiUrl, () => token);
const bytes = await readFile(photo);
const { route, uploadTargets } = await follow.routes.createRouteWithWaypoints({
  requestId: `sdk-smoke-${Date.now()}-${Math.random()}`,
  name: "sdk smoke test",
  waypoints: [{ markerX: 0.5, markerY: 0.25, contentType: "image/jpeg", fileSize: BigInt(bytes.length) }],
});
if (!route || uploadTargets.length !== 1) throw new Error("no route or upload target");
const stages: string[] = [];
let uploaded: Promise<unknown> | undefined;
let previewUrl = "";
for await (const update of follow.images.watchImageStatus({ target: { case: "routeId", value: route.id } })) {
  const event = update.event;
  console.log(JSON.stringify({ cursor: update.cursor, event: event.case }));
  if (event.case === "imageProgress") {
    stages.push(Stage[event.value.stage]);
    // The watch is live: now upload.
    uploaded ??= upload(uploadTargets[0].uploadUrl, bytes, "image/jpeg");
  } else if (event.case === "imageProcessed") {
    previewUrl = event.value.previewUrl;
  } else if (event.case === "imageFailed") {
    throw new Error(`image failed: ${event.value.errorMessage}`);
  } else if (event.case === "routeReady") {
    if (event.value.route?.status !== RouteStatus.READY) throw new Error("route not READY");
    break;
  }
}
await uploaded;
const preview = await fetch(previewUrl);
const result = { stages, previewStatus: preview.status, previewType: preview.headers.get("content-type") };
console.log(JSON.stringify(result));
if (!stages.includes("DONE") || preview.status !== 200) process.exit(1);
