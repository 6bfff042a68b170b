"""The upload and reweight jobs of ``Core`` (a mixin): each image uploaded once per replica
that will use it, the groups packed into requests under the server's limits and sent
concurrently, an evicted image uploaded again (once) and a request over a size limit split
in two. The request body and the answer's decoding are the dialect's
(``kawhi_client.dialect``: JSON over HTTP, kawhi.v1 messages over gRPC)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kawhi_client.actions import Job, Parallel
from kawhi_client.config import ClientStats, Limits, Timeouts
from kawhi_client.dialect import HttpDialect
from kawhi_client.errors import (
    ImageNotFound,
    InvalidRequest,
    KawhiHTTPError,
    PayloadTooLarge,
    ProtocolError,
    client_problem,
)
from kawhi_client.images import ImageInputError, LoadedImage, load_image
from kawhi_client.planning import (
    IMAGE_TOKENS_ESTIMATE,
    GroupLike,
    OptionsLike,
    PreparedGroup,
    json_or_none,
    merge_responses,
    new_request_id,
    options_json,
    plan_chunks,
    prepare_groups,
    remap_error,
    remap_problem,
    sha_at,
)
from kawhi_client.routing import request_routing_key
from kawhi_client.schema import ReweightResponse

log = logging.getLogger("kawhi_client")

PROBLEM_IMAGE_NOT_FOUND = "image-not-found"


class ReweightJobs:
    """Mixed into ``Core``, which provides these attributes and the methods typed below."""

    dialect: HttpDialect  # or another with its methods (kawhi_client.grpc.dialect.GrpcDialect)
    stats: ClientStats
    timeouts: Timeouts
    limits: Limits | None
    max_in_flight: int
    max_groups_per_request: int | None
    exchange: Callable[..., Job]
    ensure_ready: Callable[[], Job]
    info_job: Callable[..., Job]
    owners: Callable[[list[PreparedGroup]], Job]
    known_key: Callable[[str, str | None], str]
    is_known: Callable[..., bool]
    remember: Callable[..., None]
    forget: Callable[..., None]

    def upload_job(self, image: LoadedImage, *, reupload: bool = False, route: str | None = None) -> Job:
        """``POST /v1/images`` with the bytes exactly as given; returns the sha256.
        ``route``: the routing key of a group that will use the image (the upload goes
        where that group's requests go)."""
        assert image.data is not None
        timeout = self.timeouts.for_tokens(IMAGE_TOKENS_ESTIMATE)
        where: dict[str, Any] = {}
        resp = yield from self.exchange(
            "POST", "/v1/images", timeout=timeout, content=image.data, content_type=image.content_type,
            route=route, where=where, tokens=IMAGE_TOKENS_ESTIMATE,
        )
        body = json_or_none(resp.content)
        sha = body.get("sha256") if isinstance(body, dict) else None
        if not isinstance(sha, str) or sha.lower() != image.sha256:
            raise ProtocolError(
                f"the server stored the image as {sha!r}, not {image.sha256} (the bytes changed in transit?)",
                request_id=resp.headers.get("x-request-id"),
            )
        self.remember(image.sha256, where.get("url"))
        self.stats.add(images_uploaded=1, image_bytes_uploaded=len(image.data), image_reuploads=int(reupload))
        return image.sha256

    def upload_image_job(self, image: Any) -> Job:
        try:
            loaded = load_image(image)
        except ImageInputError as exc:
            raise InvalidRequest(client_problem(exc.detail, "/image" + (f"/{exc.field}" if exc.field else "")),
                                 attempts=0) from exc
        if loaded.data is None:
            raise InvalidRequest(client_problem("upload_image needs the image bytes, not a hash", "/image/sha256"),
                                 attempts=0)
        yield from self.ensure_ready()
        return (yield from self.upload_job(loaded))

    # ------------------------------------------------------------------ reweight
    def reweight_job(
        self,
        groups: Iterable[GroupLike],
        options: OptionsLike,
        option_kwargs: Mapping[str, Any],
        per_group_errors: bool,
        request_id: str | None,
    ) -> Job:
        groups = list(groups)
        opts = options_json(options, option_kwargs)
        prepared, failed, images = prepare_groups(groups, per_group_errors)
        info = yield from self.info_job()  # waits for /readyz first
        limits = self.limits or Limits()

        encoded = self.dialect.encode_groups(prepared, failed, per_group_errors)
        todo = [g for g in prepared if g is not None and g.index in encoded]
        owners = yield from self.owners(todo)

        yield from self.uploads_job(owners, images)

        runs: list[list[PreparedGroup]] = []
        for mine in owners.values():
            runs += [[mine[p] for p in run] for run in plan_chunks(
                [(self.dialect.size(encoded[g.index]), g.tokens) for g in mine],
                max_groups=limits.groups_per_request(self.max_in_flight, self.max_groups_per_request),
                max_bytes=max(1024, limits.max_body_bytes - 1024),
                max_tokens=limits.max_request_tokens,
                overhead=self.dialect.overhead(opts, per_group_errors),
            )]
        prefix = request_id or new_request_id()
        jobs = []
        for k, run in enumerate(runs):
            rid = prefix if len(runs) == 1 else f"{prefix}.{k}"
            jobs.append(self.chunk_job(run, encoded, opts, per_group_errors, images, rid, set()))
        answers = (yield Parallel(jobs)) if jobs else []
        pieces = [piece for answer in answers for piece in answer]
        return merge_responses(len(groups), pieces, failed, info)

    def uploads_job(self, owners: Mapping[str | None, list[PreparedGroup]], images: Mapping[str, LoadedImage],
                    route: str | None = None) -> Job:
        """Upload each image to each replica (``owners``' keys) whose groups use it and that
        does not hold it yet, concurrently. ``route``: the routing key the uploads travel
        by (default: that of a group using the image)."""
        uploads: dict[str, Job] = {}  # one upload per image and replica that will use it
        for owner, mine in owners.items():
            for g in mine:
                img = images.get(g.sha256)
                known_key = self.known_key(g.sha256, owner)
                if img is not None and img.data is not None and known_key not in uploads \
                        and not self.is_known(g.sha256, owner):
                    uploads[known_key] = self.upload_job(img, route=route or g.route)
        if uploads:
            yield Parallel(list(uploads.values()))

    def chunk_job(
        self,
        chunk: list[PreparedGroup],
        encoded: Mapping[int, Any],
        opts: bytes | None,
        per_group_errors: bool,
        images: Mapping[str, LoadedImage],
        request_id: str,
        reuploaded: set[tuple[str | None, str]],
        resend_evicted: bool = True,
    ) -> Job:
        """One ``POST /v1/reweight`` (gRPC ``Reweight``) for these groups (with the eviction and 413 recoveries);
        returns ``[(caller indices, ReweightResponse), ...]``. ``reuploaded`` holds the
        (replica, sha256) pairs uploaded again already: once each."""
        indices = [g.index for g in chunk]
        route = request_routing_key([g.route for g in chunk])
        where: dict[str, Any] = {}

        def reuploadable(sha: str | None) -> bool:
            img = images.get(sha or "")
            return img is not None and img.data is not None and (where.get("url"), sha) not in reuploaded

        def reupload(sha: str) -> Job:
            reuploaded.add((where.get("url"), sha))
            self.forget(sha, where.get("url"))
            log.info("kawhi: %s no longer holds image %s; uploading it again", where.get("url"), sha)
            yield from self.upload_job(images[sha], reupload=True, route=route)

        while True:
            body = self.dialect.content([encoded[i] for i in indices], opts, per_group_errors)
            tokens = sum(g.tokens for g in chunk)
            try:
                resp = yield from self.exchange(
                    "POST", "/v1/reweight", timeout=self.timeouts.for_tokens(tokens), content=body,
                    content_type=self.dialect.content_type, request_id=request_id, route=route, where=where, tokens=tokens,
                )
            except ImageNotFound as err:
                sha = err.sha256 or sha_at(err.pointer, chunk)
                if sha and reuploadable(sha):
                    yield from reupload(sha)
                    continue
                raise remap_error(err, indices) from err
            except PayloadTooLarge as err:
                if len(chunk) > 1 and (err.pointer or "") in ("", "/groups"):
                    # a limit the client could only estimate (tokens): split and go on
                    self.stats.add(splits_on_413=1)
                    half = len(chunk) // 2
                    left = yield from self.chunk_job(chunk[:half], encoded, opts, per_group_errors, images,
                                                     request_id + ".a", reuploaded)
                    right = yield from self.chunk_job(chunk[half:], encoded, opts, per_group_errors, images,
                                                      request_id + ".b", reuploaded)
                    return left + right
                raise remap_error(err, indices) from err
            except KawhiHTTPError as err:
                raise remap_error(err, indices) from err
            break

        rid = resp.headers.get("x-request-id") or request_id
        parsed = self.dialect.read_reweight(resp, rid)
        if len(parsed.results) != len(chunk):
            raise ProtocolError(
                f"POST /v1/reweight answered {len(parsed.results)} results for {len(chunk)} groups", request_id=rid
            )
        for g, r in zip(chunk, parsed.results):
            if g.id is not None and r.id is not None and r.id != g.id:
                raise ProtocolError(f"result for group {g.index} has id {r.id!r}, expected {g.id!r}", request_id=rid)
            if r.error is not None:
                r.error = remap_problem(r.error, indices)
        self.stats.add(reweight_requests=1, groups=len(chunk))
        pieces: list[tuple[list[int], ReweightResponse]] = [(indices, parsed)]

        if per_group_errors and resend_evicted:
            # groups whose image was evicted between upload and use: upload it again, once, and redo them
            evicted = [
                g for g, r in zip(chunk, parsed.results)
                if r.error is not None and r.error.status == 404 and r.error.type.endswith(PROBLEM_IMAGE_NOT_FOUND)
                and images.get(g.sha256) is not None and images[g.sha256].data is not None
            ]
            for sha in dict.fromkeys(g.sha256 for g in evicted):
                if (where.get("url"), sha) not in reuploaded:
                    yield from reupload(sha)
            if evicted:
                pieces += yield from self.chunk_job(evicted, encoded, opts, per_group_errors, images, request_id + ".r",
                                                    reuploaded, resend_evicted=False)
        return pieces


