"""What verl's two KAWHI paths share: the settings, the Reweighter they build, one sample
-> ``Rollout``, and the per-sample values they store and decode.

* ``kawhi_client.integrations.verl_v1`` -- verl's v1 trainer (``trainer.use_v1=true``, the
  default since verl 0.9): one KAWHI call per GRPO group in the agent loop, the advantages
  scaled in the trainer's TransferQueue. The path to use.
* ``kawhi_client.integrations.verl`` -- verl's legacy ``RayPPOTrainer``
  (``trainer.use_v1=false``, deprecated by verl): a reward manager and the ``grpo_kawhi``
  estimator.

Stored values. Both paths keep a sample's KAWHI result next to the sample as strings (verl's
legacy batch stacks extra info with ``np.array``, which ragged lists would break; the
TransferQueue keeps them as non-tensor fields): the weights as run-length JSON (exact
float round trip) with the failure policy that applies to them, or a fallback marker with
its reason; the reference log-probs as base64 float32. The trainer process decodes them
with ``weights_tensor`` / ``ref_log_prob_tensor``, where the policy is applied.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from kawhi_client.integrations.common import (
    FailurePolicy,
    KawhiIntegrationError,
    Reweighter,
    Rollout,
    RowResult,
    as_backend,
    wire_messages,
)

WEIGHTS_KEY = "kawhi_token_weights"
FALLBACK_KEY = "kawhi_fallback"
REF_KEY = "kawhi_ref_logprobs"
_REF_PREFIX = "kawhi-lp1:"
_WEIGHTS_PREFIX = "kawhi-w1:"
_FALLBACK_PREFIX = "kawhi-fallback:"
_ERROR_PREFIX = "kawhi-error:"
DEFAULT_DEADLINE_S = 120.0

# ============================================================================ the stored weights


def encode_weights(weights: Sequence[float], on_error: str = "raise") -> str:
    """Token weights -> a compact string (run-length JSON; exact float round trip).

    ``on_error`` travels along so the advantage stage applies the reward stage's policy."""
    runs: list[list[Any]] = []
    for w in weights:
        w = float(w)
        if runs and runs[-1][1] == w:
            runs[-1][0] += 1
        else:
            runs.append([1, w])
    return _WEIGHTS_PREFIX + json.dumps({"n": len(weights), "runs": runs, "on_error": on_error},
                                        separators=(",", ":"))


def encode_fallback(reason: str) -> str:
    """The marker of a sample whose weights could not be had (``on_error="fallback"``)."""
    return _FALLBACK_PREFIX + reason


def encode_error(reason: str) -> str:
    """The marker of a sample whose KAWHI call failed under ``on_error="raise"``, where the
    failure cannot raise where it happened (verl's v1 agent loop would only drop the group):
    the trainer process raises when it decodes it."""
    return _ERROR_PREFIX + reason


def decode_weights(value: Any) -> tuple[list[float] | None, str | None, str]:
    """A stored value -> (weights or None, fallback reason or None, on_error)."""
    if not isinstance(value, str):
        raise KawhiIntegrationError(f"{WEIGHTS_KEY} holds a {type(value).__name__}, not a KAWHI weights string")
    if value.startswith(_ERROR_PREFIX):
        return None, value[len(_ERROR_PREFIX):] or "unknown", "raise"
    if value.startswith(_FALLBACK_PREFIX):
        return None, value[len(_FALLBACK_PREFIX):] or "unknown", "fallback"
    if not value.startswith(_WEIGHTS_PREFIX):
        raise KawhiIntegrationError(f"{WEIGHTS_KEY} holds {value[:40]!r}, not a KAWHI weights string")
    payload = json.loads(value[len(_WEIGHTS_PREFIX):])
    weights = [float(w) for count, w in payload["runs"] for _ in range(int(count))]
    if len(weights) != int(payload["n"]):
        raise KawhiIntegrationError(f"corrupt {WEIGHTS_KEY}: {len(weights)} weights for n={payload['n']}")
    return weights, None, payload.get("on_error", "raise")


# ============================================================================ configuration


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    getter = getattr(cfg, "get", None)
    if callable(getter):
        try:
            return getter(key, default)
        except Exception:
            return default
    return getattr(cfg, key, default)


def kawhi_settings(config: Any) -> dict[str, Any]:
    """The KAWHI settings of a verl config: ``reward.kawhi`` (``+reward.kawhi.url=...`` on
    the command line), else the environment (``KAWHI_URL``, ``KAWHI_ON_ERROR``,
    ``KAWHI_OPTIONS`` as JSON, ``KAWHI_INNER_REWARD_MANAGER``, ``KAWHI_MODEL``, ``KAWHI_DEVICE``).

    Keys: ``url`` (an http(s) URL, ``ray://<Serve app>`` or ``in-process``), ``on_error``, ``options`` (API
    options), ``inner`` (the wrapped reward manager, default ``naive``), ``model`` and
    ``device`` (for ``in-process``), ``client`` (keyword arguments of
    ``kawhi_client.Client``: ``timeout``, ``retries``, ``wait_ready``, ``api_key``,
    ``encoding_format`` (default here ``base64``) ...), ``batch_wait_s`` (how long the
    ``SampleBatcher`` waits for stragglers after the batch's tasks, default 0.002),
    ``ref_logprobs`` (``KAWHI_REF_LOGPROBS``: the KL reference from the service),
    ``deadline_s`` (``KAWHI_DEADLINE_S``, default 120: the longest one KAWHI call may take,
    waiting for a loading server and retries included; past it the call is a failure the
    policy decides) and
    ``temperature`` (verl's ``actor_rollout_ref.rollout.temperature``)."""
    section = _cfg_get(_cfg_get(config, "reward"), "kawhi")
    if section is not None and hasattr(section, "items") and not isinstance(section, Mapping):
        try:
            from omegaconf import OmegaConf

            section = OmegaConf.to_container(section, resolve=True)
        except Exception:
            section = dict(section.items())
    section = dict(section or {})
    env_options = os.environ.get("KAWHI_OPTIONS")
    return {
        "url": section.get("url") or os.environ.get("KAWHI_URL"),
        "on_error": section.get("on_error") or os.environ.get("KAWHI_ON_ERROR") or "raise",
        "options": dict(section.get("options") or (json.loads(env_options) if env_options else {})),
        "inner": section.get("inner") or os.environ.get("KAWHI_INNER_REWARD_MANAGER") or "naive",
        "model": section.get("model") or os.environ.get("KAWHI_MODEL"),
        "device": section.get("device") or os.environ.get("KAWHI_DEVICE") or "cpu",
        "client": dict(section.get("client") or {}),
        "batch_wait_s": section.get("batch_wait_s", os.environ.get("KAWHI_BATCH_WAIT_S", 0.002)),
        "ref_logprobs": _truthy(section.get("ref_logprobs", os.environ.get("KAWHI_REF_LOGPROBS", False))),
        "deadline_s": float(section.get("deadline_s", os.environ.get("KAWHI_DEADLINE_S", DEFAULT_DEADLINE_S))),
        "temperature": float(_cfg_get(_cfg_get(_cfg_get(config, "actor_rollout_ref"), "rollout"), "temperature", 1.0)
                             or 1.0),
    }


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def reweighter_from_config(config: Any) -> Reweighter:
    """The Reweighter a reward worker uses, built from ``kawhi_settings(config)``."""
    s = kawhi_settings(config)
    url = s["url"]
    if url is None:
        raise KawhiIntegrationError("KAWHI is not configured: set +reward.kawhi.url=http://host:port "
                                    "(or in-process), or the KAWHI_URL environment variable")
    if url in ("in-process", "inprocess", "in_process"):
        from kawhi_client.integrations.common import InProcessBackend

        backend: Any = InProcessBackend(model=s["model"], device=s["device"])
    elif str(url).startswith("ray://"):  # kawhi on Ray Serve, through its DeploymentHandle (no HTTP)
        from kawhi_client.integrations.ray_backend import RayBackend

        backend = RayBackend.from_url(str(url), timeout_s=s["deadline_s"])
    else:
        from kawhi_client.client import Client

        # weights come back as float32 base64 (verl multiplies them into float32 tensors anyway);
        # the deadline bounds both the wait for a loading server and each request's read
        deadline = s["deadline_s"]
        backend = as_backend(Client(url, **{"encoding_format": "base64", "timeout": deadline, "wait_ready": deadline,
                                            **s["client"]}))
    options = dict(s["options"])
    if s["ref_logprobs"]:  # the KL reference from the same call, at verl's own temperature
        options.update(return_ref_logprobs=True, logprob_temperature=s["temperature"])
    # advantage 1.0 is sent ("given"): token_advantages == token_weights; nothing is skipped
    return Reweighter(backend, options=options, on_error=s["on_error"], skip_zero_advantage=False)


# ============================================================================ one sample


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    return list(value)


def rollout_from_sample(data: Any, tokenizer: Any = None) -> Rollout:
    """One verl sample of the legacy trainer (a length-1 DataProto as the reward loop hands
    it, or a DataProtoItem) -> a ``Rollout`` with advantage 1.0 (so the service returns the
    weights as advantages).

    Token ids: ``responses[:valid_length]`` with the valid length from ``attention_mask``
    (exactly what verl's reward managers score); the rest as ``rollout_from_prompt``."""
    item = data if _is_item(data) else data[0]
    batch, non_tensor = item.batch, item.non_tensor_batch
    responses = batch["responses"]
    length = responses.shape[-1]
    valid = int(batch["attention_mask"][-length:].sum())
    return rollout_from_prompt(responses[:valid].tolist(), non_tensor.get("raw_prompt"),
                               non_tensor.get("multi_modal_data"), non_tensor.get("uid"), tokenizer)


def rollout_from_prompt(token_ids: Sequence[int], raw_prompt: Any, multi_modal_data: Any = None, uid: Any = None,
                        tokenizer: Any = None) -> Rollout:
    """The policy's own response token ids and verl's dataset row -> a ``Rollout`` (advantage 1.0).

    Prompt: ``raw_prompt`` (chat messages, as verl's RLHFDataset builds them; its image part
    holds the image). Image: that part, else ``multi_modal_data`` (``image`` / ``images``).
    A sample KAWHI cannot take (no image, several) gets ``error`` set: the policy decides."""
    ids = [int(t) for t in token_ids]
    error, messages, image = None, None, None
    try:
        if raw_prompt is None:
            raise ValueError("the sample has no raw_prompt (verl's RLHFDataset sets it)")
        messages, found = wire_messages([dict(m) for m in _as_list(raw_prompt)])
        mm_images = []
        if isinstance(multi_modal_data, Mapping):
            mm = multi_modal_data
            mm_images = _as_list(mm.get("image") if mm.get("image") is not None else mm.get("images"))
        if len(found) > 1 or len(mm_images) > 1:
            raise ValueError(f"the prompt holds {max(len(found), len(mm_images))} images; KAWHI needs exactly one")
        if not found:
            raise ValueError("the prompt has no image part")
        image = found[0] if found[0] is not None else (mm_images[0] if mm_images else None)
    except ValueError as exc:
        error = str(exc)
    text = ""
    if tokenizer is not None and ids:
        try:
            text = tokenizer.decode(ids, skip_special_tokens=False)
        except Exception:
            text = ""
    return Rollout(token_ids=ids, image=image, messages=messages, advantage=1.0, text=text,
                   group_id=None if uid is None else str(uid), error=error)


def _is_item(data: Any) -> bool:
    return type(data).__name__ == "DataProtoItem"


def row_extra_info(row: RowResult, on_error: str, ref_logprobs: bool = False) -> dict[str, Any]:
    if row.reweighted or row.reason == "empty response":
        info = {WEIGHTS_KEY: encode_weights(row.token_weights, on_error), FALLBACK_KEY: 0.0}
    else:
        info = {WEIGHTS_KEY: encode_fallback(row.reason or "fallback"), FALLBACK_KEY: 1.0}
    if ref_logprobs:
        info[REF_KEY] = encode_fallback(row.reason or "fallback") if row.ref_logprobs is None else \
            encode_ref_logprobs(row.ref_logprobs)
    return info


def encode_ref_logprobs(values: Sequence[float]) -> str:
    """Reference log-probs -> ``kawhi-lp1:`` + base64 of little-endian float32 (exact for the
    service's float32 values; verl stacks extra info with ``np.array``, so one string per sample)."""
    import struct

    return _REF_PREFIX + base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()


def decode_ref_logprobs(value: Any) -> tuple[list[float] | None, str | None]:
    """A stored value -> (log-probs, None) or (None, the fallback reason)."""
    import struct

    for prefix in (_FALLBACK_PREFIX, _ERROR_PREFIX):
        if isinstance(value, str) and value.startswith(prefix):
            return None, value[len(prefix):] or "unknown"
    if not isinstance(value, str) or not value.startswith(_REF_PREFIX):
        raise KawhiIntegrationError(f"{REF_KEY} holds {str(value)[:40]!r}, not KAWHI reference log-probs")
    raw = base64.b64decode(value[len(_REF_PREFIX):])
    return list(struct.unpack(f"<{len(raw) // 4}f", raw)), None


# ============================================================================ the trainer process

_DRIVER_POLICY = FailurePolicy("fallback")


def driver_policy() -> FailurePolicy:
    """The counters of the advantage stage in this process: ``fallbacks`` / ``fallback_rows``
    (samples trained with plain GRPO advantages), ``reweighted_rows``."""
    return _DRIVER_POLICY


def weights_tensor(encoded: Any, response_mask: Any) -> Any:
    """The stored weights of a batch -> a ``(B, T)`` float tensor (1 where a sample fell back).

    Row i's weights cover its first ``n_i`` response positions (its valid response tokens);
    a response-mask position beyond them means the weights were computed for other tokens
    than the trainer's, which the reward stage's policy then decides (raise, or weight 1)."""
    import torch

    rows = list(encoded.tolist() if hasattr(encoded, "tolist") else encoded)
    B, T = response_mask.shape
    if len(rows) != B:
        raise KawhiIntegrationError(f"{len(rows)} stored KAWHI weights for a batch of {B}")
    out = torch.ones((B, T), dtype=torch.float32, device=response_mask.device)
    fell_back: list[str] = []
    for i, value in enumerate(rows):
        weights, reason, on_error = decode_weights(value)
        if weights is None and on_error == "raise":
            raise KawhiIntegrationError(f"sample {i}: {reason}")
        if weights is None:
            fell_back.append(reason or "fallback")
            continue
        n = len(weights)
        beyond = int(response_mask[i, n:].sum()) if n < T else 0
        if n > T or beyond:
            detail = (f"sample {i}: {n} stored weights for a {T}-token response with {beyond} masked token(s) "
                      "past them (weights computed for different tokens)")
            if on_error == "raise":
                raise KawhiIntegrationError(f"KAWHI result mismatch: {detail}")
            fell_back.append(detail)
            continue
        if n:
            out[i, :n] = torch.tensor(weights, dtype=torch.float32, device=response_mask.device)
    if fell_back:
        _DRIVER_POLICY.failed("fallback in the reward stage",
                              f"{len(fell_back)} of {B} samples have no KAWHI weights ({fell_back[0]})",
                              rows=len(fell_back))
    _DRIVER_POLICY.succeeded(B - len(fell_back))
    return out


def ref_log_prob_tensor(encoded: Any, response_mask: Any) -> Any:
    """The stored reference log-probs of a batch -> verl's ``ref_log_prob`` ``(B, T)`` float32:
    row i's values on its first ``n_i`` response positions, 0 after them (as verl's own
    ``no_padding_2_padding`` leaves them). A sample without them fails: the KL term has no
    reference to fall back to."""
    import torch

    rows = list(encoded.tolist() if hasattr(encoded, "tolist") else encoded)
    B, T = response_mask.shape
    if len(rows) != B:
        raise KawhiIntegrationError(f"{len(rows)} stored reference log-probs for a batch of {B}")
    out = torch.zeros((B, T), dtype=torch.float32, device=response_mask.device)
    for i, value in enumerate(rows):
        values, reason = decode_ref_logprobs(value)
        if values is None:
            raise KawhiIntegrationError(f"sample {i}: no reference log-probs from KAWHI ({reason}); "
                                        "the KL term has no reference to fall back to")
        n = len(values)
        if n > T or int(response_mask[i, n:].sum()):
            raise KawhiIntegrationError(f"sample {i}: {n} reference log-probs for a {T}-token response "
                                        f"with {int(response_mask[i].sum())} masked tokens")
        if n:
            out[i, :n] = torch.tensor(values, dtype=torch.float32, device=response_mask.device)
    return out

