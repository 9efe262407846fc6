"""Derive SD 1.x's CLIPTokenizer files from CLIP's BPE merges file.

Input: `bpe_simple_vocab_16e6.txt.gz`, the data file that the `open-clip-torch`
wheel on PyPI ships (`open_clip/bpe_simple_vocab_16e6.txt.gz`); OpenAI's CLIP
repo ships the same file. Output (default `sdlora/assets/clip_tokenizer/`):
`vocab.json`, `merges.txt`, `tokenizer_config.json`, `special_tokens_map.json`,
the four files `CLIPTokenizer.from_pretrained` reads for SD 1.5.

The vocabulary is built the way CLIP's `SimpleTokenizer` builds it
(github.com/openai/CLIP, `clip/simple_tokenizer.py`), 49,408 tokens:
  ids 0..255       the 256 byte-level unicode stand-ins (GPT-2's byte map order)
  ids 256..511     the same 256 with the end-of-word marker `</w>`
  ids 512..49405   one token per merge: the merges file's lines 1..48894
                   (line 0 is a header; 48894 = 49152 - 256 - 2)
  49406, 49407     `<|startoftext|>`, `<|endoftext|>`

Usage: python scripts/make_clip_tokenizer.py PATH/TO/bpe_simple_vocab_16e6.txt.gz [--out DIR]
"""
from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

N_MERGES = 49152 - 256 - 2      # CLIP's SimpleTokenizer keeps this many merge lines
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77                 # CLIP text context length; SD 1.x pads/truncates to it
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "sdlora" / "assets" / "clip_tokenizer"


def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable unicode char, printable bytes first (GPT-2 / CLIP order)."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def read_merges(gz_path: Path) -> list[tuple[str, str]]:
    """The first N_MERGES merge pairs after the header line."""
    lines = gzip.open(gz_path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]
    bad = [m for m in merges if len(m) != 2]
    if len(merges) != N_MERGES or bad:
        raise ValueError(f"{gz_path}: expected {N_MERGES} 'a b' merge lines after the header, "
                         f"got {len(merges)} with {len(bad)} malformed; is this bpe_simple_vocab_16e6.txt.gz?")
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    tokens = list(bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in merges]
    tokens += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"duplicate tokens: {len(tokens) - len(vocab)}")
    return vocab


def write_tokenizer(gz_path: Path, out: Path) -> dict[str, int]:
    merges = read_merges(gz_path)
    vocab = build_vocab(merges)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                    encoding="utf-8")
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    config = {**specials, "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH,
              "do_lower_case": True, "add_prefix_space": False, "errors": "replace"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    return vocab


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bpe_gz", type=Path, help="path to bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args(argv)
    vocab = write_tokenizer(args.bpe_gz, args.out)
    print(f"wrote {args.out}: {len(vocab)} tokens, {BOS}={vocab[BOS]}, {EOS}={vocab[EOS]}")


if __name__ == "__main__":
    main()
