// The follow demo page: one route with a waypoint per chosen photo, resumable uploads (tus) with
// progress bars, every stage of every image live (WatchImageStatus over grpc-web), previews when
// processed.
// Settings come from `?api=…&token=…`, else from `config.json` beside the page (`./dev up` writes
// it), else the defaults of `./dev up`. The dev token of `config.json` is bound to its own API on
// loopback: it is never sent anywhere else, whatever `?api=` or the API field say.
import {
  ConnectError,
  MetadataKind,
  OutputRole,
  Stage,
  browserImageTypes,
  contentTypeOf,
  followClients,
  pickFile,
  placeholderDataURL,
  uploadResumable,
} from "../../sdk/typescript/src/index.js";

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;
const apiInput = $<HTMLInputElement>("api");
const tokenInput = $<HTMLInputElement>("token");
const files = $<HTMLInputElement>("files");
const start = $<HTMLButtonElement>("start");
const rows = $<HTMLTableSectionElement>("images");

/** The image types this browser shows, found once (and written on the page's body). */
const imageTypes = browserImageTypes();
void imageTypes.then((types) => (document.body.dataset.imageTypes = [...types].join(",")));

const LOOPBACK = new Set(["127.0.0.1", "localhost", "[::1]"]);

function originOf(url: string): string | undefined {
  try {
    return new URL(url).origin;
  } catch {
    return undefined;
  }
}

/** The dev token `./dev up` served, and the one API it may go to (a loopback address). */
let devToken: { token: string; api: string } | undefined;

/** Whether `token` may be sent to `api`: any token the user gave, the dev token only to its API. */
function maySend(api: string, token: string): boolean {
  return devToken?.token !== token || originOf(api) === originOf(devToken.api);
}

async function settings(): Promise<{ api: string; token: string }> {
  const query = new URLSearchParams(location.search);
  let saved: { api?: string; token?: string } = {};
  try {
    const response = await fetch("config.json");
    if (response.ok) saved = await response.json();
  } catch {
    // No config.json: the page was opened from somewhere else; the fields decide.
  }
  const note = $("token-note");
  if (saved.token && saved.api && LOOPBACK.has(new URL(saved.api).hostname)) {
    devToken = { token: saved.token, api: saved.api };
    note.textContent = `The dev token of ./dev up (user "dev") is sent only to ${saved.api}, on this machine.`;
  }
  const api = query.get("api") ?? saved.api ?? "http://127.0.0.1:8080";
  let token = query.get("token") ?? devToken?.token ?? "";
  if (!maySend(api, token)) {
    token = "";
    note.textContent += ` Paste a token for ${api}.`;
  }
  return { api, token };
}

function showError(error: unknown) {
  const message = error instanceof ConnectError ? `${error.code}: ${error.rawMessage}` : String(error);
  $("error").textContent = message;
}

/** A resumable upload (tus, through the SDK) that shows its progress: a dropped connection resumes. */
function upload(url: string, file: File, progress: HTMLProgressElement): Promise<void> {
  return uploadResumable(url, file, {
    onProgress: (sent, total) => {
      progress.value = total > 0 ? sent / total : 0;
    },
  }).then(() => {
    progress.value = 1;
  });
}

async function run() {
  $("error").textContent = "";
  const chosen = Array.from(files.files ?? []);
  if (chosen.length === 0) return showError("choose at least one photo");
  if (!maySend(apiInput.value, tokenInput.value)) {
    return showError(`the dev token is only sent to ${devToken?.api}: paste a token for ${apiInput.value}`);
  }
  const follow = followClients(apiInput.value, () => tokenInput.value);
  const { route, uploadTargets } = await follow.routes.createRouteWithWaypoints({
    requestId: crypto.randomUUID(),
    name: `${chosen.length} photos`,
    waypoints: chosen.map((file, i) => ({
      markerX: (i + 1) / (chosen.length + 1),
      markerY: 0.5,
      contentType: contentTypeOf(file),
      fileSize: BigInt(file.size),
    })),
  });
  if (!route) throw new Error("no route in the answer");
  $("route-id").textContent = route.id;
  $("route-status").textContent = "PENDING";
  const byImage = new Map<string, HTMLTableRowElement>();
  uploadTargets.forEach((target, i) => {
    const row = rows.insertRow();
    row.className = "image-row";
    row.dataset.imageId = target.imageId;
    row.insertCell().textContent = chosen[i].name;
    row.insertCell().append(Object.assign(document.createElement("progress"), { max: 1, value: 0 }));
    row.insertCell().className = "stage";
    row.insertCell().className = "preview-cell";
    byImage.set(target.imageId, row);
  });
  let uploads: Promise<void[]> | undefined;
  const watch = follow.images.watchImageStatus({ target: { case: "routeId", value: route.id } });
  for await (const { event } of watch) {
    // The first event means the watch is live: nothing the uploads cause can be missed.
    uploads ??= Promise.all(
      uploadTargets.map((target, i) => {
        const progress = byImage.get(target.imageId)!.querySelector("progress")!;
        return upload(target.uploadUrl, chosen[i], progress);
      }),
    );
    uploads.catch(showError);
    switch (event.case) {
      case "imageProgress": {
        const stage = byImage.get(event.value.imageId)?.querySelector(".stage");
        if (stage) stage.textContent = Stage[event.value.stage];
        break;
      }
      case "imageProcessed": {
        const row = byImage.get(event.value.image?.id ?? "");
        if (!row) break;
        // The privacy manifest: what the photo carried and lost, by name.
        const stripped = (event.value.image?.strippedMetadata ?? []).map((kind) =>
          MetadataKind[kind].toLowerCase().replaceAll("_", " "),
        );
        row.querySelector(".stage")!.textContent =
          stripped.length > 0 ? `DONE (removed: ${stripped.join(", ")})` : "DONE";
        // The smallest preview this browser shows (JPEG or WebP: equal quality, fewer bytes).
        const file = event.value.image && pickFile(event.value.image, OutputRole.PREVIEW, await imageTypes);
        const img = Object.assign(document.createElement("img"), {
          className: "preview",
          src: file?.url ?? event.value.previewUrl,
          alt: "preview",
        });
        img.dataset.type = file?.contentType ?? "";
        // The placeholder shows until the preview has loaded over it.
        const placeholder = placeholderDataURL(event.value.image?.thumbhash ?? new Uint8Array());
        if (placeholder) {
          img.style.backgroundImage = `url(${placeholder})`;
          img.style.backgroundSize = "cover";
        }
        row.querySelector(".preview-cell")!.replaceChildren(img);
        break;
      }
      case "imageFailed": {
        const stage = byImage.get(event.value.imageId)?.querySelector(".stage");
        if (stage) {
          stage.textContent = `FAILED: ${event.value.errorMessage}`;
          stage.classList.add("failed");
        }
        break;
      }
      case "routeReady":
        $("route-status").textContent = "READY";
        break;
    }
  }
}

const initial = await settings();
apiInput.value = initial.api;
tokenInput.value = initial.token;
start.addEventListener("click", () => {
  start.disabled = true;
  run()
    .catch(showError)
    .finally(() => (start.disabled = false));
});
