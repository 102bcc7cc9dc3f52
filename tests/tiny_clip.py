"""Offline test fixture: OpenAI CLIP's real BPE tokenizer with a tiny random CLIPTextModel, saved like a hub repo.

The tokenizer is rebuilt from the BPE merges file that the open_clip_torch wheel ships
(bpe_simple_vocab_16e6.txt.gz; installed with --no-deps, see the Makefile), in the vocabulary order of
CLIP's own SimpleTokenizer: the 256 byte symbols, the same with the end-of-word mark, one token per merge,
then <|startoftext|> and <|endoftext|> (49,408 tokens; the ids of openai/clip-vit-large-patch14).
The text model is random and tiny (width 16, 2 layers), so nothing is downloaded and tests stay fast.
"""
import gzip
import importlib.util
import json
import os

NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges of the file
TINY_WIDTH = 16


def clip_bpe_path():
    """The BPE merges file inside the installed open_clip package (not imported: only its data is read), or None."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
    return path if os.path.isfile(path) else None


def byte_symbols():
    """GPT-2 / CLIP byte -> printable unicode symbol table, in CLIP's order (printable bytes first)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    byte_values, codes = list(printable), list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_clip_tokenizer_files(bpe_path, out_dir):
    """vocab.json + merges.txt of CLIP's tokenizer (the format transformers' CLIPTokenizer reads)."""
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:NUM_MERGES + 1]  # line 0 is a version header
    symbols = byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(out_dir, "vocab.json"), "w") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f)
    with open(os.path.join(out_dir, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


def write_tiny_clip(out_dir, width=TINY_WIDTH, layers=2, heads=2, max_length=77, seed=0, intermediate_size=None):
    """Save CLIP's tokenizer and a random CLIPTextModel of the given size to out_dir (from_pretrained-able).

    write_tiny_clip(dir, width=768, layers=12, heads=12, intermediate_size=3072) has the shape (and cost)
    of openai/clip-vit-large-patch14's text encoder, for benchmarks without the hub.
    """
    import torch
    import transformers
    bpe_path = clip_bpe_path()
    if bpe_path is None:
        raise FileNotFoundError("open_clip's bpe_simple_vocab_16e6.txt.gz not found: "
                                "pip install --no-deps open_clip_torch")
    os.makedirs(out_dir, exist_ok=True)
    vocab_size = write_clip_tokenizer_files(bpe_path, out_dir)
    tokenizer = transformers.CLIPTokenizer(os.path.join(out_dir, "vocab.json"), os.path.join(out_dir, "merges.txt"),
                                           model_max_length=max_length)
    tokenizer.save_pretrained(out_dir)
    config = transformers.CLIPTextConfig(vocab_size=vocab_size, hidden_size=width,
                                         intermediate_size=intermediate_size or 2 * width,
                                         num_hidden_layers=layers, num_attention_heads=heads,
                                         max_position_embeddings=max_length, bos_token_id=vocab_size - 2,
                                         eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    torch.manual_seed(seed)
    transformers.CLIPTextModel(config).save_pretrained(out_dir)
    return out_dir
