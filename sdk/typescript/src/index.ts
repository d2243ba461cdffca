/**
 * The follow SDK for browsers and Node: the generated messages and service descriptors of
 * `proto/` (protobuf-es), and clients over grpc-web (connect-es) with the user's token attached.
 *
 * ```ts
 * const follow = followClients("http://127.0.0.1:8080", () => token);
 * const { route, uploadTargets } = await follow.routes.createRouteWithWaypoints({ ... });
 * for await (const update of follow.images.watchImageStatus({ target: { case: "routeId", value: route!.id } })) { ... }
 * await uploadResumable(uploadTargets[0].uploadUrl, file, { onProgress: (sent, total) => ... });
 * ```
 */
import { createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { thumbHashToDataURL } from "thumbhash";
import { Upload } from "tus-js-client";
import { ImageService } from "./gen/follow/api/v1/image_service_pb.js";
import { RouteService } from "./gen/follow/api/v1/route_service_pb.js";
import { GatewayService } from "./gen/follow/gateway/v1/gateway_service_pb.js";
import type { Image, ImageFile } from "./gen/follow/api/v1/types_pb.js";
import type { OutputRole } from "./gen/follow/events/v1/events_pb.js";

export { Code, ConnectError } from "@connectrpc/connect";
export * from "./gen/follow/api/v1/image_service_pb.js";
export * from "./gen/follow/api/v1/route_service_pb.js";
export * from "./gen/follow/api/v1/types_pb.js";
export * from "./gen/follow/events/v1/events_pb.js";
export * from "./gen/follow/gateway/v1/gateway_service_pb.js";

export interface FollowClients {
  routes: Client<typeof RouteService>;
  images: Client<typeof ImageService>;
}

/** Clients of `follow-api` at `baseUrl`, sending `Bearer <token()>` with every call. */
export function followClients(baseUrl: string, token: () => string): FollowClients {
  const bearer: Interceptor = (next) => async (request) => {
    request.header.set("authorization", `Bearer ${token()}`);
    return next(request);
  };
  const transport = createGrpcWebTransport({ baseUrl, interceptors: [bearer] });
  return {
    routes: createClient(RouteService, transport),
    images: createClient(ImageService, transport),
  };
}

/** The gateway's control surface (upload status, `WatchUpload`), authorized by an upload token. */
export function gatewayClient(baseUrl: string, uploadToken: string): Client<typeof GatewayService> {
  const bearer: Interceptor = (next) => async (request) => {
    request.header.set("authorization", `Bearer ${uploadToken}`);
    return next(request);
  };
  return createClient(GatewayService, createGrpcWebTransport({ baseUrl, interceptors: [bearer] }));
}

/**
 * The placeholder of a processed image (`Image.thumbhash`) as a PNG data URL: a blurred picture
 * of its colours and shape, to paint before its preview loads. `undefined` when it has none.
 */
export function placeholderDataURL(thumbhash: Uint8Array): string | undefined {
  return thumbhash.length > 0 ? thumbHashToDataURL(thumbhash) : undefined;
}

/** A 1 x 1 image of each format a processed image may come in beyond JPEG and PNG. */
const PROBES: Record<string, string> = {
  "image/webp": "data:image/webp;base64,UklGRhoAAABXRUJQVlA4TA0AAAAvAAAAEAcQERGIiP4HAA==",
};

let accepted: Promise<Set<string>> | undefined;

/**
 * The content types of the image files this browser can show: JPEG and PNG always, WebP when a
 * tiny WebP decodes. Found once, by decoding; outside a browser (no `Image`), JPEG and PNG.
 */
export function browserImageTypes(): Promise<Set<string>> {
  accepted ??= (async () => {
    const types = new Set(["image/jpeg", "image/png"]);
    if (typeof Image === "undefined") return types;
    for (const [type, probe] of Object.entries(PROBES)) {
      const image = new Image();
      image.src = probe;
      const shown = await image.decode().then(
        () => image.naturalWidth === 1,
        () => false,
      );
      if (shown) types.add(type);
    }
    return types;
  })();
  return accepted;
}

/**
 * The file of a processed image to show as `role` (`OutputRole.MAIN` or `OutputRole.PREVIEW`):
 * of the files whose type the client `accepts` (see `browserImageTypes`), the smallest — the
 * formats are encoded to the same perceived quality, so fewer bytes is simply better.
 * `undefined` when the image lists none (use `previewUrl` then).
 */
export function pickFile(image: Image, role: OutputRole, accepts: Set<string>): ImageFile | undefined {
  return image.files
    .filter((file) => file.role === role && file.url !== "" && accepts.has(file.contentType))
    .sort((a, b) => (a.byteSize < b.byteSize ? -1 : a.byteSize > b.byteSize ? 1 : 0))[0];
}

/**
 * The content type to declare for a photo (`WaypointInput.contentType`) and upload it with: the
 * one the browser gives, or `image/heic` for a `.heic`/`.heif` file left untyped (as browsers
 * outside Apple's systems leave them).
 */
export function contentTypeOf(photo: Blob & { name?: string }): string {
  if (photo.type) return photo.type;
  return /\.(heic|heif)$/i.test(photo.name ?? "") ? "image/heic" : "";
}

/** `PUT`s an image to its upload URL; resolves with the gateway's JSON answer, rejects on refusal. */
export async function upload(
  uploadUrl: string,
  body: Blob | ArrayBuffer | Uint8Array,
  contentType: string,
): Promise<{ image_id: string; status: string }> {
  const response = await fetch(uploadUrl, {
    method: "PUT",
    headers: { "content-type": contentType },
    body: body as BodyInit,
  });
  const answer = await response.json();
  if (response.status !== 202) {
    throw new Error(`upload refused: ${response.status} ${answer.error_code}: ${answer.message}`);
  }
  return answer;
}

/** What {@link uploadResumable} may be told. */
export interface ResumableOptions {
  /** Called as bytes go out, with the bytes the gateway has and the total. */
  onProgress?: (sent: number, total: number) => void;
  /** Bytes per request (default: the whole photo in one, resumed where it was cut). */
  chunkSize?: number;
  /** The waits (ms) before each retry after a failure; the default retries for about a minute. */
  retryDelays?: number[];
  /** Abandons the upload (the gateway drops what it has; the token may start again). */
  signal?: AbortSignal;
}

/** What {@link uploadResumable} uploads: a `Blob`/`File` in browsers, a `Buffer` or stream in Node. */
export type ResumableInput = ConstructorParameters<typeof Upload>[0];

/**
 * Uploads a photo to its upload URL with the tus resumable-upload protocol: a dropped connection
 * or a gateway that dies is resumed where the gateway had stored up to (on any instance), after a
 * reload too. Resolves once the original is stored and its job queued, as a `PUT`'s `202`.
 */
export function uploadResumable(
  uploadUrl: string,
  photo: ResumableInput,
  options: ResumableOptions = {},
): Promise<void> {
  return new Promise((resolve, reject) => {
    const type = typeof Blob !== "undefined" && photo instanceof Blob ? contentTypeOf(photo) : "";
    const upload = new Upload(photo, {
      endpoint: uploadUrl,
      // An option given as `undefined` replaces tus-js-client's default: only set when set.
      ...(options.chunkSize === undefined ? {} : { chunkSize: options.chunkSize }),
      retryDelays: options.retryDelays ?? [0, 500, 1000, 2000, 4000, 8000, 15000, 30000],
      metadata: type ? { filetype: type } : {},
      removeFingerprintOnSuccess: true,
      onProgress: (sent, total) => options.onProgress?.(sent, total),
      onSuccess: () => resolve(),
      onError: (error) => reject(error),
    });
    options.signal?.addEventListener("abort", () => {
      upload.abort(true).catch(() => undefined);
      reject(new Error("upload abandoned"));
    });
    upload
      .findPreviousUploads()
      .then((previous) => {
        if (previous.length > 0) upload.resumeFromPreviousUpload(previous[0]);
        upload.start();
      })
      .catch(reject);
  });
}
