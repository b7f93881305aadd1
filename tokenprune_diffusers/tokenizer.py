"""The real CLIP tokenizer, built offline from the BPE file that ``open_clip_torch`` ships.

Stable Diffusion 1.x/2.x/XL use OpenAI CLIP's byte-level BPE (49,408 ids). Its merge list ships
inside the ``open_clip_torch`` wheel (``open_clip/bpe_simple_vocab_16e6.txt.gz``); the vocabulary
is derived from it exactly as OpenAI's ``SimpleTokenizer`` does, then handed to ``transformers``'
``CLIPTokenizer`` so that the pipeline runs its usual code path. No network is needed.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import tempfile
from pathlib import Path

from ._extras import DIFFUSION_INSTALL

__all__ = ["clip_bpe_path", "load_clip_tokenizer"]

NUM_MERGES = 49152 - 256 - 2  # OpenAI CLIP keeps this many merges of the file


def clip_bpe_path() -> Path:
    """Path of ``bpe_simple_vocab_16e6.txt.gz`` inside the installed ``open_clip`` package.

    The package is located without importing it (importing open_clip pulls in torchvision).
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The offline CLIP tokenizer needs the BPE file shipped by open_clip_torch: {DIFFUSION_INSTALL}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"open_clip is installed but has no BPE file at {path}")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _vocab_and_merges(bpe_path: Path) -> tuple[dict[str, int], list[str]]:
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    byte_tokens = list(_bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def load_clip_tokenizer(pad_token: str = "<|endoftext|>", model_max_length: int = 77):
    """``transformers.CLIPTokenizer`` with OpenAI CLIP's vocabulary, built offline.

    Args:
        pad_token: ``"<|endoftext|>"`` as in SD-1.x (the default) or ``"!"`` as in SD-2.x.
        model_max_length: context length; 77 for every Stable Diffusion text encoder.

    Example:
        >>> tok = load_clip_tokenizer()
        >>> tok("a cat wearing a red hat").input_ids
        [49406, 320, 2368, 3309, 320, 736, 3801, 49407]
    """
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges(clip_bpe_path())
    with tempfile.TemporaryDirectory(prefix="clip-bpe-") as tmp:
        folder = Path(tmp)
        (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(
            str(folder), pad_token=pad_token, model_max_length=model_max_length
        )
