"""Images/s of WD14 tagging, side by side in one run, in-process, on the CPU:

naive  the original tagger scripts' loop (SmilingWolf's wd-tagger space): per image, PIL
       open, RGBA composited on a white canvas, padded to a white square, bicubic resize,
       numpy float32, RGB->BGR, a batch of one through the onnxruntime session, then the
       thresholds over Python lists of (name, probability)
ours   the worker's path: files read by I/O threads, decoded by decode threads (full
       resolution, alpha composited only where there is some), padded and resized as uint8,
       micro-batches of CAPTIONER_TAGGER_BATCH_SIZE made float32 BGR in one NumPy step,
       Tagger.annotate (workers/pipeline.annotate_stream, as a job runs it)

Both run the same model.onnx with the same onnxruntime settings and give the same tags
(checked). Taggers: `tiny`, the tiny twin (32 px, 23 tags); `vit`, a ViT-Ti/16 layout at the
real taggers' 448 px with random weights and 10,861 tags (the size of the v3 tag lists),
exported to ONNX in-process (the real wd-vit-tagger-v3 is a ViT-B/16: about 4x the compute).

With `--cli`, the same images also go through what a user runs, each in a fresh process
(start-up included): the naive loop as a script, and `captioner demo DIR` with
CAPTIONER_KINDS=tags (private Redis, one worker, SQLite: a whole fleet on one machine).

    python -m bench.tags                      # both taggers, 0.5 MP JPEGs
    python -m bench.tags --megapixels 12 --images 32 --naive-images 16
    python -m bench.tags --taggers tiny --cli
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image
from transformers import ViTConfig, ViTModel

from bench.photos import jpegs
from captioning.messages import JobItem
from captioning.settings import Settings
from captioning.storage import Stores
from captioning.uris import allowed_location
from workers.context import decode_threads
from workers.pipeline import ItemState, Stages, annotate_stream
from workers.runtimes.tiny import build_tiny_wd14, export_tagger, write_tag_list
from workers.runtimes.wd14 import MODEL_FILE, TAGS_FILE, Tagger, display_name

REAL_TAG_COUNT = 10_861
GENERAL_THRESHOLD, CHARACTER_THRESHOLD = 0.35, 0.85


class VitTagger(torch.nn.Module):
    """A ViT (transformers' ViTModel) with a sigmoid head over the tags, taking what the
    taggers take: NHWC BGR float 0-255."""

    def __init__(self, size: int, tags: int) -> None:
        super().__init__()
        config = ViTConfig(image_size=size, patch_size=16, hidden_size=192,
                           num_hidden_layers=12, num_attention_heads=3, intermediate_size=768)
        self.vit = ViTModel(config, add_pooling_layer=False)
        self.head = torch.nn.Linear(192, tags)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.flip(-1).permute(0, 3, 1, 2) / 127.5 - 1.0
        cls = self.vit(pixel_values=pixels).last_hidden_state[:, 0]
        return torch.sigmoid(self.head(cls))


def build_vit_tagger(directory: Path) -> Path:
    torch.manual_seed(0)
    directory.mkdir(parents=True, exist_ok=True)
    export_tagger(VitTagger(448, REAL_TAG_COUNT), 448, directory / MODEL_FILE)
    categories = [9] * 4 + [0] * (REAL_TAG_COUNT - 4 - 2000) + [4] * 2000
    tags = tuple((f"tag_{i}", category) for i, category in enumerate(categories))
    write_tag_list(tags, directory / TAGS_FILE)
    return directory


def naive_loop(model_dir: Path, files: list[Path]) -> Callable[[], list[str]]:
    """The original scripts, one image at a time (their session is made once, at load)."""
    session = ort.InferenceSession(str(model_dir / MODEL_FILE),
                                   providers=["CPUExecutionProvider"])
    _, height, _, _ = session.get_inputs()[0].shape
    input_name = session.get_inputs()[0].name
    with (model_dir / TAGS_FILE).open() as handle:
        rows = list(csv.DictReader(handle))
    names = [display_name(row["name"]) for row in rows]  # the space's kaomoji rule
    general = [i for i, row in enumerate(rows) if row["category"] == "0"]
    character = [i for i, row in enumerate(rows) if row["category"] == "4"]

    def prepare(image: Image.Image) -> np.ndarray:
        canvas = Image.new("RGBA", image.size, (255, 255, 255))
        canvas.alpha_composite(image.convert("RGBA"))
        image = canvas.convert("RGB")
        max_dim = max(image.size)
        padded = Image.new("RGB", (max_dim, max_dim), (255, 255, 255))
        padded.paste(image, ((max_dim - image.size[0]) // 2, (max_dim - image.size[1]) // 2))
        if max_dim != height:
            padded = padded.resize((height, height), Image.BICUBIC)
        array = np.asarray(padded, dtype=np.float32)[:, :, ::-1]
        return np.expand_dims(array, axis=0)

    def run() -> list[str]:
        captions = []
        for path in files:
            image = Image.open(path)
            preds = session.run(None, {input_name: prepare(image)})[0]
            labels = list(zip(names, preds[0].astype(float), strict=True))
            general_res = dict(x for x in (labels[i] for i in general) if x[1] > GENERAL_THRESHOLD)
            character_res = dict(
                x for x in (labels[i] for i in character) if x[1] > CHARACTER_THRESHOLD
            )
            ordered = [
                *sorted(character_res, key=character_res.__getitem__, reverse=True),
                *sorted(general_res, key=general_res.__getitem__, reverse=True),
            ]
            captions.append(", ".join(ordered))
        return captions

    return run


def worker_path(model_dir: Path, files: list[Path], root: Path, batch: int
                ) -> Callable[[], list[str]]:
    settings = Settings(tagger_model=str(model_dir), device="cpu", tagger_batch_size=batch,
                        allowed_roots=(root,), max_image_pixels=100_000_000,
                        max_image_bytes=64 * 1024 * 1024)
    tagger = Tagger.load(settings)
    io_pool = ThreadPoolExecutor(settings.fetch_concurrency, thread_name_prefix="io")
    decode_pool = ThreadPoolExecutor(decode_threads(), thread_name_prefix="decode")
    stages = Stages.for_runtimes({"tags": tagger}, stores=Stores(settings), settings=settings,
                                 io_pool=io_pool, decode_pool=decode_pool)
    uris = [path.as_uri() for path in files]

    def run() -> list[str]:
        states = [ItemState(JobItem(uri=uri), location=allowed_location(uri, settings))
                  for uri in uris]
        annotate_stream(states, "", {"tags": tagger}, stages, nullcontext(),
                        lookahead=max(2 * tagger.batch_size, settings.fetch_concurrency))
        return [state.results["tags"].text for state in states]

    return run


NAIVE_SCRIPT = """
import sys
from pathlib import Path
from bench.tags import naive_loop
files = sorted(Path(sys.argv[1]).glob("*.jpg"))
print(len(naive_loop(Path(sys.argv[2]), files)()))
"""


def fresh_process_seconds(model_dir: Path, images_dir: Path, workdir: Path) -> dict[str, float]:
    """Wall seconds of the naive script and of `captioner demo` over `images_dir`."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
           "CAPTIONER_KINDS": "tags", "CAPTIONER_TAGGER_MODEL": str(model_dir),
           "CAPTIONER_DEMO_DIR": str(workdir), "HF_HUB_OFFLINE": "1"}
    commands = {
        "naive script": [sys.executable, "-c", NAIVE_SCRIPT, str(images_dir), str(model_dir)],
        "captioner demo": [sys.executable, "-m", "cli", "demo", str(images_dir)],
    }
    seconds = {}
    for name, command in commands.items():
        start = time.perf_counter()
        subprocess.run(command, env=env, check=True, capture_output=True)
        seconds[name] = time.perf_counter() - start
    return seconds


def images_per_second(run: Callable[[], list[str]], count: int) -> tuple[float, list[str]]:
    start = time.perf_counter()
    out = run()
    elapsed = time.perf_counter() - start
    assert len(out) == count
    return count / elapsed, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--taggers", default="tiny,vit")
    parser.add_argument("--megapixels", type=float, default=0.5)
    parser.add_argument("--images", type=int, default=64, help="images for ours")
    parser.add_argument("--naive-images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32, help="CAPTIONER_TAGGER_BATCH_SIZE")
    parser.add_argument("--cli", action="store_true",
                        help="also time both in fresh processes, start-up included")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-tags-") as tmp:
        root = Path(tmp).resolve()
        images_dir = root / "images"
        images_dir.mkdir()
        photos = jpegs(args.megapixels)
        files = []
        for i in range(max(args.images, args.naive_images)):
            path = images_dir / f"{i:05d}.jpg"
            path.write_bytes(photos[i % len(photos)])
            files.append(path)
        builders = {"tiny": build_tiny_wd14, "vit": build_vit_tagger}
        table = []
        fresh: dict[str, dict[str, float]] = {}
        for name in args.taggers.split(","):
            model_dir = builders[name](root / name)
            naive = naive_loop(model_dir, files[: args.naive_images])
            ours = worker_path(model_dir, files[: args.images], root, args.batch)
            # warm both (allocator, thread pools, page cache), and check they agree
            check = min(4, args.naive_images, args.images)
            warm_naive = naive_loop(model_dir, files[:check])()
            warm_ours = worker_path(model_dir, files[:check], root, args.batch)()
            assert warm_naive == warm_ours, "the two paths disagree"
            naive_ips, _ = images_per_second(naive, args.naive_images)
            ours_ips, _ = images_per_second(ours, args.images)
            table.append((name, naive_ips, ours_ips))
            if args.cli:
                fresh[name] = fresh_process_seconds(model_dir, images_dir, root / f"demo-{name}")

    print(f"WD14 tagging, {args.megapixels} MP JPEGs, CPU ({os.cpu_count()} cores, "
          f"{decode_threads()} decode threads), onnxruntime {ort.__version__}, "
          f"ours in batches of {args.batch}; {args.naive_images} images naive, "
          f"{args.images} ours; in-process")
    print(f"{'tagger':<8} {'naive img/s':>12} {'ours img/s':>11} {'speed-up':>9}")
    for name, naive_ips, ours_ips in table:
        print(f"{name:<8} {naive_ips:>12.1f} {ours_ips:>11.1f} {ours_ips / naive_ips:>8.2f}x")
    if fresh:
        count = len(files)
        print(f"\nthe same {count} images through a fresh process each, start-up included:")
        print(f"{'tagger':<8} {'naive script s':>15} {'captioner demo s':>17} {'ratio':>7}")
        for name, seconds in fresh.items():
            naive_s, demo_s = seconds["naive script"], seconds["captioner demo"]
            print(f"{name:<8} {naive_s:>15.1f} {demo_s:>17.1f} {naive_s / demo_s:>6.2f}x")


if __name__ == "__main__":
    main()

