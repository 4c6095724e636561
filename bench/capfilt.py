"""What scores, CapFilt candidates and several prompts cost: images/s through the worker's
stream (files fetched and decoded in threads, then the runtime), side by side in one run.

caption only         the captioner alone, one prompt (the baseline)
+ score, shared ViT  an ITM scorer whose vision weights equal the captioner's: one ViT pass
+ score, own ViT     an ITM scorer with a vision tower of its own: two ViT passes
K = 1, 3, 5          greedy + K-1 nucleus samples, all scored (shared ViT)
3 prompts, 1 job     three prompts per image: one fetch, decode and vision pass
3 jobs of 1 prompt   the same three prompts as three separate streams (the naive way)

Models have random weights and captions exactly `--new-tokens` long (so every row costs the
same): `tiny` (the test twins), `small` (BLIP-2 OPT-2.7b's layout, shrunk for a CPU) or
`full` (the real sizes, for a GPU; bench.gpu --capfilt runs it there).

    .venv/bin/python -m bench.capfilt --scale tiny --images 64
    .venv/bin/python -m bench.capfilt --scale small --images 16
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2QFormerConfig,
)

from bench.gpu import build
from bench.photos import jpegs
from captioning.messages import JobItem
from captioning.settings import Settings
from captioning.storage import Stores
from captioning.uris import allowed_location
from workers.context import decode_threads
from workers.pipeline import ItemState, Stages, annotate_stream
from workers.pixels import PixelSpec
from workers.runtimes.blip2 import CaptionModel
from workers.runtimes.itm import ScoreModel
from workers.runtimes.tiny import build_tiny_blip2, build_tiny_itm, tiny_tokenizer

PROMPTS = ("", "a photo of", "Question: what is the style of this image? Answer:")
#: Salesforce/blip2-itm-vit-g: BERT's vocabulary plus [DEC], 256-wide ITC projections.
ITM_VOCAB, ITM_PROJECTION = 30523, 256


def build_itm(
    captioner: Blip2ForConditionalGeneration, *, share_vision: bool
) -> Blip2ForImageTextRetrieval:
    """A random ITM model with the captioner's vision config and Q-Former sizes; with
    `share_vision` its ViT weights are the captioner's (as blip2-itm-vit-g's are
    blip2-opt-2.7b's)."""
    config = captioner.config
    qformer = config.qformer_config.to_dict()
    qformer.update(vocab_size=ITM_VOCAB, use_qformer_text_input=True)
    itm_config = Blip2Config(
        vision_config=config.vision_config.to_dict(),
        qformer_config=Blip2QFormerConfig(**qformer).to_dict(),
        num_query_tokens=config.num_query_tokens,
        image_text_hidden_size=ITM_PROJECTION,
    )
    with captioner.device:
        model = Blip2ForImageTextRetrieval(itm_config).eval()
    if share_vision:
        model.vision_model.load_state_dict(captioner.vision_model.state_dict())
    return model.to(captioner.dtype)


def runtimes(
    scale: str, device: torch.device, dtype: torch.dtype, tmp: Path, new_tokens: int
) -> tuple[CaptionModel, ScoreModel, ScoreModel, Settings]:
    """The captioner, a scorer sharing its ViT and one with its own, through the runtimes'
    own classes (tiny: through the same loading code as production)."""
    root = tmp / "images"
    settings = Settings(
        model=f"bench-{scale}", device=str(device), dtype=str(dtype).split(".")[1],
        allowed_roots=(root,), max_new_tokens=new_tokens, batch_size=8,
    )
    if scale == "tiny":
        captioner = CaptionModel.load(
            settings.model_copy(update={"model": str(build_tiny_blip2(tmp / "blip2"))})
        )
        shared, own = (
            ScoreModel.load(settings.model_copy(update={
                "scorer": str(build_tiny_itm(tmp / name, share_vision=name == "shared"))
            }))
            for name in ("shared", "own")
        )
        return captioner, shared, own, settings
    model, processor = build(scale, device)
    model.to(dtype)
    captioner = CaptionModel(
        name=settings.model, model=model, processor=processor, dtype=dtype, settings=settings
    )
    tokenizer = tiny_tokenizer("bert")
    spec = PixelSpec.from_processor(processor.image_processor)
    shared, own = (
        ScoreModel(name=name, model=build_itm(model, share_vision=name == "shared"),
                   tokenizer=tokenizer, pixel_spec=spec, dtype=dtype)
        for name in ("shared", "own")
    )
    return captioner, shared, own, settings


def fixed_length(captioner: CaptionModel, new_tokens: int) -> None:
    """Every caption and candidate exactly `new_tokens` long: random weights stop at random."""
    captioner._generate_options["min_new_tokens"] = new_tokens


def table(
    scale: str, device: torch.device, images: int, new_tokens: int, rounds: int = 3
) -> None:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    photos = jpegs(0.5)
    with tempfile.TemporaryDirectory(prefix="bench-capfilt-") as tmp_name:
        tmp = Path(tmp_name)
        captioner, shared, own, settings = runtimes(scale, device, dtype, tmp, new_tokens)
        fixed_length(captioner, new_tokens)
        root = tmp / "images"
        root.mkdir()
        uris = []
        for i in range(images):
            path = root / f"{i:05d}.jpg"
            path.write_bytes(photos[i % len(photos)])
            uris.append(path.as_uri())
        io_pool = ThreadPoolExecutor(settings.fetch_concurrency, thread_name_prefix="io")
        decode_pool = ThreadPoolExecutor(decode_threads(), thread_name_prefix="decode")
        stages = Stages.for_runtimes(
            {"caption": captioner}, stores=Stores(settings), settings=settings,
            io_pool=io_pool, decode_pool=decode_pool,
        )

        def stream(prompts: Sequence[str]) -> int:
            states = [
                ItemState(JobItem(uri=uri), location=allowed_location(uri, settings))
                for uri in uris
            ]
            annotate_stream(states, prompts, {"caption": captioner}, stages, nullcontext(),
                            lookahead=max(2 * captioner.batch_size, settings.fetch_concurrency))
            return sum(len(s.results.get("caption", ())) for s in states)

        def setup(scorer: ScoreModel | None, candidates: int) -> None:
            captioner.scorer, captioner.shares_vision = None, False
            if scorer is not None:
                captioner.attach_scorer(scorer)
            captioner.candidates = candidates

        cases: list[tuple[str, Callable[[], None], Callable[[], int]]] = [
            ("caption only", lambda: setup(None, 1), lambda: stream(PROMPTS[:1])),
            ("+ score, shared ViT", lambda: setup(shared, 1), lambda: stream(PROMPTS[:1])),
            ("+ score, own ViT", lambda: setup(own, 1), lambda: stream(PROMPTS[:1])),
            ("K=3, shared ViT", lambda: setup(shared, 3), lambda: stream(PROMPTS[:1])),
            ("K=5, shared ViT", lambda: setup(shared, 5), lambda: stream(PROMPTS[:1])),
            ("3 prompts, 1 job", lambda: setup(None, 1), lambda: stream(PROMPTS)),
            ("3 jobs of 1 prompt", lambda: setup(None, 1),
             lambda: sum(stream([prompt]) for prompt in PROMPTS)),
        ]
        for _, prepare, run in cases:  # warm-up: kernels, allocator, tokenized prompts
            prepare()
            run()
        # Interleaved rounds, the median of each case: the load of a shared machine drifts
        # over a run, and a case measured in one stretch would carry its drift.
        wall: dict[str, list[float]] = {label: [] for label, _, _ in cases}
        cpu: dict[str, list[float]] = {label: [] for label, _, _ in cases}
        for _ in range(rounds):
            for label, prepare, run in cases:
                prepare()
                start, start_cpu = time.perf_counter(), time.process_time()
                rows = run()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                wall[label].append(images / (time.perf_counter() - start))
                cpu[label].append(images / (time.process_time() - start_cpu))
                assert rows == images * (3 if "prompt" in label else 1), (label, rows)
        io_pool.shutdown()
        decode_pool.shutdown()

    params = sum(p.numel() for p in captioner.model.parameters()) / 1e6
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"bench.capfilt scale={scale} (captioner {params:.1f} M params, random weights), "
          f"{images} images (0.5 MP JPEG), {new_tokens} new tokens, {dtype}, on {name}, "
          f"in-process, median of {rounds} interleaved rounds, torch {torch.__version__}")
    # On a GPU the wall clock is the cost; on a shared CPU the process's CPU seconds are
    # (the wall clock there measures the other jobs' load as much as ours).
    ratios = wall if device.type == "cuda" else cpu
    basis = "wall" if device.type == "cuda" else "CPU"
    print(f"{'case':<22} {'images/s':>9} {'images/CPU-s':>13} {f'vs caption only ({basis})':>26}")
    base = statistics.median(ratios["caption only"])
    for label, per_round in wall.items():
        print(f"{label:<22} {statistics.median(per_round):>9.2f} "
              f"{statistics.median(cpu[label]):>13.2f} "
              f"{statistics.median(ratios[label]) / base:>25.2f}x")

    def cost(label: str) -> float:
        return base / statistics.median(ratios[label]) - 1

    together = statistics.median(ratios["3 prompts, 1 job"])
    apart = statistics.median(ratios["3 jobs of 1 prompt"])
    print(f"3 prompts in one job vs three one-prompt jobs: {together / apart:.2f}x the images/s; "
          f"scoring costs {cost('+ score, shared ViT'):+.0%} with a shared ViT, "
          f"{cost('+ score, own ViT'):+.0%} with its own ({basis} time)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=("tiny", "small", "full"), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    table(args.scale, torch.device(args.device), args.images, args.new_tokens, args.rounds)


if __name__ == "__main__":
    main()
