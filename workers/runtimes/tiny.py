"""The tiny random twins of the model kinds, for tests and offline demos.

Each twin is built in-process with the real classes and tiny random weights from a fixed
seed, saved the way a real checkpoint is published, and loaded back through the same code
(loading.checkpoint) as the real one. Their outputs are noise, and they say so.
"""

from __future__ import annotations

import csv
import logging
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tokenizers import (
    AddedToken,
    Tokenizer,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    BlipImageProcessorPil,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTokenizer,
    CLIPVisionConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
    T5Config,
)

from workers.interrogate.terms import DATA_DIR, read_terms, trending_terms

TINY_MODEL = "tiny-random-blip2"
PLACEHOLDER_NOTICE = (
    f"CAPTIONER_MODEL={TINY_MODEL} has random weights: its captions are noise, meant for tests "
    "and offline demos only. For real captions set CAPTIONER_MODEL=Salesforce/blip2-opt-2.7b "
    "(weights in the Hugging Face cache, or a local save_pretrained directory)."
)
TINY_CLIP = "tiny-random-clip"
TINY_CLIP_NOTICE = (
    f"CAPTIONER_CLIP_MODEL={TINY_CLIP} has random weights: the terms it picks are noise, meant "
    "for tests and offline demos only. For real prompts set "
    "CAPTIONER_CLIP_MODEL=openai/clip-vit-large-patch14 (weights in the Hugging Face cache, or "
    "a local save_pretrained directory)."
)

_PAD, _BOS, _EOS, _UNK, _IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
_TINY_IMAGE_SIZE = 32
_TINY_QUERY_TOKENS = 4
_TINY_HIDDEN = 32
_TINY_INIT_STD = 0.5  # wide logits, so greedy argmax is not decided by float noise
_CAPTION_WORDS = """
a an the one two three four five several many some of on in at with by near next to under
over above below behind front inside outside top bottom left right middle side and or while
is are was sitting standing lying walking running flying swimming holding looking playing
eating drinking riding driving parked hanging floating covered filled made wearing carrying
showing smiling waiting crossing jumping sleeping reading cooking cutting posing talking
man woman person people boy girl child children baby group crowd player team family couple
dog dogs cat cats horse horses cow cows sheep bird birds duck elephant giraffe zebra bear
fish animal animals car cars truck bus train bicycle bike motorcycle boat plane airplane
street road sidewalk city building buildings house houses tower bridge park field grass tree
trees forest mountain mountains hill hills river lake water ocean sea beach sand sky cloud
clouds sun sunset snow rain light shadow table chair chairs bench bed couch sofa desk room
kitchen bathroom window door wall floor roof sign signs clock phone computer laptop screen
book books cup mug glass bottle plate bowl food pizza sandwich cake bread fruit apple apples
banana bananas orange vegetables salad coffee tea pot vase flower flowers plant plants ball
frisbee kite umbrella bag hat shirt jacket dress shoes glasses picture photo image painting
view close up black white red blue green yellow brown gray grey pink purple colorful large
small big little tall long short old young new empty full open wooden metal stone dark
bright sunny cloudy night day morning evening background foreground area scene way ground
this that there it its his her their other each together outdoors indoors alone different
what who where how many question answer describe does do kind color style
. , ? : ! ' -
"""


def build_tiny_blip2(
    directory: Path, *, text_model: Literal["opt", "t5"] = "opt", seed: int = 0
) -> Path:
    """Save a tiny random BLIP-2 (model + processor) into `directory` and return it.

    The real classes with tiny sizes: an OPT (decoder-only, like blip2-opt-*) or T5
    (encoder-decoder, like blip2-flan-t5-*) language model, a word-level tokenizer built
    offline with an `<image>` token, and weights drawn from `torch.manual_seed(seed)`.
    """
    tokenizer = tiny_tokenizer(text_model)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in (_PAD, _BOS, _EOS)}
    common = {
        "vocab_size": len(tokenizer),
        "pad_token_id": ids[_PAD],
        "eos_token_id": ids[_EOS],
        "tie_word_embeddings": False,
    }
    text_config: OPTConfig | T5Config
    if text_model == "opt":
        text_config = OPTConfig(
            hidden_size=_TINY_HIDDEN,
            word_embed_proj_dim=_TINY_HIDDEN,
            ffn_dim=4 * _TINY_HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=1024,  # room for a 1000-character prompt
            bos_token_id=ids[_BOS],
            init_std=_TINY_INIT_STD,
            **common,
        )
    else:
        text_config = T5Config(
            d_model=_TINY_HIDDEN,
            d_kv=_TINY_HIDDEN // 4,
            d_ff=4 * _TINY_HIDDEN,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            decoder_start_token_id=ids[_PAD],
            initializer_factor=_TINY_INIT_STD / 0.02,  # T5 scales its init, has no std
            **common,
        )
    config = Blip2Config(
        vision_config=Blip2VisionConfig(
            hidden_size=_TINY_HIDDEN,
            intermediate_size=4 * _TINY_HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=_TINY_IMAGE_SIZE,
            patch_size=8,
            initializer_range=_TINY_INIT_STD,  # the default (1e-10) leaves it all zeros
        ),
        qformer_config=Blip2QFormerConfig(
            vocab_size=len(tokenizer),
            hidden_size=_TINY_HIDDEN,
            intermediate_size=4 * _TINY_HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            cross_attention_frequency=1,
            max_position_embeddings=64,
            initializer_range=_TINY_INIT_STD,
        ),
        text_config=text_config,
        num_query_tokens=_TINY_QUERY_TOKENS,
        image_token_index=tokenizer.convert_tokens_to_ids(_IMAGE),
        initializer_range=_TINY_INIT_STD,
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    # Zero-initialised queries would all read the image the same way; trained ones differ.
    torch.nn.init.normal_(model.query_tokens, std=_TINY_INIT_STD)
    image_processor = BlipImageProcessorPil(
        size={"height": _TINY_IMAGE_SIZE, "width": _TINY_IMAGE_SIZE}
    )
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=_TINY_QUERY_TOKENS)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def tiny_tokenizer(text_model: Literal["opt", "t5"]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over caption words, built in-process (nothing downloaded).

    Like the real ones, OPT's prepends a BOS and T5's appends an EOS to every text.
    """
    specials = [_PAD, _BOS, _EOS, _UNK]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(specials + _CAPTION_WORDS.split()))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=_UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if text_model == "opt":
        template = processors.TemplateProcessing(
            single=f"{_BOS} $A", special_tokens=[(_BOS, vocab[_BOS])]
        )
    else:
        template = processors.TemplateProcessing(
            single=f"$A {_EOS}", special_tokens=[(_EOS, vocab[_EOS])]
        )
    backend.post_processor = template
    # A plain special token, not `extra_special_tokens={"image_token": ...}`: Blip2Processor
    # (5.23) then calls `.content` on the str that attribute holds and fails.
    backend.add_special_tokens([AddedToken(_IMAGE, special=True, normalized=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=_PAD, bos_token=_BOS, eos_token=_EOS, unk_token=_UNK
    )


_CLIP_BOS, _CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """CLIP's own tokenizer class (byte-level BPE, `</w>` word ends, lower-cased) with merges
    written here, so nothing is downloaded: every byte alone and at a word's end, and merges
    that spell out, left to right, each caption word and each word of the shipped mediums,
    movements and trending terms. (A trained BPE breaks ties in hash order, which would
    make every build a different tokenizer.)"""
    text = " ".join([
        _CAPTION_WORDS,
        *read_terms(DATA_DIR / "mediums.txt"),
        *read_terms(DATA_DIR / "movements.txt"),
        *trending_terms(),
    ])
    words = sorted(set(re.findall(r"[a-z]+", text.lower())))
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokens = [_CLIP_BOS, _CLIP_EOS, *sorted(alphabet), *(f"{c}</w>" for c in sorted(alphabet))]
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = [*word[:-1], f"{word[-1]}</w>"]
        done = pieces[0]
        for piece in pieces[1:]:
            if done + piece not in tokens:
                merges.append((done, piece))
                tokens.append(done + piece)
            done += piece
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(tokens)}, merges=merges)


def build_tiny_clip(
    directory: Path, *, seed: int = 0, width: int = _TINY_HIDDEN, layers: int = 2,
    image_size: int = _TINY_IMAGE_SIZE, patch_size: int = 8,
) -> Path:
    """Save a tiny random CLIPModel (model + processor) into `directory` and return it: the
    real classes, a 77-token text context as CLIP's, a shortest-edge resize + centre crop.
    The sizes default to the twin's; benchmarks build larger ones the same way."""
    tokenizer = tiny_clip_tokenizer()
    config = CLIPConfig(
        text_config=CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=CLIPVisionConfig(
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=layers,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=patch_size,
        ),
        projection_dim=width // 2,
        initializer_factor=_TINY_INIT_STD / 0.02,  # CLIP scales its init like T5
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


TINY_TAGGER = "tiny-random-wd14"
TAGGER_NOTICE = (
    f"CAPTIONER_TAGGER_MODEL={TINY_TAGGER} has random weights: its tags are noise, meant for "
    "tests and offline demos only. For real tags set "
    "CAPTIONER_TAGGER_MODEL=SmilingWolf/wd-vit-tagger-v3 (or a directory holding its "
    "model.onnx and selected_tags.csv)."
)
_TINY_TAGGER_SIZE = 32
#: (name, category) as in a tagger's selected_tags.csv: 9 rating, 0 general, 4 character.
_TINY_TAGS = (
    *((name, 9) for name in ("general", "sensitive", "questionable", "explicit")),
    *((name, 0) for name in (
        "1girl", "solo", "outdoors", "sky", "cloud", "tree", "smile", "long_hair",
        "no_humans", "animal", "cat", "food", "cup", "star_(sky)", "^_^", "space",
    )),
    *((name, 4) for name in ("hatsune_miku", "kirby", "pikachu")),
)


class TinyTaggerNet(torch.nn.Module):
    """What a v3 tagger graph does at its edges: NHWC BGR float 0-255 in, one sigmoid
    probability per tag out; a patch embedding and a linear head in between."""

    def __init__(self, tags: int, width: int = 16) -> None:
        super().__init__()
        self.patches = torch.nn.Conv2d(3, width, kernel_size=8, stride=8)
        self.head = torch.nn.Linear(width, tags)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.patches(images.permute(0, 3, 1, 2) / 255.0)
        pooled = torch.nn.functional.gelu(features).mean(dim=(2, 3))
        return torch.sigmoid(self.head(pooled))


def export_tagger(net: torch.nn.Module, size: int, path: Path) -> Path:
    """`net` as a tagger's model.onnx: input `input` (batch, size, size, 3), dynamic batch."""
    example = torch.zeros(2, size, size, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet = logging.getLogger("torch.onnx")
        level, quiet.level = quiet.level, logging.ERROR
        try:
            program = torch.onnx.export(
                net.eval(),
                (example,),
                input_names=["input"],
                output_names=["output"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                dynamo=True,
                verbose=False,
            )
        finally:
            quiet.level = level
    assert program is not None
    program.save(str(path))
    return path


def write_tag_list(tags: tuple[tuple[str, int], ...], path: Path) -> Path:
    """A selected_tags.csv with the real file's columns."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["tag_id", "name", "category", "count"])
        for tag_id, (name, category) in enumerate(tags):
            writer.writerow([tag_id, name, category, 1000 - tag_id])
    return path


def build_tiny_wd14(directory: Path, *, seed: int = 0) -> Path:
    """Save a tiny random WD14 tagger (model.onnx + selected_tags.csv) into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    net = TinyTaggerNet(len(_TINY_TAGS))
    torch.nn.init.normal_(net.head.weight, std=4.0)  # spread the probabilities over 0..1
    export_tagger(net, _TINY_TAGGER_SIZE, directory / "model.onnx")
    write_tag_list(_TINY_TAGS, directory / "selected_tags.csv")
    return directory


@dataclass(frozen=True)
class Twin:
    """How to build a tiny model into a directory, and the warning it logs when loaded."""

    build: Callable[[Path], Path]
    notice: str


#: Model setting value -> its tiny twin. Any other value is a real model (id or directory).
TWINS: dict[str, Twin] = {
    TINY_MODEL: Twin(build_tiny_blip2, PLACEHOLDER_NOTICE),
    TINY_CLIP: Twin(build_tiny_clip, TINY_CLIP_NOTICE),
    TINY_TAGGER: Twin(build_tiny_wd14, TAGGER_NOTICE),
}
