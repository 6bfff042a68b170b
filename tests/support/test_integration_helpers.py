"""Helpers of the trainer-integration tests (tests/integrations/; this module holds no tests): a live
`kawhi serve` subprocess, the kawhi-tiny engine, small images, the kawhi-tiny policy for the trainers.

Imported by those tests only (not a conftest, so other suites are unaffected).
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from server_fixtures import free_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


@contextlib.contextmanager
def kawhi_serve(*extra_args: str, ready_timeout: float = 120.0) -> Iterator[str]:
    """`kawhi serve` (kawhi-tiny, whose tokenizer the test policies share; a later --model in
    ``extra_args`` wins) in a subprocess on a free port; yields its URL; stops it."""
    from kawhi.engine.engine import TINY_MODEL_DIR

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAWHI_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "service"), str(ROOT / "client"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "kawhi.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", "--model", str(TINY_MODEL_DIR), *extra_args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"kawhi serve exited with {proc.returncode}: "
                                   f"{proc.stderr.read().decode(errors='replace')[-2000:]}")
            try:
                if httpx.get(url + "/readyz", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("kawhi serve did not become ready")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


@functools.cache
def default_engine() -> Any:
    """kawhi-tiny, the default model: the test policies (tiny_models, tiny_policy) share its tokenizer."""
    from kawhi.engine.engine import TINY_MODEL_DIR, Engine

    return Engine.load(TINY_MODEL_DIR)


def small_image(name: str = "triangle.png", side: int = 84) -> Any:
    """One of the example images, resized to side x side (3x3 visual tokens at 84 px)."""
    from PIL import Image

    return Image.open(EXAMPLES / "images" / name).convert("RGB").resize((side, side), Image.Resampling.BICUBIC)


def png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def tiny_processor() -> Any:
    """A Qwen2.5-VL processor over kawhi-tiny's tokenizer and image processor.

    Built by hand because AutoProcessor also wants the video processor, which needs
    torchvision (not installed: it would pull another torch)."""
    from kawhi.engine.engine import TINY_MODEL_DIR
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class _ImageOnlyProcessor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR, local_files_only=True)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(TINY_MODEL_DIR, local_files_only=True)
    return _ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                               chat_template=(TINY_MODEL_DIR / "chat_template.jinja").read_text())


def tiny_policy(seed: int = 0) -> Any:
    """kawhi-tiny's Qwen2.5-VL (about 5 MB) as a trainable float32 policy: the weights the service serves."""
    import torch
    from kawhi.engine.engine import TINY_MODEL_DIR
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(TINY_MODEL_DIR, dtype=torch.float32,
                                                              local_files_only=True)


def reference_logprobs(policy: Any, question: str, image_name: str, ids: list[int], temperature: float) -> Any:
    """Per-token log-probs of ``ids`` under ``policy`` (the kawhi-tiny weights the service serves), by a plain
    transformers forward of image + chat prompt + response at ``temperature``: the oracle the
    service's reference log-probs are checked against."""
    import torch

    ref = default_engine().model
    resized, _ = ref.resize_image(small_image(image_name))
    prompt = ref.encode_prompt(resized, messages=[{"role": "user", "content": [{"type": "image"},
                                                                             {"type": "text", "text": question}]}])
    seq = torch.cat([prompt.input_ids, torch.tensor(ids)])[None]
    with torch.no_grad():
        logits = policy(input_ids=seq, pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw,
                        mm_token_type_ids=(seq == ref.image_token_id).int()).logits[0]
    P = prompt.input_ids.numel()
    logp = torch.log_softmax(logits[P - 1:-1].float() / temperature, -1)
    return logp.gather(-1, torch.tensor(ids)[:, None])[:, 0]
