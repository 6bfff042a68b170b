"""The one request pipeline: parse -> admit -> prepare -> run -> assemble.

Every front end calls the same steps, so the same bad group gets the same error kind
and pointer in-process, from the CLI, over HTTP and over gRPC:

* in-process and the CLI call :meth:`Pipeline.reweight` (all steps, synchronously);
* the HTTP server calls the steps one by one: :meth:`parse_body` and :meth:`admit` on
  arrival, :meth:`prepare` in its prepare thread, the batcher runs :meth:`run`'s
  engine forward, :meth:`outcomes` and :meth:`assemble` build the answer.

Errors are :class:`kawhi.errors.KawhiError` (kinds in the closed catalogue); group
errors are kept relative to the group and placed (``/groups/3``) at assembly.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kawhi_client.schema import GroupResult, Problem, ReweightResponse, Usage

from kawhi import __version__
from kawhi.engine.config import MethodConfig
from kawhi.engine.errors import GroupError, OptionsError
from kawhi.engine.images import decode_image
from kawhi.errors import KawhiError
from kawhi.pipeline.admit import Admitted, Limits, admit_group, check_request_size
from kawhi.pipeline.parse import ParsedRequest, parse_groups, parse_json, parse_options, parse_request

log = logging.getLogger("kawhi.pipeline")

Outcome = Any  # GroupResult | KawhiError (relative to its group)


@dataclass
class Admission:
    """A request past admission: its resolved options and the groups to prepare."""

    parsed: ParsedRequest
    config: MethodConfig
    groups: list[Admitted] = field(default_factory=list)

    @property
    def errors(self) -> dict[int, KawhiError]:
        return self.parsed.errors


def limits_of(engine: Any) -> Limits:
    """The pipeline limits an engine's own limits describe (in-process and CLI)."""
    el = engine.limits
    return Limits(max_responses=el.max_responses, max_response_tokens=el.max_response_tokens,
                  max_group_tokens=min(el.max_group_tokens, engine.model.max_positions), image=el.image)


class Pipeline:
    """The steps over one engine. ``region_cache``: optional ``get``/``set`` store of region selections."""

    def __init__(self, engine: Any, limits: Limits | None = None, *, region_cache: Any = None) -> None:
        self.engine = engine
        self.limits = limits or limits_of(engine)
        self.region_cache = region_cache

    # ------------------------------------------------------------------ 1 parse
    @staticmethod
    def parse_body(body: bytes, content_type: str | None = "application/json") -> ParsedRequest:
        """A wire request body (HTTP, gRPC JSON)."""
        return parse_request(parse_json(body, content_type))

    @staticmethod
    def parse_document(doc: Any) -> ParsedRequest:
        """An already-decoded wire request document (checked like a body)."""
        return parse_request(doc)

    @staticmethod
    def parse_groups(groups: Sequence[Any], options: Any = None) -> ParsedRequest:
        """In-process / CLI: groups as mappings or RolloutGroups; pointers relative to each group."""
        return parse_groups(groups, parse_options(options), per_group_errors=True, group_prefix=False)

    # ------------------------------------------------------------------ 2 admit
    def resolve_options(self, options: Mapping[str, Any] | None) -> MethodConfig:
        """Wire options over the engine defaults; KawhiError at ``/options/<name>``."""
        return self.engine.resolve_options(dict(options or {}))

    def admit(self, parsed: ParsedRequest, *, queue_capacity: int | None = None, allow_paths: bool = False,
              base_dir: Path | None = None) -> Admission:
        """Options resolved, limits checked, image bytes decoded and their headers read."""
        check_request_size(len(parsed.groups), self.limits, queue_capacity)
        admission = Admission(parsed, self.resolve_options(parsed.options))
        for i, group in enumerate(parsed.groups):
            if group is None:
                continue
            try:
                admission.groups.append(admit_group(i, group, self.limits, base_dir=base_dir,
                                                    allow_paths=allow_paths, data=parsed.images.get(i)))
            except KawhiError as exc:
                self._keep(parsed, i, exc)
        return admission

    @staticmethod
    def _keep(parsed: ParsedRequest, index: int, exc: KawhiError) -> None:
        if not parsed.per_group_errors:
            raise exc.placed(parsed.prefix(index))
        parsed.errors[index] = exc

    # ------------------------------------------------------------------ 3 prepare
    def prepare(self, admitted: Admitted, config: MethodConfig, data: bytes | None = None) -> Any:
        """Decode the image and ``Engine.prepare`` one group (CPU; the prepare thread).

        data: the image bytes when the group referenced them by hash. Raises KawhiError
        relative to the group; an unexpected failure is an ``internal`` error of this
        group only (logged), never of the others.
        """
        data = admitted.data if admitted.data is not None else data
        if data is None:
            raise GroupError("/image/sha256", f"no image with sha256 {admitted.sha256} is held; send its bytes "
                             "(image.data) or upload it first", kind="image-not-found", sha256=admitted.sha256)
        try:
            image = decode_image(data, self.limits.image, admitted.image_pointer)
            prepared = self.engine.prepare(admitted.group, config, image, image_sha256=admitted.sha256,
                                           index=admitted.index, region_cache=self.region_cache)
        except KawhiError:
            raise
        except Exception:  # an engine bug must not take the other groups with it
            log.exception("prepare failed", extra={"group": admitted.index})
            raise GroupError("", "preparing this group failed unexpectedly; it has been logged",
                             kind="internal") from None
        if prepared.num_tokens > self.limits.max_group_tokens:
            raise GroupError("/responses", f"the group needs {prepared.num_tokens} tokens (prompt and image "
                             f"included); one forward holds at most {self.limits.max_group_tokens}",
                             kind="too-large")
        return prepared

    def prepare_all(self, admission: Admission, images: Mapping[str, bytes] | None = None,
                    cancelled: Callable[[], bool] = lambda: False, *, explain: bool = False) -> list[Any]:
        """:meth:`prepare` for every admitted group; errors kept per group (or raised, placed).

        explain: the forward also keeps each visual token's alignment (the explain view).
        """
        prepared = []
        for a in admission.groups:
            if cancelled():
                break
            try:
                prepared.append(self.prepare(a, admission.config, (images or {}).get(a.sha256)))
                prepared[-1].explain = explain
            except KawhiError as exc:
                self._keep(admission.parsed, a.index, exc)
        return prepared

    def check_request_tokens(self, prepared: Sequence[Any]) -> int:
        tokens = sum(p.num_tokens for p in prepared)
        if tokens > self.limits.max_request_tokens:
            raise KawhiError("too-large", f"the request needs {tokens} tokens; the limit is "
                             f"{self.limits.max_request_tokens}", "/groups")
        return tokens

    # ------------------------------------------------------------------ 4 run
    def run(self, prepared: Sequence[Any]) -> list[Outcome]:
        """The engine's forward for prepared groups, each result checked (:func:`outcome`)."""
        return [outcome(r) for r in self.engine.run(list(prepared))]

    # ------------------------------------------------------------------ 5 assemble
    def results(self, parsed: ParsedRequest, outcomes: Mapping[int, Outcome]) -> list[GroupResult]:
        """One GroupResult per group of the request, errors placed; raises the first error
        when the request did not ask for per-group errors."""
        out = []
        for i in range(len(parsed.groups)):
            got = parsed.errors.get(i, outcomes.get(i))
            if isinstance(got, KawhiError):
                if not parsed.per_group_errors:
                    raise got.placed(parsed.prefix(i))
                out.append(GroupResult(id=parsed.ids[i], error=Problem(**got.to_problem(parsed.prefix(i)))))
            elif got is None:  # never prepared (a cancelled request): an honest error, not a hole
                out.append(GroupResult(id=parsed.ids[i], error=Problem(**KawhiError(
                    "unavailable", "this group was not processed", parsed.prefix(i)).to_problem())))
            else:
                out.append(got)
        return out

    def assemble(self, admission: Admission, outcomes: Mapping[int, Outcome], tokens: int,
                 started: float) -> ReweightResponse:
        return ReweightResponse(
            model=self.engine.model_name, version=__version__, options=admission.config.to_dict(),
            usage=Usage(tokens=tokens, milliseconds=round((time.perf_counter() - started) * 1000, 3)),
            results=self.results(admission.parsed, outcomes))

    # ------------------------------------------------------------------ all steps
    def reweight(self, parsed: ParsedRequest, *, allow_paths: bool = True, base_dir: Path | None = None,
                 load_image: Callable[[Any], bytes] | None = None, explain: bool = False) -> ReweightResponse:
        """Every step, synchronously (in-process, CLI). Request-level errors raise KawhiError.

        load_image: resolves a hash-referenced ImageRef to bytes (default: none are held).
        explain: see :meth:`prepare_all`.
        """
        started = time.perf_counter()
        admission = self.admit(parsed, allow_paths=allow_paths, base_dir=base_dir)
        images: dict[str, bytes] = {}
        if load_image is not None:
            for a in admission.groups:
                if a.data is None:
                    try:
                        images[a.sha256] = load_image(a.group.image)
                    except KawhiError as exc:
                        self._keep(parsed, a.index, exc)
        prepared = self.prepare_all(admission, images, explain=explain)
        tokens = self.check_request_tokens(prepared)
        outcomes = dict(zip((p.index for p in prepared), self.run(prepared)))
        return self.assemble(admission, outcomes, tokens, started)


def outcome(result: GroupResult) -> Outcome:
    """A GroupResult from the engine, or the KawhiError it amounts to.

    A forward failure is ``internal`` (a bug or a fault of ours, logged by the engine);
    a result holding a non-finite number is ``non-finite``, pointing at the response's
    reward or given advantage whose size made it overflow -- a 200 carries finite numbers only.
    """
    if result.error is not None:
        return GroupError("", "the reference forward failed for this group; it has been logged", kind="internal")
    for j, response in enumerate(result.responses):
        numbers = [response.advantage, *(response.token_advantages or ()), *(response.token_weights or ())]
        numbers += [v for p in response.paragraphs for v in (p.alpha, p.weight)]
        if not all(math.isfinite(v) for v in numbers):
            return GroupError(f"/responses/{j}", "the reweighted advantages of this response overflow a 64-bit "
                              "float; scale the group's rewards (or advantages) down", kind="non-finite")
    return result


__all__ = ["Admission", "Limits", "OptionsError", "Pipeline", "limits_of", "outcome"]
