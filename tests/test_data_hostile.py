"""Inputs that used to hang, leak, traceback or train silently wrong (issue 23's probe): image URLs with
credentials, slow or huge answers, FIFOs and devices given as images, NUL bytes in paths, animations
and multi-page TIFFs, an image that disappears once training started, secrets in a recipe's comments.

URLs are served by a local http.server on 127.0.0.1 in this process (nothing leaves the machine);
every handler ends on its own within seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import spawn

from vlmtune.data.images import ImageProblem, ImageUnreadable, UrlImage, image_facts, open_image, open_images

from conftest import PIXEL_BUDGET, ROOT, write_recipe

IMAGES = ROOT / "tests" / "data" / "formats" / "images"
RED = (IMAGES / "red.png").read_bytes()
SIGNATURE = "c2VjcmV0LXNpZ25hdHVyZQ"  # what a presigned URL's X-Amz-Signature would hold


class Handler(BaseHTTPRequestHandler):
    gone_when: Path | None = None  # /vanishing.png answers 404 once this file exists

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path == "/red.png" or (
            path == "/vanishing.png" and not (self.gone_when and self.gone_when.exists())
        ):
            self._send(RED)
        elif path == "/slow.png":  # a byte every 0.2 s: each read is quick, the whole never ends (20 s cap)
            self.send_response(200)
            self.send_header("Content-Length", str(len(RED)))
            self.end_headers()
            for byte in RED[:100]:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.2)
        elif path == "/declared-huge.png":
            self.send_response(200)
            self.send_header("Content-Length", str(10**10))
            self.end_headers()
        elif path == "/endless.png":  # no Content-Length: streams until the client stops (4 MiB cap)
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(64):
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                pass
        else:
            self.send_error(404)

    def _send(self, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        Handler.gone_when = None


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The CLI with a time limit: a hang fails the test instead of holding the suite."""
    env = {k: v for k, v in os.environ.items() if k != "VLMTUNE_DEBUG"}
    return spawn.run(
        [sys.executable, "-m", "vlmtune", *args], cwd=ROOT, capture_output=True, text=True, env=env,
        timeout=timeout,
    )  # fmt: skip


def sample(image: str) -> dict:
    return {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image", "image": image}, {"type": "text", "text": "Colour?"}],
            },
            {"role": "assistant", "content": "Red."},
        ]
    }


def write_data(folder: Path, images: list[str]) -> Path:
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(sample(image)) + "\n" for image in images))
    return path


def animations(folder: Path) -> dict[str, Path]:
    from PIL import Image

    frames = [Image.new("RGB", (32, 24), colour) for colour in ((200, 0, 0), (0, 200, 0), (0, 0, 200))]
    paths = {"gif": folder / "anim.gif", "apng": folder / "anim.png", "tiff": folder / "pages.tiff"}
    for path in paths.values():
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.new("RGB", (32, 24), (200, 0, 0)).save(folder / "still.gif")
    return paths


# --- URLs -------------------------------------------------------------------------------------------


def test_a_url_that_trickles_is_cut_at_the_overall_deadline(server: str):
    started = time.monotonic()
    with pytest.raises(ImageProblem, match=r"no complete answer within data.url_timeout=1s"):
        UrlImage(f"{server}/slow.png?sig={SIGNATURE}", timeout=1.0).fetch()
    assert time.monotonic() - started < 5  # each read took 0.2 s: the per-read timeout alone waited 20 s


def test_a_url_over_the_size_cap_is_refused_declared_or_not(server: str):
    with pytest.raises(ImageProblem, match=r"is 10,000,000,000 bytes, over data.url_max_bytes=1,048,576"):
        UrlImage(f"{server}/declared-huge.png", timeout=10.0, max_bytes=1 << 20).fetch()
    with pytest.raises(
        ImageProblem, match=r"is at least 1,\d\d\d,\d\d\d bytes, over data.url_max_bytes=1,048,576"
    ):
        UrlImage(f"{server}/endless.png", timeout=10.0, max_bytes=1 << 20).fetch()
    assert open_image(UrlImage(f"{server}/red.png", timeout=10.0, max_bytes=len(RED))).size == (48, 40)


def test_url_credentials_never_reach_a_message_or_a_repr(server: str):
    url = f"{server}/missing.png?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature={SIGNATURE}"
    with pytest.raises(ImageProblem) as info:
        UrlImage(url, timeout=10.0).fetch()
    assert "HTTP Error 404" in info.value.reason and "X-Amz-Signature=***" in info.value.reason
    assert SIGNATURE not in info.value.reason and "AKIAEXAMPLE" not in info.value.reason
    assert SIGNATURE not in repr(UrlImage(url, 1.0))


# --- files that are not images ----------------------------------------------------------------------


def test_hostile_image_paths_are_each_one_bad_sample_in_data_check(tmp_path: Path):
    """A FIFO (open() waited for a writer forever), /dev/zero (read forever), a NUL byte (a ValueError that
    aborted the whole check), a presigned URL (its signature copied into the report): each one sample,
    each with its reason; the good sample and the animation survive, the animation counted."""
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "red.png").write_bytes(RED)
    anim = animations(tmp_path)["gif"]
    presigned = f"https://bucket.example.com/red.png?X-Amz-Signature={SIGNATURE}"
    images = ["red.png", "pipe.png", "/dev/zero", "red\0.png", "https://me:hunter22@example.com/a.png", presigned,
              str(anim)]  # fmt: skip
    recipe = write_recipe(
        tmp_path,
        model={"name": "tiny:qwen2_vl"},
        data={"train": str(write_data(tmp_path, images)), "max_image_pixels": PIXEL_BUDGET},
    )
    result = cli("data", "check", str(recipe), "--json", timeout=180)
    assert result.returncode == 2, result.stderr[-3000:]  # bad samples and data.on_bad_sample: error
    report = json.loads(result.stdout)["train"]
    reasons = {p["index"]: p["reason"] for p in report["skipped_invalid"]}
    assert sorted(reasons) == [1, 2, 3, 4, 5]
    assert reasons[1] == f"is a FIFO (named pipe), not an image file: {tmp_path / 'pipe.png'}"
    assert reasons[2] == "is a character device, not an image file: /dev/zero"
    assert "holds a NUL byte" in reasons[3]
    assert "image URL https://***@example.com/a.png is not fetched" in reasons[4]
    assert "image URL https://bucket.example.com/red.png?X-Amz-Signature=*** is not fetched" in reasons[5]
    assert SIGNATURE not in result.stdout + result.stderr and "hunter22" not in result.stdout + result.stderr
    assert report["samples_kept"] == 2 and report["images_multi_frame"] == 1

    table = cli("data", "check", str(recipe), timeout=180)
    assert "multi-frame images" in table.stdout and SIGNATURE not in table.stdout + table.stderr


def test_multi_frame_images_are_counted_or_refused_by_policy(tmp_path: Path):
    from vlmtune.data.preflight import scan_split
    from vlmtune.recipe import DataSection

    paths = animations(tmp_path)
    for kind, path in paths.items():
        size, frames = image_facts(str(path))
        assert (size, frames) == ((32, 24), 3), kind
        assert image_facts(str(path), decode=True)[1] == 3, kind
        with pytest.raises(ImageProblem, match="of 3 frames; data.multi_frame_images: error refuses it"):
            image_facts(str(path), multi_frame="error")
        with pytest.raises(ImageProblem, match="of 3 frames"):
            open_image(str(path), multi_frame="error")
        assert open_image(str(path)).getpixel((0, 0)) == (200, 0, 0), kind  # the first frame
    assert image_facts(str(tmp_path / "still.gif"), multi_frame="error")[1] == 1
    data = write_data(tmp_path, [*map(str, paths.values()), str(tmp_path / "still.gif")])
    counted = scan_split("train", str(data), DataSection(train=str(data)))
    assert counted.images_multi_frame == 3 and len(counted.samples) == 4
    assert counted.to_json()["images_multi_frame"] == 3
    refused = scan_split("train", str(data), DataSection(train=str(data), multi_frame_images="error"))
    assert [p.index for p in refused.skipped] == [0, 1, 2] and len(refused.samples) == 1
    assert "a multi-page TIFF of 3 frames" in refused.skipped[2].reason


# --- an image that disappears after the pre-flight ---------------------------------------------------


def test_an_image_deleted_after_the_pre_flight_names_the_sample(tmp_path: Path):
    from vlmtune.data.layouts import SampleReader  # noqa: F401 (the collator's samples)
    from vlmtune.data.preflight import read_split
    from vlmtune.recipe import DataSection

    (tmp_path / "red.png").write_bytes(RED)
    (tmp_path / "blue.png").write_bytes((IMAGES / "blue.png").read_bytes())
    data = write_data(tmp_path, ["red.png", "blue.png"])
    kept = read_split(str(data), DataSection(train=str(data))).samples
    (tmp_path / "blue.png").unlink()
    assert len(open_images(kept[0].index, kept[0].images, kept[0].image_fields)) == 1
    with pytest.raises(ImageUnreadable) as info:
        open_images(kept[1].index, kept[1].images, kept[1].image_fields)
    assert str(info.value).startswith(
        "sample 1: messages[0].content[0].image: the image passed the pre-flight"
    )
    assert "file not found" in str(info.value)
    assert "vlmtune train --resume /runs/x`" in info.value.for_run(Path("/runs/x")).hint


@pytest.mark.slow
def test_a_training_run_whose_image_url_fails_stops_naming_it_with_the_resume_command(
    tmp_path: Path, server: str
):
    """The URL answers during the pre-flight and 404s once 3-train/data_report.json exists (training
    has started). Also: the skipped sample's presigned URL is redacted in data_report.json, and the
    token in the recipe's comment is redacted in the run's recipe.yaml copy, with a warning."""
    run = tmp_path / "run"
    Handler.gone_when = run / "3-train" / "data_report.json"
    (tmp_path / "red.png").write_bytes(RED)
    images = [
        "red.png",
        f"{server}/vanishing.png?sig={SIGNATURE}",
        f"{server}/missing.png?X-Amz-Signature={SIGNATURE}",
    ]
    recipe = write_recipe(
        tmp_path,
        model={"name": "tiny:qwen2_vl"},
        data={"train": str(write_data(tmp_path, images)), "max_image_pixels": PIXEL_BUDGET, "allow_urls": True,
              "on_bad_sample": "skip", "shuffle": False},
        train={"max_steps": 1, "batch_size": 2, "grad_accum": 1, "max_length": 256},
    )  # fmt: skip
    token = "hf_" + "a1B2c3D4e5F6g7H8i9J0kLmN"
    recipe.write_text(f"# pushed with HF_TOKEN={token}\n" + recipe.read_text())
    result = cli("train", str(recipe), "--run-dir", str(run), timeout=400)
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2, output[-3000:]
    assert (
        "sample 1: messages[0].content[0].image: the image passed the pre-flight but cannot be read now"
        in output
    )
    assert f"vlmtune train --resume {run}" in output and "Traceback" not in output
    assert SIGNATURE not in output and "sig=***" in output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["stages"]["train"]["status"] == "failed"

    report = (run / "3-train" / "data_report.json").read_text()
    skipped = json.loads(report)["train"]["skipped_invalid"]
    assert [p["index"] for p in skipped] == [2] and "X-Amz-Signature=***" in skipped[0]["reason"]
    assert SIGNATURE not in report
    copy = (run / "recipe.yaml").read_text()
    assert token not in copy and "HF_TOKEN=***" in copy and "redacted" in copy.splitlines()[0]
    assert "recipe.yaml" in output and "redacted" in output  # said on the terminal too


# --- secrets ------------------------------------------------------------------------------------------


def test_recognisable_secrets_are_redacted_and_ordinary_settings_kept():
    from vlmtune.redact import redact_secrets, redact_url

    assert (
        redact_url("https://u:p@h.io/a.png?X-Amz-Signature=abc&flag#frag")
        == "https://***@h.io/a.png?X-Amz-Signature=***&flag#***"
    )
    assert redact_url("https://h.io/a.png") == "https://h.io/a.png"
    text = (
        "# HF_TOKEN=hf_abcdefghijklmnopqrstu123\n# OPENAI_API_KEY=sk-proj-abcdefghijklmnopqrstuvwx\n"
        "# aws_secret_access_key = wJalrXUtnFEMI/K7MDENG\n# password: hunter22\n"
        "# curl -H 'Authorization: Bearer eyJhbGciOi.abc'\n# pulled from https://me:pw@git.example.com/x\n"
    )
    keep = (
        "# tokenizer: my/tok\ndata: {train: /data/sk-learn-experiments-2024-abcdef/train.jsonl}\n"
        "grpo: {rewards: [{type: length, max_tokens: 3}]}\n"
    )
    redacted, found = redact_secrets(text + keep)
    assert redacted.endswith(keep) and len(found) == 6, found
    for secret in ("hf_abc", "sk-proj", "wJalr", "hunter22", "eyJhb", "me:pw"):
        assert secret not in redacted, secret
    assert redact_secrets(keep) == (keep, [])


def test_training_warns_about_multi_frame_images(tmp_path: Path, capsys):
    from vlmtune.data.preflight import check_split
    from vlmtune.recipe import DataSection

    data = write_data(tmp_path, [str(animations(tmp_path)["apng"])])
    check_split("train", str(data), DataSection(train=str(data)))
    assert (
        "1 image(s) are animations or multi-page TIFFs; they train on their first frame"
        in capsys.readouterr().err
    )


def test_an_unreadable_image_from_a_dataloader_worker_keeps_its_message_and_hint(tmp_path: Path):
    """torch re-raises a worker's exception as its type built from the traceback text alone."""
    from torch._utils import ExceptionWrapper

    try:
        open_images(7, [str(tmp_path / "gone.png")], ["images[0]"])
    except ImageUnreadable:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(ImageUnreadable) as info:
        wrapped.reraise()
    clean = info.value.for_run(Path("/runs/x"))
    assert (
        clean.message.startswith("sample 7: images[0]: the image passed the pre-flight")
        and "Traceback" not in clean.message
    )
    assert "file not found" in clean.message and "vlmtune train --resume /runs/x`" in clean.hint
