/**
 * The follow SDK for browsers and Node: the generated messages and service descriptors of
 * `proto/` (protobuf-es), and clients over grpc-web (connect-es) with the user's token attached.
 *
 * ```ts
 * const follow = followClients("http://127.0.0.1:8080", () => token);
 * const { route, uploadTargets } = await follow.routes.createRouteWithWaypoints({ ... });
 * for await (const update of follow.images.watchImageStatus({ target: { case: "routeId", value: route!.id } })) { ... }
 * ```
 */
import { createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { ImageService } from "./gen/follow/api/v1/image_service_pb.js";
import { RouteService } from "./gen/follow/api/v1/route_service_pb.js";
import { GatewayService } from "./gen/follow/gateway/v1/gateway_service_pb.js";

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
