"""The KAWHI engine: rollout groups in, reweighted per-token advantages out.

Two steps, so a front end can validate on arrival and batch the heavy part:

* :meth:`Engine.prepare` (cheap, CPU): validates a group, selects its key regions
  (docs/method.md §2), tokenises, splits responses into segments and computes the group
  advantages (§1). Every mistake is a :class:`GroupError` with a JSON pointer.
* :meth:`Engine.run` (heavy): one reference forward per group with the prefix shared,
  the alignment score alpha_t (§4), segment weights and token advantages (§5).

The engine serves no requests itself: kawhi.pipeline calls these steps
(``kawhi.pipeline.local.LocalService`` in-process, ``ReweightService`` for the servers).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from kawhi_client.schema import (
    ExplainedResult,
    GroupResult,
    ImageRef,
    Options,
    Paragraph,
    Problem,
    ResponseResult,
    RolloutGroup,
)
from PIL import Image

from kawhi import __version__
from kawhi.engine.alignment import alignment_scores, repeat_kv, visual_token_alignment
from kawhi.engine.config import MethodConfig
from kawhi.engine.errors import GroupError, OptionsError
from kawhi.engine.estimators import InvalidRewardError, group_advantages
from kawhi.engine.images import ImageLimits, decode_base64
from kawhi.engine.regions import RegionSelection, select_regions
from kawhi.engine.segments import Segment, segment_tokens, token_segment_index
from kawhi.engine.weights import normalize_weights, paragraph_weights, segment_means, token_weights
from kawhi.errors import KawhiError
from kawhi.heads.files import HeadSet, resolve_head_set
from kawhi.heads.identity import ModelIdentity
from kawhi.models.logprobs import has_lm_head, response_logprobs
from kawhi.models.prefix import PrefixCache, prefix_key
from kawhi.models.qwen import PromptInputs, QwenVLReference, TokenizedText

__all__ = ["Engine", "EngineLimits", "GroupError", "OptionsError", "PreparedGroup", "DEMO_MODEL_DIR", "TINY_MODEL_DIR"]

log = logging.getLogger(__name__)

# The default with no --model: kawhi-tiny, trained on the kawhi-tiny task (docs/tiny.md).
TINY_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "tiny"
TINY_MODEL_NAME = "kawhi-tiny-qwen2.5-vl"
# Random weights, kept for tests that need an untrained model (pass it as --model).
DEMO_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "demo"
DEMO_MODEL_NAME = "kawhi-demo-qwen2.5-vl-tiny"
@dataclass(frozen=True)
class EngineLimits:
    """Sizes a group may have; larger ones are refused (413) before any model work."""

    max_responses: int = 64
    max_response_tokens: int = 8192
    max_group_tokens: int = 131072  # prefix + all responses of one group
    max_forward_tokens: int = 16384  # padded response tokens per batched forward (bounds activation memory)
    # Several groups' responses in one forward: None = on a GPU only. On CPU the forward is
    # compute-bound and merging measured 15-55 % slower per group (padding, masks, copies).
    merge_groups: bool | None = None
    # Responses attend to the one stored copy of their prefix (split attention) instead of a
    # per-response copy of its KV cache: None = where it measured faster (CPU; bench/README.md).
    split_attention: bool | None = None
    # Prefixes (KV of layers 0..L-2 + visual states) kept across requests, on the model's device.
    prefix_cache_bytes: int = 256 * 1024 * 1024
    image: ImageLimits = field(default_factory=ImageLimits)


@dataclass
class PreparedResponse:
    tokens: TokenizedText
    segments: list[Segment]
    segment_ids: np.ndarray  # (T,) int
    advantage: float


@dataclass
class PreparedGroup:
    """A validated group, ready for the forward. ``num_tokens`` = prefix + all responses."""

    index: int
    id: str | None
    config: MethodConfig
    heads: tuple[int, ...]
    prompt: PromptInputs
    regions: RegionSelection
    responses: list[PreparedResponse]
    explain: bool = False  # also each visual token's alignment per response (the explain view's heat map)

    @property
    def num_tokens(self) -> int:
        return int(self.prompt.input_ids.numel()) + sum(len(r.tokens.token_ids) for r in self.responses)


class Engine:
    """KAWHI over one frozen reference model.

    Threads: :meth:`prepare` (tokenizer, image processor, SGUF) and :meth:`run` (the
    model and its hooks) share no mutable state, so one thread may prepare while
    another runs; neither method may be entered by two threads at once (the fast
    tokenizer and the forward hooks are not reentrant).
    """

    def __init__(
        self,
        model: QwenVLReference,
        defaults: MethodConfig | None = None,
        *,
        limits: EngineLimits | None = None,
        is_demo: bool = False,
        model_name: str | None = None,
        heads_file: str | Path | None = None,
        model_card: dict[str, Any] | None = None,
    ) -> None:
        """heads_file: a heads file for ``heads="preset"`` (kawhi.heads.files: it wins over a
        ``kawhi_heads.json`` in the model folder and over the published sets). Raises
        HeadsFileError when it was made for another model."""
        self.model = model
        self.defaults = defaults or MethodConfig()
        self.limits = limits or EngineLimits()
        self.is_demo = is_demo
        self.model_card = model_card  # what the embedded kawhi-tiny was trained on and scores (docs/tiny.md)
        self.model_name = model_name or model.name
        self.tokenizer_fingerprint = model.tokenizer_fingerprint()
        merge = self.limits.merge_groups
        self._merge_groups = model.device.type == "cuda" if merge is None else merge
        self.identity = ModelIdentity.from_config(model.model.config, model.source_dir)
        self.head_set: HeadSet = resolve_head_set(self.identity, heads_file=heads_file, model_dir=model.source_dir)
        if self.head_set.heads is None and not is_demo:  # the demo's random heads: its one warning says enough
            log.warning("no vision-critical head set known for %s: 'preset' means all %d heads "
                        "(docs/heads.md: run `kawhi heads discover` and pass its output as --heads-file)",
                        self.model_name, model.num_heads)
        self.prefix_cache = PrefixCache(self.limits.prefix_cache_bytes)
        if model.device.type == "cpu":  # freed logits chunks leave the resident set (kawhi.engine.memory)
            from kawhi.engine.memory import return_freed_memory_to_os

            return_freed_memory_to_os()

    @classmethod
    def load(
        cls,
        model: str | Path | None = None,
        *,
        device: str = "cpu",
        dtype: str = "auto",
        defaults: MethodConfig | None = None,
        limits: EngineLimits | None = None,
        heads_file: str | Path | None = None,
    ) -> Engine:
        """Load a local model folder or a hub id already in the local Hugging Face cache
        (never downloaded), or the embedded kawhi-tiny model when ``model`` is None.

        A folder holding KAWHI_MODEL_CARD.json (kawhi-tiny) or KAWHI_DEMO.json (the
        random-weight demo) is named by it, and ``info()`` reports the card / ``is_demo``."""
        from kawhi.models.locate import check_device, embedded_label, locate_model

        check_device(device)  # ModelNotFound / DeviceUnavailable: a message for the user
        folder = TINY_MODEL_DIR if model is None else locate_model(model)
        if heads_file:  # a mismatching heads file is refused before any weights are read
            from kawhi.heads.files import check_model_folder_heads

            check_model_folder_heads(folder, heads_file)
        label, is_demo, card = embedded_label(folder)
        if label is not None:  # an embedded model: tiny, float32 whatever the device prefers
            reference = QwenVLReference.from_pretrained(folder, device=device, dtype="float32", name=label)
            if is_demo:
                log.warning("serving the DEMO model (random weights): its advantages are for plumbing, "
                            "not for training; pass --model /path/to/Qwen2.5-VL-7B-Instruct for real use")
            else:
                log.info("serving the embedded %s (trained on a synthetic task, docs/tiny.md): for trying kawhi; "
                         "pass --model /path/to/Qwen2.5-VL-7B-Instruct for real use", label)
            return cls(reference, defaults, limits=limits, is_demo=is_demo, model_name=label,
                       heads_file=heads_file, model_card=card)
        hub_id = None if model is None or Path(model).expanduser().is_dir() else str(model)  # a cached hub id keeps its id
        reference = QwenVLReference.from_pretrained(folder, device=device, dtype=dtype, name=hub_id)
        return cls(reference, defaults, limits=limits, heads_file=heads_file)

    # ------------------------------------------------------------------ options
    def resolve_options(self, options: Options | Mapping[str, Any] | None) -> MethodConfig:
        """Request options over the engine defaults. Raises OptionsError naming the field
        (``heads``, ``sguf/beta``; ``options`` for an unknown name)."""
        if isinstance(options, Options):
            options = options.model_dump(exclude_none=True)
        try:
            config = self.defaults.updated(options)
        except (TypeError, ValueError) as exc:
            field_name, _, detail = str(exc).partition(": ")
            if not detail or " " in field_name:
                field_name, detail = "options", str(exc)
            raise OptionsError(field_name, detail) from None
        self.resolve_heads(config)
        if (config.return_ref_logprobs or config.return_entropy) and not has_lm_head(self.model):
            field = "return_ref_logprobs" if config.return_ref_logprobs else "return_entropy"
            raise OptionsError(field, "this server's reference model was loaded without its LM head")
        return config

    def resolve_heads(self, config: MethodConfig) -> tuple[int, ...]:
        """The query-head indices alpha averages over, validated against the model."""
        if config.heads == "all":
            return tuple(range(self.model.num_heads))
        if config.heads == "preset":
            return self.head_set.heads or tuple(range(self.model.num_heads))
        bad = [h for h in config.heads if h >= self.model.num_heads]
        if bad:
            raise OptionsError("heads", f"head indices {bad} out of range: the model has {self.model.num_heads} heads")
        return tuple(sorted(set(config.heads)))

    def info(self) -> dict[str, Any]:
        m = self.model
        return {
            "model": self.model_name,
            "is_demo": self.is_demo,
            "model_card": self.model_card,
            "model_type": m.model_type,
            "version": __version__,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "vocab_size": m.vocab_size,
            "num_heads": m.num_heads,
            "num_kv_heads": m.num_kv_heads,
            "preset_heads": list(self.head_set.heads) if self.head_set.heads else None,
            "heads_source": self.head_set.source,
            "model_identity": self.identity.to_dict(),
            "heads": list(self.resolve_heads(self.defaults)),
            "patch_side": m.patch_side,
            "device": str(m.device),
            "dtype": str(m.dtype).replace("torch.", ""),
            "limits": {
                "max_responses": self.limits.max_responses,
                "max_response_tokens": self.limits.max_response_tokens,
                "max_group_tokens": self.limits.max_group_tokens,
                "max_image_bytes": self.limits.image.max_bytes,
                "max_image_pixels": self.limits.image.max_pixels,
                "image_formats": list(self.limits.image.formats),
            },
            "defaults": self.defaults.to_dict(),
            "memory": self.memory_summary(),
        }

    def memory_summary(self) -> dict[str, Any]:
        """The memory model of this reference (kawhi.engine.memory): per-token bytes and batch budgets."""
        from kawhi.engine.memory import ModelShape, summary

        return summary(ModelShape.of(self.model.model), prefix_cache_bytes=self.limits.prefix_cache_bytes,
                       max_forward_tokens=self.limits.max_forward_tokens)

    # ------------------------------------------------------------------ prepare
    def prepare(
        self,
        group: RolloutGroup,
        config: MethodConfig,
        image: Image.Image,
        *,
        image_sha256: str,
        index: int = 0,
        region_cache: Any = None,
    ) -> PreparedGroup:
        """Validate and pre-process one group (everything but the forward).

        The group has been admitted (``kawhi.pipeline.admit``: counts, sizes and image
        limits are checked there, once, for every front end); the checks here are the ones
        that need the model: the vocabulary, the placeholders, the tokenised lengths, the
        prompt template, the rewards for the configured estimator.
        image: the decoded RGB image (see kawhi.engine.images.decode_image).
        region_cache: optional object with ``get(key) -> dict | None`` and
        ``set(key, dict)``; region selections are cached under a content-hash key.
        Raises GroupError (pointer relative to the group).
        """
        heads = self.resolve_heads(config)
        advantages = self._advantages(group, config)
        resized, grid = self.model.resize_image(image)
        regions = self._regions(resized, grid, config, image_sha256, region_cache)
        try:
            prompt = self.model.encode_prompt(resized, prompt=group.prompt, messages=group.messages)
        except Exception as exc:  # a template or message-shape problem in the caller's messages
            raise GroupError("/messages" if group.messages is not None else "/prompt", _caller_text(exc)) from None
        prompt.cache_key = prefix_key(self.model_name, image_sha256, prompt.input_ids)

        responses = []
        total = int(prompt.input_ids.numel())
        for i, (response, advantage) in enumerate(zip(group.responses, advantages)):
            tokens = self._tokens(response, i)
            total += len(tokens.token_ids)
            segments = segment_tokens(tokens.text, tokens.offsets, config.granularity)
            responses.append(PreparedResponse(tokens, segments, token_segment_index(segments, len(tokens.token_ids)),
                                              float(advantage)))
        if total > self.limits.max_group_tokens or total > self.model.max_positions:
            limit = min(self.limits.max_group_tokens, self.model.max_positions)
            raise GroupError("/responses", f"the group holds {total} tokens (prompt and image included); "
                             f"the limit is {limit}", kind="too-large")
        return PreparedGroup(index, group.id, config, heads, prompt, regions, responses)

    def _advantages(self, group: RolloutGroup, config: MethodConfig) -> np.ndarray:
        if group.advantages is not None:  # one per response: admit checked the count
            return self._estimate(None, "given", config, group.advantages)
        if config.estimator == "given":
            raise GroupError("/advantages", "estimator 'given' needs 'advantages', one per response")
        rewards = []
        for i, response in enumerate(group.responses):
            if response.reward is None:
                raise GroupError(f"/responses/{i}/reward", "reward is missing")
            rewards.append(response.reward)
        return self._estimate(rewards, config.estimator, config, None)

    @staticmethod
    def _estimate(rewards, estimator, config, given) -> np.ndarray:
        try:
            return group_advantages(rewards, estimator, eps=config.eps, std=config.std, given=given)
        except InvalidRewardError as exc:
            where = f"/advantages/{exc.index}" if exc.field == "advantage" else f"/responses/{exc.index}/reward"
            raise GroupError(where, str(exc)) from None

    def _tokens(self, response: Any, i: int) -> TokenizedText:
        limit = self.limits.max_response_tokens
        if response.token_ids is not None:  # admit checked the count (and the sign)
            ids = response.token_ids
            for j, token in enumerate(ids):
                if not 0 <= token < self.model.vocab_size:
                    raise GroupError(f"/responses/{i}/token_ids/{j}",
                                     f"token id {token} is outside the model's vocabulary [0, {self.model.vocab_size})")
                if token in self.model.placeholder_ids:
                    raise GroupError(f"/responses/{i}/token_ids/{j}",
                                     f"token id {token} is an image/video placeholder, which a response cannot hold")
            return self.model.decode(ids)
        tokens = self.model.tokenize(response.text)  # admit refused texts far beyond the limit in characters
        if len(tokens.token_ids) > limit:
            raise GroupError(f"/responses/{i}/text", f"{len(tokens.token_ids)} tokens; the limit is {limit}",
                             kind="too-large")
        return tokens

    def _regions(self, resized: Image.Image, grid: tuple[int, int], config: MethodConfig, image_sha256: str,
                 region_cache: Any) -> RegionSelection:
        s = config.sguf
        key = (f"regions:v1:{image_sha256}:{grid[0]}x{grid[1]}:{config.regions}:{config.skip_ratio}:{config.seed}:"
               f"{s.delta_s}:{s.delta_l}:{s.beta}:{s.sigma}")
        if region_cache is not None:
            cached = region_cache.get(key)
            if cached is not None:
                return RegionSelection.from_dict(cached)
        seed = (config.seed, int(image_sha256[:16], 16))
        regions = select_regions(np.asarray(resized), grid, config.regions, config.skip_ratio, seed, config.sguf)
        if region_cache is not None:
            region_cache.set(key, regions.to_dict())
        return regions

    # ------------------------------------------------------------------ run
    def run(self, prepared: Sequence[PreparedGroup]) -> list[GroupResult]:
        """The reference forward and the reweighting for each prepared group.

        Responses run as batched continuations of their own group's prefix, several
        groups per batch on a GPU (see EngineLimits.merge_groups and
        QwenVLReference.final_layer_inputs_many). If that batched forward fails, the
        groups are run one by one, and a group that fails alone gets a GroupResult
        with ``error`` set; the others are unaffected.
        """
        if not prepared:
            return []
        try:
            all_states: list[Any] = self.model.final_layer_inputs_many(
                [(g.prompt, [r.tokens.token_ids for r in g.responses]) for g in prepared],
                max_batch_tokens=self.limits.max_forward_tokens, merge_groups=self._merge_groups,
                split_attention=self.limits.split_attention, prefix_cache=self.prefix_cache)
        except Exception:
            log.exception("batched forward of %d groups failed; running them one by one", len(prepared))
            all_states = [None] * len(prepared)
        results = []
        for group, states in zip(prepared, all_states):
            try:
                if states is None:
                    states = self.model.final_layer_inputs_many(
                        [(group.prompt, [r.tokens.token_ids for r in group.responses])],
                        max_batch_tokens=self.limits.max_forward_tokens,
                        split_attention=self.limits.split_attention, prefix_cache=self.prefix_cache)[0]
                results.append(self._score_group(group, states))
            except Exception:
                log.exception("group %s failed in the forward", group.id)  # the cause stays in the log
                results.append(GroupResult(id=group.id, error=Problem(**KawhiError(
                    "internal", "the reference forward failed for this group; it has been logged").to_problem())))
        return results

    def _score_group(self, group: PreparedGroup, states: Any) -> GroupResult:
        """alpha per response token from the group's final-layer states, then the weights."""
        config = group.config
        rope = config.rope == "after"
        visual_keys = self.model.project(states.visual, "key", rope)  # (H_kv, N, d)
        selected = torch.tensor(group.regions.selected.tolist(), dtype=torch.long, device=visual_keys.device)
        heads = torch.as_tensor(group.heads, dtype=torch.long, device=visual_keys.device)
        n_rep = self.model.num_heads // self.model.num_kv_heads
        results: list[ResponseResult] = []
        maps: list[list[float]] = []
        for response, response_states in zip(group.responses, states.responses):
            n_tokens = len(response.tokens.token_ids)
            if n_tokens == 0:  # the documented rule for an empty response: nothing to weight
                results.append(ResponseResult(advantage=response.advantage, paragraphs=[], token_advantages=[],
                                              token_weights=[]))
                maps.append([])
                continue
            if config.similarity == "query_key":
                probes = self.model.project(response_states, "query", rope)
            else:  # key-key ablation: the response tokens' own keys, repeated to the query heads
                probes = repeat_kv(self.model.project(response_states, "key", rope), n_rep)
            alpha = alignment_scores(probes, visual_keys, selected, heads).cpu().double().numpy()
            results.append(self._reweight_response(response, alpha, config))
            if group.explain:
                maps.append(visual_token_alignment(probes, visual_keys, heads).cpu().tolist())
        if config.return_ref_logprobs or config.return_entropy:
            self._add_ref_logprobs(group, states, results)
        fields = dict(id=group.id, grid=list(group.regions.grid), key_tokens=group.regions.key.tolist(),
                      selected_tokens=group.regions.selected.tolist(), responses=results)
        if group.explain:
            return ExplainedResult(**fields, visual_alignment=maps)
        return GroupResult(**fields)

    def _add_ref_logprobs(self, group: PreparedGroup, states: Any, results: list[ResponseResult]) -> None:
        """The reference's per-token log-probs / entropy, from the same forward's states."""
        config = group.config
        scored = response_logprobs(self.model, states, [r.tokens.token_ids for r in group.responses],
                                   temperature=config.logprob_temperature, with_entropy=config.return_entropy,
                                   max_batch_tokens=self.limits.max_forward_tokens)
        for result, values in zip(results, scored):
            if not (torch.isfinite(values.logprobs).all() and torch.isfinite(values.entropy).all()):
                raise ValueError("the reference model produced non-finite log-probs")
            if config.return_ref_logprobs:
                result.ref_logprobs = values.logprobs.tolist()
            if config.return_entropy:
                result.entropy = values.entropy.tolist()

    @staticmethod
    def _reweight_response(response: PreparedResponse, alpha: np.ndarray, config: MethodConfig) -> ResponseResult:
        """alpha (T,) -> segment weights (§5) -> per-token advantages."""
        segments, ids = response.segments, response.segment_ids
        abar = segment_means(alpha, ids, len(segments))
        weights = paragraph_weights(abar, temperature=config.temperature, smoothing=config.smoothing,
                                    w_min=config.w_min, w_max=config.w_max)
        counts = np.array([s.token_end - s.token_start for s in segments])
        weights = normalize_weights(weights, counts, config.normalize)
        per_token = token_weights(weights, ids)
        return ResponseResult(
            advantage=response.advantage,
            paragraphs=[Paragraph(char_start=s.char_start, char_end=s.char_end, token_start=s.token_start,
                                  token_end=s.token_end, alpha=float(a), weight=float(w))
                        for s, a, w in zip(segments, abar, weights)],
            token_advantages=(response.advantage * per_token).tolist(),
            token_weights=per_token.tolist(),
        )


def load_image_bytes(ref: ImageRef, base_dir: Path | None = None) -> bytes:
    """ImageRef -> bytes for in-process and CLI use: ``data`` or a local ``path``."""
    if ref.data is not None:
        return decode_base64(ref.data)
    if ref.path is not None:
        path = Path(ref.path)
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        try:
            return path.read_bytes()
        except OSError as exc:
            raise GroupError("/image/path", f"cannot read {ref.path}: {exc.strerror}",
                             kind="image-not-found") from None
    raise GroupError("/image/sha256", f"unknown image {ref.sha256}: in-process use needs the bytes or a path",
                     kind="image-not-found")


def _caller_text(exc: Exception) -> str:
    """An exception's message for the caller: no reprs, addresses or class names."""
    import re

    text = re.sub(r"<[^<>]*\bat 0x[0-9a-fA-F]+>|0x[0-9a-fA-F]{6,}", "<object>", str(exc))
    return text[:300] or "the messages could not be rendered with the model's chat template"
