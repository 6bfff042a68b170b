"""Head sets by model identity, heads files and their precedence, and how every front end reports them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from kawhi.engine.engine import TINY_MODEL_DIR, Engine
from kawhi.heads.files import (
    ALL_HEADS_SOURCE,
    FOLDER_HEADS_FILE,
    HeadsFileError,
    check_model_folder_heads,
    read_heads_file,
    resolve_head_set,
    write_heads_file,
)
from kawhi.heads.identity import IdentityError, ModelIdentity
from kawhi.heads.presets import PUBLISHED, published_heads
from server_fixtures import ServerThread
from tiny_models import tiny_reference

ROOT = Path(__file__).resolve().parents[2]

# config.json as published: Qwen2.5-VL keeps the LM fields at the top level, Qwen3-VL under text_config
QWEN25_VL_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "vocab_size": 152064, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "max_position_embeddings": 128000, "image_token_id": 151655, "video_token_id": 151656,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "tie_word_embeddings": False,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {"depth": 32, "hidden_size": 1280, "out_hidden_size": 3584, "num_heads": 16,
                      "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "intermediate_size": 3420},
}
QWEN3_VL_4B = {
    "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
    "text_config": {"hidden_size": 2560, "num_hidden_layers": 36, "num_attention_heads": 32,
                    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "intermediate_size": 9728},
    "vision_config": {"depth": 24, "hidden_size": 1024, "out_hidden_size": 2560},
}


def model_folder(tmp_path: Path, name: str, config: dict) -> Path:
    folder = tmp_path / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def heads_file(path: Path, identity: ModelIdentity, heads: list[int]) -> Path:
    write_heads_file(path, {"model": identity.to_dict(), "heads": heads})
    return path


# ---------------------------------------------------------------------- identity and presets


@pytest.mark.parametrize("config, preset", [(QWEN25_VL_7B, "Qwen2.5-VL-7B-Instruct"),
                                            (QWEN3_VL_4B, "Qwen3-VL-4B-Instruct")])
def test_published_set_by_identity_whatever_the_folder_is_called(tmp_path, config, preset):
    folder = model_folder(tmp_path, "policy-v3", config)
    head_set = check_model_folder_heads(folder)
    expected = next(p for p in PUBLISHED if p.name == preset)
    assert head_set.heads == expected.heads and head_set.source == f"published:{preset}"


def test_identity_is_the_same_from_the_file_and_from_transformers(tmp_path):
    from transformers import AutoConfig

    for config in (QWEN25_VL_7B, QWEN3_VL_4B):
        folder = model_folder(tmp_path, config["model_type"], config)
        loaded = AutoConfig.from_pretrained(folder, local_files_only=True)
        assert ModelIdentity.from_config(loaded).shape() == ModelIdentity.from_folder(folder).shape()


def test_a_name_does_not_make_a_preset_and_a_shape_change_unmakes_it(tmp_path):
    renamed = dict(QWEN25_VL_7B, num_hidden_layers=27, _name_or_path="Qwen/Qwen2.5-VL-7B-Instruct")
    head_set = check_model_folder_heads(model_folder(tmp_path, "Qwen2.5-VL-7B-Instruct", renamed))
    assert head_set.heads is None and head_set.source == ALL_HEADS_SOURCE
    other = dict(QWEN25_VL_7B, model_type="qwen2_vl")  # Qwen2-VL-7B has the same LM shape
    assert published_heads(ModelIdentity.from_dict(other)) is None


def test_name_or_path_is_provenance_only(tmp_path):
    named = dict(QWEN25_VL_7B, _name_or_path="/checkpoints/grpo-step-500")
    identity = ModelIdentity.from_folder(model_folder(tmp_path, "m", named))
    assert identity.name_or_path == "/checkpoints/grpo-step-500"
    assert published_heads(identity).name == "Qwen2.5-VL-7B-Instruct"


@pytest.mark.parametrize("raw, field", [({}, "model_type"), ({"model_type": "qwen2_5_vl"}, "num_hidden_layers"),
                                        (dict(QWEN25_VL_7B, hidden_size=-1), "hidden_size"),
                                        (dict(QWEN25_VL_7B, vocab_size="big"), "vocab_size")])
def test_an_incomplete_identity_names_its_field(raw, field):
    with pytest.raises(IdentityError, match=field):
        ModelIdentity.from_dict(raw)


# ---------------------------------------------------------------------- heads files


def test_precedence_file_then_folder_file_then_published_then_all(tmp_path):
    folder = model_folder(tmp_path, "m", QWEN25_VL_7B)
    identity = ModelIdentity.from_folder(folder)
    assert resolve_head_set(identity, model_dir=folder).source == "published:Qwen2.5-VL-7B-Instruct"
    heads_file(folder / FOLDER_HEADS_FILE, identity, [5, 2, 5])
    in_folder = resolve_head_set(identity, model_dir=folder)
    assert in_folder.heads == (2, 5) and in_folder.source == f"file:{folder / FOLDER_HEADS_FILE}"
    explicit = heads_file(tmp_path / "mine.json", identity, [7])
    chosen = resolve_head_set(identity, heads_file=explicit, model_dir=folder)
    assert chosen.heads == (7,) and chosen.source == f"file:{explicit}"


def test_a_heads_file_for_another_model_is_refused_in_one_line(tmp_path):
    folder = model_folder(tmp_path, "m", QWEN3_VL_4B)
    wrong = heads_file(tmp_path / "7b.json", ModelIdentity.from_dict(QWEN25_VL_7B), [0, 1])
    with pytest.raises(HeadsFileError) as caught:
        check_model_folder_heads(folder, wrong)
    message = str(caught.value)
    assert "\n" not in message and "made for another model" in message and "kawhi heads discover" in message
    for field in ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads"):
        assert field in message
    # a wrong file in the model folder is refused too, not skipped
    (folder / FOLDER_HEADS_FILE).write_text(wrong.read_text())
    with pytest.raises(HeadsFileError, match="made for another model"):
        check_model_folder_heads(folder)


@pytest.mark.parametrize("body, match", [
    ("not json", "not JSON"), ("[1, 2]", "JSON object"), ('{"heads": [1]}', "model"),
    (None, "does not exist"),
])
def test_broken_heads_files_are_refused_with_a_reason(tmp_path, body, match):
    path = tmp_path / "h.json"
    if body is not None:
        path.write_text(body)
    with pytest.raises(HeadsFileError, match=match):
        read_heads_file(path)


@pytest.mark.parametrize("heads, match", [([], "lists no heads"), ([1, -2], "non-negative"), ([99], "has 28 heads"),
                                          ("0,1", "list of")])
def test_bad_head_lists(tmp_path, heads, match):
    identity = ModelIdentity.from_dict(QWEN25_VL_7B)
    path = tmp_path / "h.json"
    path.write_text(json.dumps({"model": identity.to_dict(), "heads": heads}))
    with pytest.raises(HeadsFileError, match=match):
        resolve_head_set(identity, heads_file=path)


# ---------------------------------------------------------------------- the engine and its front ends


def test_engine_uses_and_reports_the_heads_file(tmp_path):
    reference = tiny_reference("qwen2_5_vl")
    assert Engine(reference).info()["heads_source"] == ALL_HEADS_SOURCE
    identity = ModelIdentity.from_config(reference.model.config)
    path = heads_file(tmp_path / "h.json", identity, [3, 1])
    engine = Engine(reference, heads_file=path)
    info = engine.info()
    assert info["heads"] == [1, 3] and info["preset_heads"] == [1, 3]
    assert info["heads_source"] == f"file:{path}" and info["model_identity"] == identity.to_dict()
    assert engine.resolve_heads(engine.resolve_options({"heads": "all"})) == (0, 1, 2, 3)
    other = heads_file(tmp_path / "other.json", ModelIdentity.from_dict(QWEN25_VL_7B), [1])
    with pytest.raises(HeadsFileError, match="made for another model"):
        Engine(reference, heads_file=other)


def default_identity() -> ModelIdentity:
    """The model `kawhi serve` / `kawhi reweight` load with no --model: the embedded kawhi-tiny."""
    return ModelIdentity.from_folder(TINY_MODEL_DIR)


def test_server_reports_heads_and_their_source(tmp_path):
    path = heads_file(tmp_path / "tiny-heads.json", default_identity(), [0, 2])
    with ServerThread(engine=None, heads_file=str(path)) as server:
        server.wait_ready()
        info = httpx.get(server.url + "/v1/info", timeout=30).json()
    assert info["heads"] == [0, 2] and info["heads_source"] == f"file:{path}"
    assert info["model_identity"]["num_attention_heads"] == 4


def test_heads_file_setting_reads_the_environment(monkeypatch):
    from kawhi.server.settings import Settings

    monkeypatch.setenv("KAWHI_HEADS_FILE", "/etc/kawhi/heads.json")
    assert Settings().heads_file == "/etc/kawhi/heads.json"
    monkeypatch.setenv("KAWHI_HEADS_FILE", " ")
    assert Settings().heads_file is None


def kawhi(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "service"), str(ROOT / "client")]),
               **(env or {})}
    return subprocess.run([sys.executable, "-m", "kawhi.cli", *args], capture_output=True, text=True, timeout=300,
                          env=environ)


def test_serve_and_reweight_refuse_a_mismatching_file_before_starting(tmp_path):
    wrong = heads_file(tmp_path / "7b.json", ModelIdentity.from_dict(QWEN25_VL_7B), [0, 1])
    for run in (kawhi("serve", "--heads-file", str(wrong), "--port", "0"),
                kawhi("serve", "--port", "0", env={"KAWHI_HEADS_FILE": str(wrong)}),
                kawhi("reweight", str(ROOT / "examples" / "rollouts.jsonl"), "-o", str(tmp_path / "o.jsonl"),
                      "--heads-file", str(wrong))):
        assert run.returncode == 2, run.stderr
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "made for another model" in lines[0], run.stderr


def test_heads_show_and_reweight_with_a_heads_file(tmp_path):
    path = heads_file(tmp_path / "tiny-heads.json", default_identity(), [0, 2])
    shown = kawhi("heads", "show", "--heads-file", str(path))
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == {"model": default_identity().to_dict(), "heads": [0, 2],
                                        "heads_source": f"file:{path}"}
    out = tmp_path / "out.jsonl"
    run = kawhi("reweight", str(ROOT / "examples" / "rollouts.jsonl"), "-o", str(out), "--quiet",
                env={"KAWHI_HEADS_FILE": str(path)})
    assert run.returncode == 0, run.stderr
    def results() -> list[dict]:  # each line without its provenance, which names the options as given
        return [{k: v for k, v in json.loads(line).items() if k != "kawhi"} for line in out.read_text().splitlines()]

    with_file = results()
    run = kawhi("reweight", str(ROOT / "examples" / "rollouts.jsonl"), "-o", str(out), "--quiet", "--heads", "0,2")
    assert run.returncode == 0, run.stderr
    assert with_file == results()  # 'preset' resolved to the file's heads
    run = kawhi("reweight", str(ROOT / "examples" / "rollouts.jsonl"), "-o", str(out), "--quiet")
    assert results() != with_file  # kawhi-tiny's default: its shipped heads file ([1])
