#!/usr/bin/env python3
"""
Turns a text corpus into llm.c token shards with GPT-2's byte-level BPE, and writes llm.c's
GPT-2 tokenizer file (formats in doc/formats.md). Standard library only; python3 >= 3.9.

    python3 dev/data/prepare.py                        # Tiny Shakespeare, downloaded if needed
    python3 dev/data/prepare.py --input ../shared/data/tinyshakespeare.txt --bpe-dir ../shared/data/gpt2
    python3 dev/data/prepare.py --dataset kjv --input ../shared/data/kjv.txt --bpe-dir ../shared/data/gpt2
    python3 dev/data/prepare.py --dataset text --input my.txt --name mine

Recipe (as llm.c's data scripts): the text is split on "\\n\\n" into sections; each section
contributes the end-of-text token 50256 and then the BPE encoding of the section with "\\n\\n"
appended (except the last section). The first --val-tokens tokens form the validation shard,
the rest the training shard. Line endings are read as Python's text mode reads them
(CRLF and CR become LF), again as llm.c does.

Encoder: if the `tiktoken` package is importable it is built from the local BPE files (no
network) and checked against the script's own BPE on a sample; otherwise, or on any
mismatch, the script's own GPT-2 BPE is used. The pre-tokeniser uses the `regex` module when
importable, otherwise `re` with exact \\p{L} / \\p{N} / \\s classes built from unicodedata.
"""

import argparse
import hashlib
import json
import os
import re
import struct
import sys
import threading
import time
import unicodedata
import urllib.error
import urllib.request
from array import array

SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(SCRIPT_DIR))

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
TOKENIZER_MAGIC = 20240328
TOKENIZER_VERSION = 2
EOT_STRING = "<|endoftext|>"

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
GPT2_BPE_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models/124M/"
BPE_FILES = ("encoder.json", "vocab.bpe")
# sha256 of the published files, checked after a download (a mismatch is only a warning)
KNOWN_SHA256 = {
    "tiny_shakespeare.txt": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}

# GPT-2's pre-tokenisation pattern
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# The code points with Unicode's White_Space property: what \s means in the `regex` module
# (which GPT-2's encoder used) and in tiktoken. Python's `re` \s also takes U+001C..U+001F,
# so the fallback pattern spells this class out instead of using \s.
WHITE_SPACE_RANGES = [(0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680),
                      (0x2000, 0x200A), (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F),
                      (0x3000, 0x3000)]


class PrepError(Exception):
    """An error the user can act on: printed as one line, exit status 1."""


def fmt_int(n):
    return "{:,}".format(n)


def fmt_size(n):
    if n < 1024:
        return "{} bytes".format(n)
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024.0
        if n < 1024 or unit == "GiB":
            return "{:.1f} {}".format(n, unit)


def display_path(path):
    rel = os.path.relpath(path)
    return os.path.abspath(path) if rel.startswith("..") else rel


# ----------------------------------------------------------------------------------------------
# byte <-> unicode mapping of GPT-2's byte-level BPE

def byte_to_unicode_table():
    """256 one-character strings: bytes that are printable (and not space) in Latin-1 stand for
    themselves, the remaining bytes get the code points 256, 257, ... in increasing byte order."""
    printable = set(range(ord("!"), ord("~") + 1))
    printable |= set(range(0xA1, 0xAC + 1))
    printable |= set(range(0xAE, 0xFF + 1))
    table = []
    extra = 0
    for b in range(256):
        if b in printable:
            table.append(chr(b))
        else:
            table.append(chr(256 + extra))
            extra += 1
    return table


# ----------------------------------------------------------------------------------------------
# pre-tokeniser

def _class_from_ranges(ranges):
    def esc(cp):
        return "\\U{:08x}".format(cp)
    parts = []
    for lo, hi in ranges:
        parts.append(esc(lo) if lo == hi else esc(lo) + "-" + esc(hi))
    return "".join(parts)


def _category_ranges(first_letter):
    ranges = []
    start = None
    for cp in range(0x110000):
        hit = unicodedata.category(chr(cp))[0] == first_letter
        if hit and start is None:
            start = cp
        elif not hit and start is not None:
            ranges.append((start, cp - 1))
            start = None
    if start is not None:
        ranges.append((start, 0x10FFFF))
    return ranges


def fallback_pattern_string():
    """GPT-2's pattern for Python's `re`, with \\p{L}, \\p{N} and \\s spelled out as exact classes."""
    letters = _class_from_ranges(_category_ranges("L"))
    numbers = _class_from_ranges(_category_ranges("N"))
    space = _class_from_ranges(WHITE_SPACE_RANGES)
    return ("'s|'t|'re|'ve|'m|'ll|'d"
            "| ?[{L}]+"
            "| ?[{N}]+"
            "| ?[^{S}{L}{N}]+"
            "|[{S}]+(?![^{S}])"
            "|[{S}]+").format(L=letters, N=numbers, S=space)


def compile_pretokenizer(use_regex_module=True):
    """Returns (compiled pattern, description)."""
    if use_regex_module:
        try:
            import regex  # third-party; what GPT-2's own encoder used
            return regex.compile(GPT2_PATTERN), "regex module"
        except ImportError:
            pass
    return re.compile(fallback_pattern_string()), "re with Unicode " + unicodedata.unidata_version + " classes"


# ----------------------------------------------------------------------------------------------
# GPT-2 BPE

class GPT2BPE:
    def __init__(self, encoder, merges, use_regex_module=True):
        self.encoder = encoder                     # mapped string -> id
        self.vocab_size = len(encoder)
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        table = byte_to_unicode_table()
        self.byte_encoder = table
        self.byte_decoder = {ch: b for b, ch in enumerate(table)}
        # maps the latin-1 reading of UTF-8 bytes onto GPT-2's printable stand-ins
        self.translate_table = {b: table[b] for b in range(256)}
        self.token_bytes = [b""] * self.vocab_size
        for s, i in encoder.items():
            try:
                self.token_bytes[i] = bytes(self.byte_decoder[ch] for ch in s)
            except KeyError:
                raise PrepError("malformed encoder.json: token {!r} (id {}) has a character outside "
                                "GPT-2's byte alphabet".format(s, i))
        self.eot_token = encoder.get(EOT_STRING)
        self.pattern, self.pretokenizer = compile_pretokenizer(use_regex_module)
        self.cache = {}

    def pretokenize(self, text):
        return self.pattern.findall(text)

    def _bpe(self, word_str):
        word = list(word_str)
        ranks = self.ranks
        while len(word) > 1:
            best = None
            best_rank = None
            for i in range(len(word) - 1):
                r = ranks.get((word[i], word[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best_rank = r
                    best = i
            if best is None:
                break
            a, b = word[best], word[best + 1]
            merged = a + b
            out = word[:best]
            i = best
            n = len(word)
            while i < n:
                if i < n - 1 and word[i] == a and word[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = out
        try:
            return [self.encoder[s] for s in word]
        except KeyError as e:
            raise PrepError("encoder.json and vocab.bpe disagree: merged symbol {!r} has no id".format(e.args[0]))

    def encode(self, text):
        ids = []
        cache = self.cache
        table = self.translate_table
        for piece in self.pattern.findall(text):
            r = cache.get(piece)
            if r is None:
                mapped = piece.encode("utf-8").decode("latin-1").translate(table)
                r = self._bpe(mapped)
                if len(cache) >= 1000000:
                    cache.clear()
                cache[piece] = r
            ids.extend(r)
        return ids

    def decode_bytes(self, ids):
        return b"".join(self.token_bytes[i] for i in ids)


def load_bpe(bpe_dir, use_regex_module=True):
    enc_path = os.path.join(bpe_dir, "encoder.json")
    bpe_path = os.path.join(bpe_dir, "vocab.bpe")
    for p in (enc_path, bpe_path):
        if not os.path.isfile(p):
            raise PrepError("missing GPT-2 BPE file {} (--bpe-dir must hold encoder.json and vocab.bpe)".format(p))
    try:
        with open(enc_path, "r", encoding="utf-8") as f:
            encoder = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise PrepError("malformed encoder.json {}: not valid JSON ({})".format(enc_path, e))
    if not isinstance(encoder, dict) or not encoder:
        raise PrepError("malformed encoder.json {}: expected a JSON object mapping tokens to ids".format(enc_path))
    n = len(encoder)
    ids = set()
    for k, v in encoder.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v >= n:
            raise PrepError("malformed encoder.json {}: token {!r} has id {!r}, expected an integer in 0..{}"
                            .format(enc_path, k, v, n - 1))
        ids.add(v)
    if len(ids) != n:
        raise PrepError("malformed encoder.json {}: {} tokens but only {} distinct ids".format(enc_path, n, len(ids)))
    if n > 65536:
        raise PrepError("malformed encoder.json {}: {} tokens do not fit uint16 shards".format(enc_path, n))
    if EOT_STRING not in encoder:
        raise PrepError("malformed encoder.json {}: no {} token".format(enc_path, EOT_STRING))
    try:
        with open(bpe_path, "r", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as e:
        raise PrepError("malformed vocab.bpe {}: not UTF-8 ({})".format(bpe_path, e))
    merges = []
    for lineno, line in enumerate(lines, 1):
        if lineno == 1 and line.startswith("#version"):
            continue
        if not line.strip():
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise PrepError("malformed vocab.bpe {} line {}: expected two symbols, got {!r}".format(bpe_path, lineno, line))
        merges.append((parts[0], parts[1]))
    if not merges:
        raise PrepError("malformed vocab.bpe {}: no merges".format(bpe_path))
    bpe = GPT2BPE(encoder, merges, use_regex_module)
    for i, tb in enumerate(bpe.token_bytes):
        if len(tb) > 255:
            raise PrepError("malformed encoder.json {}: token {} is {} bytes, the tokenizer file allows 255"
                            .format(enc_path, i, len(tb)))
    return bpe


# ----------------------------------------------------------------------------------------------
# encoders: tiktoken (fast, when importable) or our own

SELF_CHECK_TEXT = ("Hello, world! I'm  here's 123 4567\n\n\t  x  \u00e9t\u00e9 na\u00efve \u65e5\u672c\u8a9e "
                   "\u0663\u0664 \U0001F600\U0001F680 a\u00a0b \u2028 'll 're 've 'd 'S ...!?\r\n\x1c\x1d end")


def make_tiktoken_encoder(bpe, sample):
    """An encode function backed by tiktoken built from the local BPE files, or None."""
    try:
        import tiktoken
        ranks = {bpe.token_bytes[i]: i for i in range(bpe.vocab_size) if i != bpe.eot_token}
        enc = tiktoken.Encoding(name="gpt2_local", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                special_tokens={EOT_STRING: bpe.eot_token})
        for text in (SELF_CHECK_TEXT, sample):
            if enc.encode_ordinary(text) != bpe.encode(text):
                print("warning: tiktoken disagrees with the built-in BPE on a sample; using the built-in BPE")
                return None
        return enc.encode_ordinary
    except Exception:
        return None


def choose_encoder(bpe, sample, allow_tiktoken=True):
    """Returns (encode function, description)."""
    if allow_tiktoken:
        fn = make_tiktoken_encoder(bpe, sample)
        if fn is not None:
            return fn, "tiktoken (built from the local BPE files)"
    return bpe.encode, "built-in GPT-2 BPE, pre-tokeniser: " + bpe.pretokenizer


def tokenize_sections(text, encode, eot):
    """llm.c's recipe: EOT, then each section of the text split on blank lines, "\\n\\n" kept."""
    sections = text.split("\n\n")
    tokens = []
    last = len(sections) - 1
    for i, s in enumerate(sections):
        tokens.append(eot)
        tokens.extend(encode(s + "\n\n" if i != last else s))
    return tokens, len(sections)


# ----------------------------------------------------------------------------------------------
# files

def atomic_write(path, chunks):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise PrepError("cannot write {}: {}".format(path, e))


def uint16_le_bytes(tokens):
    a = array("H", tokens)
    if a.itemsize != 2:
        raise PrepError("this Python's array('H') is {} bytes, expected 2".format(a.itemsize))
    if sys.byteorder == "big":
        a.byteswap()
    return a.tobytes()


def write_shard(path, tokens):
    header = [0] * 256
    header[0] = SHARD_MAGIC
    header[1] = SHARD_VERSION
    header[2] = len(tokens)
    atomic_write(path, [struct.pack("<256i", *header), uint16_le_bytes(tokens)])
    return 1024 + 2 * len(tokens)


def write_tokenizer(path, bpe):
    header = [0] * 256
    header[0] = TOKENIZER_MAGIC
    header[1] = TOKENIZER_VERSION
    header[2] = bpe.vocab_size
    header[3] = bpe.eot_token
    body = bytearray()
    for tb in bpe.token_bytes:
        body.append(len(tb))
        body += tb
    atomic_write(path, [struct.pack("<256i", *header), bytes(body)])
    return 1024 + len(body)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url, dest, timeout, offline_hint):
    """Downloads url to dest (via dest.tmp). Gives up when nothing arrives for `timeout` seconds,
    name resolution included (it runs in a worker thread, as getaddrinfo has no timeout)."""
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    tmp = dest + ".tmp"
    state = {"bytes": 0, "last": time.monotonic(), "error": None, "done": False, "total": None}

    def worker():
        try:
            req = urllib.request.Request(url, headers={"User-Agent": "moe-prepare/1.0"})
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                state["total"] = resp.headers.get("Content-Length")
                state["last"] = time.monotonic()
                with open(tmp, "wb") as f:
                    while True:
                        chunk = resp.read(1 << 16)
                        if not chunk:
                            break
                        f.write(chunk)
                        state["bytes"] += len(chunk)
                        state["last"] = time.monotonic()
            state["done"] = True
        except BaseException as e:  # reported by the main thread
            state["error"] = e

    print("downloading {} -> {}".format(url, display_path(dest)))
    sys.stdout.flush()
    t = threading.Thread(target=worker, daemon=True)
    t.start()
    while True:
        t.join(0.1)
        if not t.is_alive():
            break
        if time.monotonic() - state["last"] > timeout:
            state["error"] = "no data for {} s".format(timeout)
            break
    if not state["done"]:
        try:
            os.remove(tmp)
        except OSError:
            pass
        err = state["error"]
        if isinstance(err, urllib.error.URLError) and not isinstance(err, urllib.error.HTTPError):
            err = err.reason
        raise PrepError("cannot download {} ({}); without network {}".format(url, err, offline_hint))
    if state["total"] is not None and str(state["bytes"]) != state["total"]:
        os.remove(tmp)
        raise PrepError("download of {} stopped after {} of {} bytes; try again, or {}"
                        .format(url, state["bytes"], state["total"], offline_hint))
    os.replace(tmp, dest)
    print("downloaded {} ({})".format(display_path(dest), fmt_size(state["bytes"])))
    expected = KNOWN_SHA256.get(os.path.basename(dest))
    if expected is not None and sha256_file(dest) != expected:
        print("warning: {} does not have the expected sha256 {}".format(display_path(dest), expected))


def fetch_cached(url, dest, timeout, offline_hint):
    if os.path.isfile(dest) and os.path.getsize(dest) > 0:
        print("using cached {}".format(display_path(dest)))
        return
    download(url, dest, timeout, offline_hint)


def resolve_bpe_dir(bpe_dir, cache_dir, timeout):
    """The folder holding encoder.json and vocab.bpe: --bpe-dir as given, or the cache folder,
    downloading what is missing there."""
    if bpe_dir is not None:
        return bpe_dir
    hint = "pass --bpe-dir DIR with a local copy of GPT-2's encoder.json and vocab.bpe"
    for name in BPE_FILES:
        fetch_cached(GPT2_BPE_BASE_URL + name, os.path.join(cache_dir, name), timeout, hint)
    return cache_dir


def read_text(path):
    if not os.path.exists(path):
        raise PrepError("input file {} does not exist".format(path))
    if not os.path.isfile(path):
        raise PrepError("input {} is not a regular file".format(path))
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise PrepError("cannot read {}: {}".format(path, e))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PrepError("input {} is not valid UTF-8 (bad byte at offset {})".format(path, e.start))
    return data, text


# ----------------------------------------------------------------------------------------------
# main

DATASETS = {
    # dataset: (default out dir under dev/data, shard prefix, download url, downloaded file name)
    "tinyshakespeare": ("tinyshakespeare", "tiny_shakespeare", TINYSHAKESPEARE_URL, "tiny_shakespeare.txt"),
    "kjv": ("kjv", "kjv", None, None),
    "text": (None, None, None, None),
}


def parse_args(argv):
    p = argparse.ArgumentParser(description="Tokenise a text corpus with GPT-2 BPE into llm.c shards "
                                            "and write llm.c's GPT-2 tokenizer file.")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="tinyshakespeare",
                   help="which corpus (default tinyshakespeare; kjv and text need --input)")
    p.add_argument("--input", help="local text file (default: download into the out dir, tinyshakespeare only)")
    p.add_argument("--bpe-dir", help="folder with GPT-2's encoder.json and vocab.bpe "
                                     "(default: download into dev/data/gpt2)")
    p.add_argument("--out-dir", help="where the shards go (default dev/data/<dataset or name>)")
    p.add_argument("--name", help="shard name prefix: <name>_val.bin, <name>_train.bin (required for --dataset text)")
    p.add_argument("--val-tokens", type=int, default=32768, help="tokens in the validation shard (default 32768)")
    p.add_argument("--tokenizer-out", help="tokenizer file to write (default dev/data/gpt2_tokenizer.bin)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds without data before a download gives up (default 30)")
    p.add_argument("--no-tiktoken", action="store_true", help="use the built-in BPE even if tiktoken is importable")
    return p.parse_args(argv)


def run(args):
    data_dir = os.path.join(REPO_ROOT, "dev", "data")
    sub, prefix, url, fname = DATASETS[args.dataset]
    if args.name is not None:
        if not args.name or "/" in args.name or os.sep in args.name or args.name in (".", ".."):
            raise PrepError("--name {!r} must be a plain file name prefix".format(args.name))
        prefix = args.name
    if args.dataset == "text":
        if args.input is None or args.name is None:
            raise PrepError("--dataset text needs --input PATH and --name NAME")
        sub = args.name
    if args.val_tokens < 1:
        raise PrepError("--val-tokens must be at least 1, got {}".format(args.val_tokens))
    if args.timeout <= 0:
        raise PrepError("--timeout must be positive")
    out_dir = args.out_dir if args.out_dir is not None else os.path.join(data_dir, sub)
    tokenizer_out = args.tokenizer_out if args.tokenizer_out is not None else os.path.join(data_dir, "gpt2_tokenizer.bin")

    # the corpus
    if args.input is not None:
        input_path = args.input
    elif url is None:
        raise PrepError("--dataset {} has no download URL: pass --input PATH with a local copy of the text"
                        .format(args.dataset))
    else:
        input_path = os.path.join(out_dir, fname)
        fetch_cached(url, input_path, args.timeout, "pass --input PATH with a local copy of the text "
                                                    "(and --bpe-dir DIR with GPT-2's encoder.json and vocab.bpe)")
    data, text = read_text(input_path)
    print("read {} ({} bytes)".format(display_path(input_path), fmt_int(len(data))))
    if "\r" in text:
        n_cr = text.count("\r")
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        print("note: read {} CR characters as Python's text mode does (CRLF and CR become LF)".format(fmt_int(n_cr)))

    # the BPE
    bpe_dir = resolve_bpe_dir(args.bpe_dir, os.path.join(data_dir, "gpt2"), args.timeout)
    bpe = load_bpe(bpe_dir)
    print("loaded GPT-2 BPE from {}: {} tokens, {} merges".format(display_path(bpe_dir), fmt_int(bpe.vocab_size),
                                                                  fmt_int(len(bpe.ranks))))
    encode, how = choose_encoder(bpe, text[:20000], allow_tiktoken=not args.no_tiktoken)
    print("encoder: " + how)

    t0 = time.time()
    tokens, n_sections = tokenize_sections(text, encode, bpe.eot_token)
    dt = time.time() - t0
    print("tokenized {} section{} into {} tokens in {:.2f} s".format(fmt_int(n_sections), "" if n_sections == 1 else "s",
                                                                   fmt_int(len(tokens)), dt))
    if len(tokens) <= args.val_tokens:
        raise PrepError("only {} tokens: not enough for {} validation tokens and a training shard"
                        .format(fmt_int(len(tokens)), fmt_int(args.val_tokens)))
    top = max(tokens)
    if top >= bpe.vocab_size:
        raise PrepError("token {} is outside the vocabulary of {}".format(top, bpe.vocab_size))

    val, train = tokens[:args.val_tokens], tokens[args.val_tokens:]
    print("split: {} val tokens, {} train tokens".format(fmt_int(len(val)), fmt_int(len(train))))
    for split, toks in (("val", val), ("train", train)):
        path = os.path.join(out_dir, "{}_{}.bin".format(prefix, split))
        size = write_shard(path, toks)
        print("wrote {}: {} tokens ({} bytes)".format(display_path(path), fmt_int(len(toks)), fmt_int(size)))
    size = write_tokenizer(tokenizer_out, bpe)
    print("wrote {}: {} tokens, eot {} ({} bytes)".format(display_path(tokenizer_out), fmt_int(bpe.vocab_size),
                                                         bpe.eot_token, fmt_int(size)))


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except PrepError as e:
        sys.stdout.flush()
        print("prepare.py: error: {}".format(" ".join(str(e).split("\n"))), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
