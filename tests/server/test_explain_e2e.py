"""The explain view end to end: the engine's per-visual-token alignment, `kawhi explain`
on the examples, POST /v1/explain over real HTTP, the torch-free client, and the HTML
in a real headless Chromium."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from server_fixtures import assert_problem, default_engine, example_groups

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

from kawhi.engine.alignment import alignment_scores_reference, repeat_kv, visual_token_alignment  # noqa: E402
from kawhi.pipeline.local import LocalService  # noqa: E402

# ---------------------------------------------------------------------- the alignment map


@pytest.mark.parametrize("h,h_kv,t,n", [(4, 4, 5, 9), (8, 2, 3, 12), (6, 3, 1, 4)])
def test_visual_token_alignment_is_the_mean_cosine_over_heads_and_tokens(h, h_kv, t, n):
    gen = torch.Generator().manual_seed(h * 100 + n)
    q = torch.randn(h, t, 16, generator=gen)
    k = torch.randn(h_kv, n, 16, generator=gen)
    heads = [0, h - 1] if h > 1 else [0]
    got = visual_token_alignment(q, k, heads).double()
    kk = repeat_kv(k, h // h_kv)[heads].double()
    qq = q[heads].double()
    cos = torch.nn.functional.normalize(qq, dim=-1) @ torch.nn.functional.normalize(kk, dim=-1).transpose(1, 2)
    assert torch.allclose(got, cos.mean(dim=(0, 1)), atol=1e-6)
    # its mean over any selected tokens is the mean over the response of alpha_t
    selected = list(range(0, n, 2))
    alpha = alignment_scores_reference(q, k, selected, heads)
    assert abs(float(got[selected].mean()) - float(alpha.mean())) < 1e-6


def test_visual_token_alignment_refuses_an_empty_response():
    with pytest.raises(ValueError, match="no tokens"):
        visual_token_alignment(torch.zeros(2, 0, 4), torch.zeros(2, 3, 4))


@pytest.fixture(scope="module")
def engine():
    return default_engine()


def load(ref):
    from kawhi.engine.engine import load_image_bytes

    return load_image_bytes(ref, EXAMPLES)


def test_engine_explain_keeps_the_numbers_and_adds_a_consistent_map(engine):
    from kawhi_client.explain import ExplainedResult, Explanation

    groups = [json.loads(line) for line in (EXAMPLES / "rollouts.jsonl").read_text().splitlines() if line.strip()]
    plain = LocalService(engine).reweight(groups, base_dir=EXAMPLES)
    views = LocalService(engine).explain(groups, base_dir=EXAMPLES, heatmap_response=1)
    explained = LocalService(engine).reweight(groups, base_dir=EXAMPLES, explain=True)
    assert all(isinstance(v, Explanation) for v in views)
    for p, e, v in zip(plain, explained, views):
        assert isinstance(e, ExplainedResult) and not isinstance(p, ExplainedResult)
        assert p.model_dump() == e.model_dump(exclude={"visual_alignment"})  # explaining changes no number
        rows, cols = e.grid
        for response, amap in zip(e.responses, e.visual_alignment):
            amap = np.asarray(amap)
            assert amap.shape == (rows * cols,) and np.isfinite(amap).all()
            # mean over the selected tokens == token-weighted mean of the paragraphs' alpha
            counts = np.array([q.token_end - q.token_start for q in response.paragraphs])
            alphas = np.array([q.alpha for q in response.paragraphs])
            assert abs(amap[e.selected_tokens].mean() - (alphas * counts).sum() / counts.sum()) < 1e-5
        assert v.view.heatmap == pytest.approx(e.visual_alignment[1])
        assert v.view.image.size == (cols * engine.model.patch_side, rows * engine.model.patch_side)
    assert "visual_alignment" not in json.dumps([p.model_dump() for p in plain])


def test_engine_explain_reports_a_bad_group_and_goes_on(engine):
    from kawhi_client.explain import Explanation

    groups = [json.loads(line) for line in (EXAMPLES / "rollouts.jsonl").read_text().splitlines() if line.strip()]
    bad = dict(groups[0], responses=[{"text": "no reward"}])
    out = LocalService(engine).explain([bad, groups[1]], base_dir=EXAMPLES, heatmap_response=3)
    assert out[0].error is not None and out[0].error.pointer == "/responses/0/reward"
    assert isinstance(out[1], Explanation)
    out = LocalService(engine).explain([groups[1]], base_dir=EXAMPLES, heatmap_response=9)
    assert out[0].error is not None and "does not exist" in out[0].error.detail


def test_engine_explain_shows_the_text_that_token_ids_decode_to(engine):
    group = [json.loads(line) for line in (EXAMPLES / "rollouts.jsonl").read_text().splitlines() if line.strip()][0]
    ids = engine.model.tokenize("First look at the bars.\n\nThen answer 18.").token_ids
    group["responses"][0] = {"text": "(the trainer's own text, not what the ids say)", "reward": 1.0,
                             "token_ids": list(ids)}
    view = LocalService(engine).explain([group], base_dir=EXAMPLES)[0].view
    assert [s.text for s in view.responses[0].segments] == ["First look at the bars.\n\n", "Then answer 18."]


# ---------------------------------------------------------------------- CLI


def kawhi(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kawhi.cli", *args], capture_output=True, text=True, timeout=600)


def test_cli_explain_writes_one_png_and_one_html_per_example(tmp_path):
    from PIL import Image

    out = tmp_path / "out"
    proc = kawhi("explain", str(EXAMPLES / "rollouts.jsonl"), "-o", str(out), "--heatmap", "0")
    assert proc.returncode == 0, proc.stderr
    ids = [json.loads(line)["id"] for line in (EXAMPLES / "rollouts.jsonl").read_text().splitlines() if line.strip()]
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{i}.png" for i in ids] + [f"{i}.html" for i in ids])
    for i in ids:
        with Image.open(out / f"{i}.png") as picture:
            assert picture.format == "PNG" and 1000 < picture.width < 2000 and 600 < picture.height <= 1600
            colours = picture.convert("RGB").getcolors(1 << 20)
            assert colours is not None and len(colours) > 500  # a picture, not a blank page
        assert (out / f"{i}.html").read_text().startswith("<!DOCTYPE html>")
    assert "3 group(s) explained, 0 failed" in proc.stderr
    assert f"{ids[0]}.png" in proc.stderr  # the summary names the pictures to look at


def test_cli_explain_bad_line_is_one_line_and_the_rest_go_on(tmp_path):
    lines = (EXAMPLES / "rollouts.jsonl").read_text().splitlines()
    src = tmp_path / "in.jsonl"
    src.write_text("{not json\n" + lines[0].replace('"images/', f'"{EXAMPLES}/images/') + "\n")
    proc = kawhi("explain", str(src), "-o", str(tmp_path / "out"), "--temperature", "0.5")
    assert proc.returncode == 0, proc.stderr
    assert "line 1: not JSON" in proc.stderr
    assert len(list((tmp_path / "out").glob("*.png"))) == 1
    proc = kawhi("explain", str(src), "-o", str(tmp_path / "out2"), "--temperature", "-1")
    assert proc.returncode == 2 and "--temperature" in proc.stderr


# ---------------------------------------------------------------------- HTTP


@pytest.fixture(scope="module")
def server(default_server):
    return default_server


def test_post_explain_answers_png_or_html(server):
    from PIL import Image

    group = example_groups()[0]
    with server.client() as client:
        assert "/v1/explain" in client.get("/openapi.json").json()["paths"]
        resp = client.post("/v1/explain?heatmap=0", json={"groups": [group]})
        assert resp.status_code == 200, resp.text[:300]
        assert resp.headers["content-type"] == "image/png" and resp.headers["x-kawhi-pages"] == "1"
        picture = Image.open(io.BytesIO(resp.content))
        assert picture.format == "PNG" and picture.width > 1000
        resp = client.post("/v1/explain", json={"groups": [group]}, headers={"accept": "text/html"})
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
        assert resp.text.startswith("<!DOCTYPE html>") and "Response #4" in resp.text
        # the same group reweighted gives the numbers the picture shows
        numbers = client.post("/v1/reweight", json={"groups": [group]}).json()["results"][0]
        for paragraph in numbers["responses"][0]["paragraphs"]:
            assert f'data-weight="{paragraph["weight"]:.6g}"' in resp.text


def test_post_explain_errors_are_problems(server):
    groups = example_groups()
    with server.client() as client:
        assert_problem(client.post("/v1/explain", json={"groups": groups[:2]}), 422, "/groups")
        assert_problem(client.post("/v1/explain", json={"groups": [groups[0]]},
                                   headers={"accept": "application/json"}), 406, None)
        assert_problem(client.post("/v1/explain?heatmap=99", json={"groups": [groups[0]]}), 422, None)
        assert_problem(client.post("/v1/explain?page=x", json={"groups": [groups[0]]}), 422, None)
        bad = dict(groups[0], responses=[{"text": "no reward"}])
        assert_problem(client.post("/v1/explain", json={"groups": [bad]}), 422, "/groups/0/responses/0/reward")


# ---------------------------------------------------------------------- client without torch


def test_client_renders_from_a_result_and_its_image_without_torch(engine, tmp_path):
    groups = [json.loads(line) for line in (EXAMPLES / "rollouts.jsonl").read_text().splitlines() if line.strip()]
    result = LocalService(engine).reweight(groups[:1], base_dir=EXAMPLES)[0]
    (tmp_path / "result.json").write_text(result.model_dump_json())
    (tmp_path / "group.json").write_text(json.dumps(groups[0]))
    script = f"""
import json, sys
sys.modules['torch'] = None  # any import of torch now fails
sys.path[:0] = [{str(ROOT / 'client')!r}]
from kawhi_client.explain import explain
view = explain(json.load(open('group.json')), json.load(open('result.json')), {str(EXAMPLES / 'images' / 'bar_chart.png')!r})
print(*[p.name for p in view.save('out')])
assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["example-bar-chart.png", "example-bar-chart.html"]


# ---------------------------------------------------------------------- a real browser


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("!!! chromium NOT FOUND: the explain HTML is NOT checked in a real browser. Install it "
                "(apt-get install -y chromium, or bash scripts/setup.sh) !!!")


def test_html_renders_in_headless_chromium_to_a_non_blank_screenshot(engine, tmp_path):
    from PIL import Image

    browser = chromium()
    groups = [json.loads(line) for line in (EXAMPLES / "rollouts.jsonl").read_text().splitlines() if line.strip()]
    view = LocalService(engine).explain(groups[:1], base_dir=EXAMPLES, heatmap_response=0)[0]
    page = tmp_path / "view.html"
    page.write_text(view.html(), encoding="utf-8")
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
         "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1100",
         f"--screenshot={shot}", page.as_uri()],
        capture_output=True, text=True, timeout=180)
    assert shot.exists(), (proc.returncode, proc.stderr[-2000:])
    image = Image.open(shot).convert("RGB")
    assert image.size == (1400, 1100)
    colours = image.getcolors(1 << 22)
    assert colours is not None and len(colours) > 300  # text, the image and the shading all drew
    white = max(colours)[0] / (image.width * image.height)
    assert white < 0.9
    # the embedded image shows: the key-region orange is somewhere on the screenshot
    from kawhi_client.explain.style import KEY_RGB, OVERLAY_OPACITY, blend

    pixels = np.asarray(image).reshape(-1, 3).astype(int)
    tinted = np.array(blend((255, 255, 255), KEY_RGB, OVERLAY_OPACITY))
    assert (np.abs(pixels - tinted).max(axis=1) <= 6).sum() > 500


def test_html_reflows_in_a_narrow_browser_window(engine, tmp_path):
    """At 600 px wide nothing is clipped: the page's scroll width is the window's."""
    browser = chromium()
    groups = [json.loads(line) for line in (EXAMPLES / "rollouts.jsonl").read_text().splitlines() if line.strip()]
    view = LocalService(engine).explain(groups[:1], base_dir=EXAMPLES, heatmap_response=0)[0]
    probe = "<script>document.title = 'scroll:' + document.documentElement.scrollWidth;</script></body>"
    page = tmp_path / "narrow.html"
    page.write_text(view.html().replace("</body>", probe), encoding="utf-8")
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
         "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=600,900", "--dump-dom",
         page.as_uri()],
        capture_output=True, text=True, timeout=180)
    import re

    found = re.search(r"<title>scroll:(\d+)</title>", proc.stdout)
    assert found, (proc.returncode, proc.stderr[-2000:])
    assert int(found.group(1)) <= 600


def test_a_page_past_the_drawn_ones_is_a_422_and_the_early_bound_holds(server):
    """The pages a long group fills stay under the bound the server checks before the forward
    (kawhi.pipeline.explain.most_pages); a page between the two is refused after drawing."""
    from kawhi.pipeline.explain import most_pages
    from kawhi_client.schema import RolloutGroup

    group = example_groups()[0]
    paragraph = "The bars rise from left to right and the last one is the tallest of all. " * 4
    group = dict(group, responses=[dict(r, text="\n\n".join([paragraph] * 6)) for r in group["responses"]])
    with server.client() as client:
        resp = client.post("/v1/explain", json={"groups": [group]})
        assert resp.status_code == 200, resp.text[:300]
        pages = int(resp.headers["x-kawhi-pages"])
        assert pages > 1
        engine = server.state.pipeline().engine
        parsed = RolloutGroup.model_validate({k: v for k, v in group.items() if k != "image"} | {"image": {"sha256": "ab" * 32}})
        assert pages <= most_pages(engine, parsed)
        last = client.post(f"/v1/explain?page={pages}", json={"groups": [group]})
        assert last.status_code == 200 and last.content != resp.content
        assert_problem(client.post(f"/v1/explain?page={pages + 1}", json={"groups": [group]}), 422, None)
