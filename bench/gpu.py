"""Images/s of BLIP-2 with the exact architecture of Salesforce/blip2-opt-2.7b (random weights,
built from its config: nothing is downloaded), captions of exactly 20 new tokens:

naive    one image at a time, fp32, Image.open().convert("RGB") + Blip2Processor
hf-fp16  plain batched Hugging Face: the same decode + processor per batch, fp16 generate
ours     the worker's runtime: files fetched and decoded ahead in threads (draft mode, our
         pixels), micro-batch measured at start-up on CUDA, fp16, one fused normalize on GPU

plus the share of wall time the device is busy: on CUDA the union of kernel intervals from
torch.profiler over the timed run (no nvidia-smi needed); on CPU the share of time spent in
generate(). `--scale small` keeps the layout but shrinks every width and depth, for a CPU.

    .venv/bin/python -m bench.gpu                       # on a GPU: the real 2.7b sizes
    .venv/bin/python -m bench.gpu --scale small --device cpu --images 16 --naive-images 4
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from PIL import Image
from torch.profiler import ProfilerActivity, profile
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    BlipImageProcessorPil,
    OPTConfig,
)

from bench.photos import jpegs
from captioning.messages import JobItem
from captioning.settings import Settings
from captioning.storage import Stores
from captioning.uris import allowed_location
from workers.context import decode_threads
from workers.pipeline import ItemState, Stages, annotate_stream
from workers.runtimes.blip2 import CaptionModel
from workers.runtimes.tiny import tiny_tokenizer

NEW_TOKENS = 20
PROMPT = ""

#: Salesforce/blip2-opt-2.7b's config.json: EVA ViT-g/14 at 224 px, a 12-layer Q-Former with
#: 32 queries, OPT-2.7b. `small` keeps the layout and input size, shrinking widths and depths.
SIZES = {
    "full": {
        "vision": {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39,
                   "num_attention_heads": 16},
        "qformer": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                    "num_attention_heads": 12},
        "opt": {"hidden_size": 2560, "ffn_dim": 10240, "num_hidden_layers": 32,
                "num_attention_heads": 32, "word_embed_proj_dim": 2560},
    },
    "small": {
        "vision": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 3,
                   "num_attention_heads": 4},
        "qformer": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2,
                    "num_attention_heads": 4},
        "opt": {"hidden_size": 256, "ffn_dim": 1024, "num_hidden_layers": 4,
                "num_attention_heads": 4, "word_embed_proj_dim": 256},
    },
}
OPT_VOCAB = 50304  # OPT's 50272 + <image>, padded to a multiple of 64, as published
IMAGE_SIZE, PATCH, QUERY_TOKENS = 224, 14, 32


def build(scale: str, device: torch.device) -> tuple[Blip2ForConditionalGeneration, Blip2Processor]:
    """A random-weight BLIP-2 OPT-2.7b (fp32, on `device`) and a processor for it. The
    tokenizer is the offline word-level one of the tiny model: ids index the real 50k vocab."""
    tokenizer = tiny_tokenizer("opt")
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("pad", "<pad>"), ("bos", "<s>"), ("eos", "</s>"), ("image", "<image>"))}
    sizes = SIZES[scale]
    config = Blip2Config(
        vision_config=Blip2VisionConfig(
            **sizes["vision"], image_size=IMAGE_SIZE, patch_size=PATCH, qkv_bias=True
        ),
        qformer_config=Blip2QFormerConfig(
            **sizes["qformer"], cross_attention_frequency=2,
            encoder_hidden_size=sizes["vision"]["hidden_size"],
        ),
        text_config=OPTConfig(
            **sizes["opt"], vocab_size=OPT_VOCAB, max_position_embeddings=2048,
            pad_token_id=ids["pad"], bos_token_id=ids["bos"], eos_token_id=ids["eos"],
        ),
        num_query_tokens=QUERY_TOKENS,
        image_token_index=ids["image"],
    )
    with device:
        model = Blip2ForConditionalGeneration(config).eval()
    processor = Blip2Processor(
        BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer,
        num_query_tokens=QUERY_TOKENS,
    )
    processor.tokenizer.padding_side = "left"
    return model, processor


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def busy_meter(device: torch.device, model: Blip2ForConditionalGeneration) -> Iterator[list[float]]:
    """Yields a list that ends up holding the busy share of the block's wall time."""
    result: list[float] = []
    start = time.perf_counter()
    if device.type == "cuda":
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            yield result
            sync(device)
        wall_us = (time.perf_counter() - start) * 1e6
        kernels = sorted(
            (e.time_range.start, e.time_range.end)
            for e in prof.events()
            if e.device_type.name == "CUDA"
        )
        busy, end = 0.0, float("-inf")
        for lo, hi in kernels:  # union of intervals: overlapping kernels count once
            busy += max(0.0, hi - max(lo, end))
            end = max(end, hi)
        result.append(busy / wall_us)
        return
    inside = 0.0
    generate = model.generate

    def timed(*args: object, **kwargs: object) -> torch.Tensor:
        nonlocal inside
        t0 = time.perf_counter()
        try:
            return generate(*args, **kwargs)
        finally:
            inside += time.perf_counter() - t0

    model.generate = timed  # type: ignore[method-assign]
    try:
        yield result
    finally:
        del model.generate
    result.append(inside / (time.perf_counter() - start))


def naive_captions(files: list[bytes], model: Blip2ForConditionalGeneration,
                   processor: Blip2Processor, batch: int, dtype: torch.dtype) -> int:
    done = 0
    for start in range(0, len(files), batch):
        images = [Image.open(io.BytesIO(b)).convert("RGB") for b in files[start : start + batch]]
        inputs = processor(
            images=images, text=[PROMPT] * len(images), padding=True, return_tensors="pt"
        ).to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False)
        done += len(processor.batch_decode(out, skip_special_tokens=True))
    return done


def timed(device: torch.device, model: Blip2ForConditionalGeneration, count: int,
          run: Callable[[], int], measure_busy: bool) -> tuple[float, float | None]:
    run_count = 0
    sync(device)
    start = time.perf_counter()
    with busy_meter(device, model) if measure_busy else nullcontext([]) as busy:
        run_count = run()
        sync(device)
    elapsed = time.perf_counter() - start
    assert run_count == count, (run_count, count)
    return count / elapsed, (busy[0] if busy else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=tuple(SIZES), default="full")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--naive-images", type=int, default=32)
    parser.add_argument("--hf-batch", type=int, default=16, help="plain HF fp16 batch size")
    parser.add_argument("--megapixels", type=float, default=2.0, help="size of the test JPEGs")
    args = parser.parse_args()
    device = torch.device(args.device)
    half = torch.float16 if device.type == "cuda" else torch.bfloat16

    photos = jpegs(args.megapixels)
    files = [photos[i % len(photos)] for i in range(args.images)]
    model, processor = build(args.scale, device)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    rows: list[tuple[str, str, float, float | None]] = []

    def naive() -> int:
        return naive_captions(files[: args.naive_images], model, processor, 1, torch.float32)

    naive_captions(files[:1], model, processor, 1, torch.float32)  # warm-up
    rows.append(("naive", "fp32, batch 1", *timed(device, model, args.naive_images, naive, True)))

    model.to(half)  # in place: fp16 on CUDA (bf16 on CPU, where fp16 matmuls are slow)

    def hf() -> int:
        return naive_captions(files, model, processor, args.hf_batch, half)

    naive_captions(files[: args.hf_batch], model, processor, args.hf_batch, half)
    ips, _ = timed(device, model, args.images, hf, False)
    _, busy = timed(device, model, args.images, hf, True)
    rows.append(("hf-fp16", f"{half}, batch {args.hf_batch}".replace("torch.", ""), ips, busy))

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        root = Path(tmp)
        for i, data in enumerate(files):
            (root / f"{i:05d}.jpg").write_bytes(data)
        settings = Settings(
            model="bench-blip2-opt-2.7b", device=str(device), dtype=str(half).split(".")[1],
            allowed_roots=(root,), max_new_tokens=NEW_TOKENS, batch_size=args.hf_batch,
        )
        runtime = CaptionModel(
            name=settings.model, model=model, processor=processor, dtype=half, settings=settings
        )
        runtime._generate_options["min_new_tokens"] = NEW_TOKENS  # captions of 20 tokens
        runtime.warm_up(settings)  # measures the micro-batch on CUDA
        io_pool = ThreadPoolExecutor(settings.fetch_concurrency, thread_name_prefix="io")
        decode_pool = ThreadPoolExecutor(decode_threads(), thread_name_prefix="decode")
        stages = Stages.for_runtimes(
            {"caption": runtime}, stores=Stores(settings), settings=settings,
            io_pool=io_pool, decode_pool=decode_pool,
        )
        uris = [(root / f"{i:05d}.jpg").as_uri() for i in range(len(files))]

        def ours() -> int:
            states = [
                ItemState(JobItem(uri=uri), location=allowed_location(uri, settings))
                for uri in uris
            ]
            annotate_stream(
                states, PROMPT, {"caption": runtime}, stages, nullcontext(),
                lookahead=max(2 * runtime.batch_size, settings.fetch_concurrency),
            )
            return sum("caption" in state.results for state in states)

        ips, _ = timed(device, model, args.images, ours, False)
        _, busy = timed(device, model, args.images, ours, True)
        rows.append(("ours", f"{half}, batch {runtime.batch_size}".replace("torch.", ""),
                     ips, busy))
        io_pool.shutdown()
        decode_pool.shutdown()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"BLIP-2 OPT-2.7b layout, scale={args.scale} ({params:.2f} B params, random weights), "
          f"{NEW_TOKENS} new tokens, {args.megapixels} MP JPEGs, on {name}, "
          f"{decode_threads()} decode threads, torch {torch.__version__}")
    busy_label = "GPU busy" if device.type == "cuda" else "in generate"
    print(f"{'runtime':<9} {'setup':<16} {'images/s':>9} {'vs naive':>9} {'vs hf':>7} "
          f"{busy_label:>11}")
    base, hf_ips = rows[0][2], rows[1][2]
    for label, setup, ips, busy in rows:
        share = f"{busy:.0%}" if busy is not None else "-"
        print(f"{label:<9} {setup:<16} {ips:>9.2f} {ips / base:>8.1f}x {ips / hf_ips:>6.2f}x "
              f"{share:>11}")


if __name__ == "__main__":
    main()
