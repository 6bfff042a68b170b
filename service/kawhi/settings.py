"""Server settings: every knob of `kawhi serve`, read from flags, `KAWHI_*` env vars and defaults.

Precedence: command-line flag > ``KAWHI_<NAME>`` environment variable > default.
The CLI passes only the flags the operator actually gave as init arguments, which
pydantic-settings ranks above the environment.

Besides the server's own limits, every default of the method is a setting of the same
name (``KAWHI_TEMPERATURE``, ``KAWHI_SKIP_RATIO`` ...), and the SGUF thresholds are
``KAWHI_SGUF_<NAME>``. These fields are generated from the one definition of the
options (``kawhi_client/options.py``: type, default, range, choices) so a new option
becomes a server setting, with its range, without touching this file.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from kawhi_client.options import OPTIONS, SGUF_OPTIONS
from pydantic import Field, SecretStr, create_model, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from kawhi.engine.config import MethodConfig, SgufParams
from kawhi.engine.images import ImageLimits

_IMAGE = ImageLimits()  # the engine's image limits are the defaults here

MiB = 1024 * 1024


class _ServerSettings(BaseSettings):
    """The server's own settings (the method defaults are added below)."""

    model_config = SettingsConfigDict(
        env_prefix="KAWHI_",
        case_sensitive=False,
        extra="ignore",
        validate_default=True,
    )

    # --- model -------------------------------------------------------------------
    model: str | None = Field(
        None, description="reference model: a local checkpoint folder (loaded offline); unset = the embedded kawhi-tiny model (docs/tiny.md)"
    )
    device: str = Field("cpu", description="torch device of the reference model (cpu, cuda, cuda:1 ...)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="torch dtype of the reference model")
    heads_file: str | None = Field(
        None, description="vision-critical heads file (from `kawhi heads discover`) for heads=preset; wins over "
        "kawhi_heads.json in the model folder and the published sets; made for another model -> refused at start-up"
    )

    # --- network -----------------------------------------------------------------
    host: str = Field("127.0.0.1", description="interface to bind")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to bind (0 = any free port)")
    grpc_port: int | None = Field(
        None, ge=0, le=65535,
        description="TCP port of the gRPC front end (kawhi.v1.Kawhi, health, reflection) on the same host; "
        "unset = HTTP only, 0 = any free port",
    )
    api_keys: SecretStr | None = Field(
        None, description="comma-separated bearer API keys; unset or empty = no authentication"
    )
    root_path: str = Field("", description="ASGI root_path when served behind a path-prefixing proxy")

    # --- request limits ----------------------------------------------------------
    max_body_bytes: int = Field(64 * MiB, gt=0, description="largest request body; larger -> 413 before parsing")
    max_image_bytes: int = Field(_IMAGE.max_bytes, gt=0, description="largest encoded image; larger -> 413")
    max_image_pixels: int = Field(
        _IMAGE.max_pixels, gt=0, description="largest decoded image (width*height, read from the header); larger -> 413"
    )
    min_image_side: int = Field(_IMAGE.min_side, ge=1, description="smallest image width/height accepted")
    max_groups: int = Field(256, gt=0, description="most rollout groups in one request; more -> 413")
    max_responses_per_group: int = Field(64, gt=0, description="most responses in one group; more -> 413")
    max_tokens_per_response: int = Field(8192, gt=0, description="most tokens in one response; more -> 413")
    max_request_tokens: int = Field(
        1_048_576, gt=0, description="most tokens (prefix + responses, all groups) in one request; more -> 413"
    )

    # --- scheduling --------------------------------------------------------------
    batch_tokens: int = Field(
        32768,
        gt=0,
        description="token budget of one batched forward; a single group larger than this is refused (413)",
    )
    batch_wait_ms: float = Field(
        5.0, ge=0, description="how long the batcher waits for more groups before running a partial batch"
    )
    queue_groups: int = Field(
        512, gt=0, description="groups admitted and not yet in a forward; a request that would exceed it -> 429"
    )
    request_timeout_s: float = Field(120.0, gt=0, description="per-request deadline; exceeded -> 504")
    drain_timeout_s: float = Field(
        60.0, ge=0, description="on SIGTERM, the whole shutdown: in-flight requests finish or answer 503 + "
        "Retry-After within it, then the process exits"
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="a connection whose request headers are not complete within this is closed"
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="a request body (or a gRPC PutImage upload) not received within this is answered "
        "408 (gRPC DEADLINE_EXCEEDED)"
    )
    stream_window_groups: int = Field(
        64, gt=0, description="groups of one gRPC ReweightStream read and not yet answered; a client that does not "
        "read its results is not read further (backpressure)"
    )
    prepare_threads: int = Field(
        1, ge=1, description="threads that decode images and tokenize (the forward has its own thread)"
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads (unset = auto: on cpu, the usable cores minus the prepare and "
        "event-loop threads, at least 1; on a GPU, torch's default). On a quiet CPU host more threads are "
        "faster (bench/README.md: 2 threads gave 1.7x the throughput of 1 on 2 cores); under contention "
        "OpenMP barriers made 2 threads 5-40x slower, hence the cautious auto",
    )

    # --- caches ------------------------------------------------------------------
    redis_url: str | None = Field(
        None, description="redis://host:port/db; unset = in-process LRU caches only"
    )
    redis_timeout_s: float = Field(0.5, gt=0, description="socket timeout of every Redis call")
    redis_retry_s: float = Field(2.0, gt=0, description="while Redis is down, how often to probe it")
    cache_image_bytes: int = Field(512 * MiB, ge=0, description="in-process LRU budget for image bytes")
    cache_result_bytes: int = Field(128 * MiB, ge=0, description="in-process LRU budget for stored responses")
    cache_region_bytes: int = Field(32 * MiB, ge=0, description="in-process LRU budget for region selections")
    cache_prefix_bytes: int = Field(
        256 * MiB, ge=0,
        description="LRU budget, in the model's device memory, for image + prompt prefixes (KV of layers 0..L-2 and "
        "visual states) kept across requests, so single-response requests of one group share one prefix; 0 = off",
    )
    split_attention: bool | None = Field(
        None, description="responses attend to the one stored copy of their prefix instead of a per-response copy "
        "of its KV cache (exact); unset = where it measured faster (CPU)",
    )
    gzip_min_bytes: int = Field(
        4096, ge=0, description="gzip answers at least this large when the client accepts gzip; 0 = never"
    )
    image_ttl_s: int = Field(86400, gt=0, description="how long Redis keeps an image")
    result_ttl_s: int = Field(3600, gt=0, description="how long a response is kept for idempotent retries")
    region_ttl_s: int = Field(86400, gt=0, description="how long Redis keeps a region selection")

    # --- logging -----------------------------------------------------------------
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    log_json: bool | None = Field(
        None, description="structured JSON logs (one object per line); unset: text on a terminal, JSON otherwise")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _empty_keys_are_none(cls, v: Any) -> Any:
        if isinstance(v, str) and not v.strip():
            return None
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @field_validator("redis_url", "model", "heads_file", "grpc_port", mode="before")
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        if isinstance(v, str) and not v.strip():
            return None
        return v

    # ------------------------------------------------------------------------------
    def api_key_list(self) -> list[bytes]:
        if self.api_keys is None:
            return []
        return [k.strip().encode() for k in self.api_keys.get_secret_value().split(",") if k.strip()]

    def resolved_torch_threads(self) -> int | None:
        """torch intra-op threads to set, or None to leave torch's default (see ``torch_threads``).

        On CPU, OpenMP workers that compete with the prepare thread and the event loop
        for the same cores spin at every barrier; on a 2-core machine under load that
        made the forward 5-40x slower than with a single intra-op thread.
        """
        if self.torch_threads:
            return self.torch_threads
        if not self.device.startswith("cpu"):
            return None
        import os

        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        return max(1, cores - self.prepare_threads - 1)

    def method_config(self) -> MethodConfig:
        """The server-wide method defaults as a validated MethodConfig."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(MethodConfig):
            if f.name == "sguf":
                continue
            values[f.name] = getattr(self, f.name)
        values["heads"] = parse_heads(values["heads"])
        sguf = SgufParams(**{f.name: getattr(self, f"sguf_{f.name}") for f in dataclasses.fields(SgufParams)})
        return MethodConfig(**values, sguf=sguf)

    def redacted(self) -> dict[str, Any]:
        """Every setting, JSON-ready, with secrets hidden (printed once at start-up)."""
        out = self.model_dump(mode="json")
        keys = self.api_key_list()
        out["api_keys"] = f"<{len(keys)} key(s) redacted>" if keys else None
        if self.redis_url:
            out["redis_url"] = redact_url(self.redis_url)
        out["torch_threads_resolved"] = self.resolved_torch_threads()
        return out


def parse_heads(value: Any) -> Any:
    """'preset' | 'all' | '0,1,3' | '[0, 1, 3]' | a list -> MethodConfig's heads spec."""
    if isinstance(value, (list, tuple)):
        return tuple(int(h) for h in value)
    text = str(value).strip()
    if text in ("preset", "all"):
        return text
    text = text.strip("[]() ")
    try:
        heads = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"heads must be 'preset', 'all' or comma-separated ints, got {value!r}") from None
    if not heads:
        raise ValueError("heads must not be empty")
    return heads


def redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _setting_field(spec: Any, name: str, what: str) -> tuple[Any, Any]:
    """A settings field from one option of the one definition (kawhi_client/options.py)."""
    description = f"{what} `{spec.name}`: {spec.help}"
    if spec.kind == "float":
        bound = {"gt" if spec.exclusive_minimum else "ge": spec.minimum, "le": spec.maximum}
        return float, Field(spec.default, description=description, allow_inf_nan=False,
                            **{k: v for k, v in bound.items() if v is not None})
    if spec.kind == "int":
        return int, Field(spec.default, description=description, ge=spec.minimum, le=spec.maximum)
    if spec.kind == "bool":
        return bool, Field(spec.default, description=description)
    if spec.kind == "choice" and not spec.registry:
        return Literal[spec.choices], Field(spec.default, description=description)  # type: ignore[valid-type]
    # heads ('preset' | 'all' | '0,1,3', parsed by method_config()) and registry names (checked there)
    return str, Field(spec.default, description=description)


def _method_fields() -> dict[str, Any]:
    """One settings field per method option and per SGUF threshold, from the one definition."""
    fields: dict[str, Any] = {o.name: _setting_field(o, o.name, "method default") for o in OPTIONS}
    for o in SGUF_OPTIONS:
        fields[f"sguf_{o.name}"] = _setting_field(o, f"sguf_{o.name}", "SGUF threshold")
    return fields


METHOD_FIELDS: tuple[str, ...] = tuple(_method_fields())


def _check_method(self: Any) -> Any:
    self.method_config()  # raises ValueError on a bad combination (w_min > w_max, ...)
    return self


Settings = create_model(  # type: ignore[call-overload]
    "Settings",
    __base__=_ServerSettings,
    __doc__="All settings of `kawhi serve` (server limits + method defaults).",
    __validators__={"_check_method": model_validator(mode="after")(_check_method)},
    **_method_fields(),
)
