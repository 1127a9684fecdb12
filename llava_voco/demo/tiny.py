"""Tiny LLaVA checkpoints built from configs, with a tokenizer trained on the spot: nothing downloaded.

A real (small, randomly initialised) ``LlavaForConditionalGeneration``: CLIP vision tower, Llama language
model, a BPE tokenizer trained offline with ``tokenizers``, a CLIP image processor and a LLaVA-1.5 style
chat template. The demo builds its base models from these pieces, ``scripts/make_tiny_llava.py`` writes one
for the quick start, and the tests and benchmarks use them. Nothing here is needed to load or run a
trained model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AddedToken,
    BertTokenizerFast,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

# LLaVA-1.5's conversation layout ("v1"): system prompt, then "USER: ... ASSISTANT: ...</s>".
LLAVA_V1_CHAT_TEMPLATE = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %} USER: "
    "{% else %} ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] != 'user' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)

DEFAULT_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is in the image? ASSISTANT: A handwritten digit.",
    "Which digit is at the top left? What is the sum of the digits? How many times does 7 appear?",
    "What is the largest digit? Which digit is in frame 3? What is the most frequent digit?",
    "zero one two three four five six seven eight nine 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18",
    "top bottom left right image video clip frame grid picture describe the shows a an the of in is",
]


@dataclass
class TinySizes:
    """Sizes of a tiny LLaVA; defaults give 16 vision tokens per 16 x 16 image."""

    image_size: int = 16
    patch_size: int = 4
    vision_hidden: int = 32
    vision_layers: int = 2
    text_hidden: int = 64
    text_layers: int = 2
    text_intermediate: int | None = None  # defaults to 2 x text_hidden
    heads: int = 4
    kv_heads: int = 2
    vocab_size: int = 320  # tokens the tokenizer learns
    embedding_rows: int | None = None  # rows of the LLM's embedding (>= tokenizer size), e.g. 32000 like LLaMA


def train_tokenizer(corpus: list[str] = DEFAULT_CORPUS, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A sentencepiece-like BPE tokenizer (Metaspace), trained in memory, with ``<image>`` special."""
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    alphabet = sorted(set("".join(corpus)) | set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!'\n-"))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    fast.chat_template = LLAVA_V1_CHAT_TEMPLATE
    return fast


def train_wordpiece_tokenizer(corpus: list[str] = DEFAULT_CORPUS, vocab_size: int = 200) -> BertTokenizerFast:
    """A BERT-style WordPiece tokenizer for ``corpus``: LLaMA-VID's text decoder reads BERT tokens. The
    vocabulary is made here, not by ``tokenizers``' ``WordPieceTrainer``, whose ties between equally frequent
    merges fall out differently from one process to the next (27 of 133 entries differed between two base
    builds, and LLaMA-VID's DigitGrid rows with them): every character, alone and as a continuation, then the
    corpus's whole words by frequency, ties alphabetically, up to ``vocab_size``."""
    from collections import Counter

    from tokenizers import normalizers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = Counter(word for line in corpus
                    for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)))
    characters = sorted({character for word in words for character in word})
    vocab = specials + characters + [f"##{character}" for character in characters]
    whole_words = sorted((word for word in words if len(word) > 1), key=lambda word: (-words[word], word))
    vocab += whole_words[: max(0, vocab_size - len(vocab))]
    tokenizer = Tokenizer(models.WordPiece({piece: index for index, piece in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tokenizer.token_to_id("[CLS]")), ("[SEP]", tokenizer.token_to_id("[SEP]"))],
    )
    return BertTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )


def build_tiny_llava(
    output_dir: str | os.PathLike | None = None,
    sizes: TinySizes | None = None,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised plain LLaVA and its processor, saved to ``output_dir`` if given."""
    sizes = sizes or TinySizes()
    tokenizer = train_tokenizer(vocab_size=sizes.vocab_size)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": sizes.image_size},
        crop_size={"height": sizes.image_size, "width": sizes.image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=sizes.patch_size,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_V1_CHAT_TEMPLATE,
        num_additional_image_tokens=1,  # CLIP's CLS, dropped by the "default" strategy
    )
    vision_config = CLIPVisionConfig(
        hidden_size=sizes.vision_hidden,
        intermediate_size=sizes.vision_hidden * 2,
        num_hidden_layers=sizes.vision_layers,
        num_attention_heads=sizes.heads,
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
        projection_dim=sizes.vision_hidden,
    )
    text_config = LlamaConfig(
        hidden_size=sizes.text_hidden,
        intermediate_size=sizes.text_intermediate or sizes.text_hidden * 2,
        num_hidden_layers=sizes.text_layers,
        num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.kv_heads,
        vocab_size=max(len(tokenizer), sizes.embedding_rows or 0),
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(sizes.image_size // sizes.patch_size) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    if output_dir is not None:
        model.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
    return model, processor
