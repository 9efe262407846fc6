"""The packaged CLIP tokenizer (sdlora/assets/clip_tokenizer) is SD 1.x's.

Reference ids are those of openai/clip-vit-large-patch14's tokenizer, the one
SD 1.5 ships: "a photo of a cat" -> [49406, 320, 1125, 539, 320, 2368, 49407].
"""
from pathlib import Path

import pytest
from transformers import CLIPTokenizer

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "sdlora" / "assets" / "clip_tokenizer"
CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR, local_files_only=True)


def test_files_present():
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (TOKENIZER_DIR / name).is_file(), name


def test_vocab_size_and_specials(tok):
    assert len(tok) == 49408
    assert tok.convert_tokens_to_ids("<|startoftext|>") == 49406 == tok.bos_token_id
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 49407 == tok.eos_token_id
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 49407
    assert tok.model_max_length == 77


def test_byte_tokens_come_first(tok):
    # 256 byte stand-ins, then the same with "</w>", then merges (CLIP's SimpleTokenizer order)
    assert tok.convert_tokens_to_ids("!") == 0
    assert tok.convert_tokens_to_ids("!</w>") == 256
    assert tok.convert_tokens_to_ids("in") == 512          # first merge line: "i n"


def test_known_ids(tok):
    assert tok("a photo of a cat").input_ids == CAT_IDS
    sks = tok("sks").input_ids
    assert len(sks) == 3 and sks[1] == 48136               # the DreamBooth rare token is one token


def test_padding_to_77(tok):
    ids = tok("a red circle", padding="max_length", max_length=tok.model_max_length,
              truncation=True).input_ids
    assert len(ids) == 77 and ids[-1] == 49407
    long_ids = tok("cat " * 200, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(long_ids) == 77 and long_ids[0] == 49406 and long_ids[-1] == 49407


def test_fast_tokenizer_agrees(tok):
    transformers = pytest.importorskip("transformers")
    fast_cls = getattr(transformers, "CLIPTokenizerFast", None)
    if fast_cls is None:
        pytest.skip("no CLIPTokenizerFast in this transformers")
    fast = fast_cls.from_pretrained(TOKENIZER_DIR, local_files_only=True)
    assert len(fast) == 49408
    for text in ("a photo of a cat", "sks", "Hello, World! naïve café 123"):
        assert fast(text).input_ids == tok(text).input_ids
